"""Connecting to Ray and setting up logging, shared by every stage's driver."""

from __future__ import annotations

import logging
import os

import ray


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start or join a Ray cluster once per process.

    ``address=None`` joins ``RAY_ADDRESS`` when set (``ray job submit``),
    else starts a local Ray with every core and its dashboard on
    127.0.0.1:8265 (Ray Train's bookkeeping queries the state API that the
    dashboard serves; without it every run logs warnings). Tests and notebooks
    that already called ``ray.init`` keep their own session.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, log_to_driver=True)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
