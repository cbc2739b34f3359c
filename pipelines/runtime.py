"""Connecting to Ray and setting up logging, shared by every stage's driver."""

from __future__ import annotations

import logging
import os

import ray
from ray._private import ray_constants

LOOPBACK = "127.0.0.1"
# Ray turns a loopback node address into the machine's outward one unless it
# is told the node is not part of a cluster (this flag is named for the
# platforms where that is the default). Its worker processes read it too.
LOCAL_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def init_ray(address: str | None = None, num_cpus: int | None = None, metrics_port: int | None = None) -> bool:
    """Start or join a Ray cluster once per process; True when this call started a local Ray.

    ``address=None`` joins ``RAY_ADDRESS`` when set (``ray job submit``),
    keeping the cluster's own network settings. Otherwise it starts a local
    Ray with every core that listens on loopback only (its node address,
    its own ports, the gRPC servers in its workers) and its dashboard on
    127.0.0.1:8265 (Ray Train's bookkeeping queries the state API that the
    dashboard serves; without it every run logs warnings) and its Prometheus
    metrics on ``metrics_port`` (None: a free port).
    Tests and notebooks that already called ``ray.init`` keep their own session.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    use_loopback()
    ray.init(
        num_cpus=num_cpus,
        log_to_driver=True,
        _node_ip_address=LOOPBACK,
        _metrics_export_port=metrics_port,
        runtime_env={"worker_process_setup_hook": f"{__name__}.{bind_workers_to_loopback.__name__}"},
    )
    return True


def use_loopback() -> None:
    """Make the local Ray about to start, and the processes it starts, keep to loopback."""
    os.environ.update(LOCAL_ONLY_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import time; this process imported Ray already


def bind_workers_to_loopback() -> None:
    """Worker setup hook of a local Ray: gRPC servers that Ray code in a worker binds on every interface bind loopback.

    Serve's replicas start their server for calls between deployments on
    ``[::]:0``; they announce the node address (loopback here), so nothing
    reaches them any other way.
    """
    from ray._common import tls_utils

    add_port = tls_utils.add_port_to_grpc_server
    if getattr(add_port, "loopback", False):
        return

    def add_loopback_port(server, address: str) -> int:
        if address.startswith(("[::]:", "0.0.0.0:")):
            address = f"{LOOPBACK}:{address.rsplit(':', 1)[1]}"
        return add_port(server, address)

    add_loopback_port.loopback = True
    tls_utils.add_port_to_grpc_server = add_loopback_port


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
