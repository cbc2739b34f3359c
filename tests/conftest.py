"""Shared fixtures: one small local Ray for the whole test session, and an S3 store beside it."""

from __future__ import annotations

import os
import signal

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# A suite started in the background of a script inherits SIGINT ignored, and
# so would every `hashray serve` it starts: the Ctrl-C tests would then wait
# in vain. A handler here makes each child start with SIGINT's default, as at
# a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def s3_plan(tmp_path_factory):
    """The session's S3 store, not yet started: its ports, and the AWS variables that point at it.

    The variables go into the environment before the session's ``ray.init``,
    so every Ray worker inherits them, as a cluster's workers inherit a
    user's. The store itself starts only for the tests that use it (``s3_store``).
    """
    from s3_support import S3Store

    store = S3Store(tmp_path_factory.mktemp("s3"))
    os.environ.update(store.env())
    yield store
    store.stop()


@pytest.fixture(scope="session")
def ray_session(s3_plan):
    """A 2-CPU local Ray shared by every test that needs one."""
    import ray

    if not ray.is_initialized():
        from serve.start import use_fast_http

        use_fast_http()  # the serve tests run Serve as `hashray serve` does
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dataset(ray_session, tmp_path_factory) -> str:
    """A small synthetic dataset dir (96 train / 24 query / 128 database, 32 px, 6 classes, seed 0).

    Train ids are the first 96 database ids (the synthetic protocol). Shared by
    every test that needs real Parquet; treat it as read-only.
    """
    from pipelines.ingest import IngestConfig, run

    out = str(tmp_path_factory.mktemp("tiny") / "ds")
    run(
        IngestConfig(
            source="synthetic",
            out=out,
            train=96,
            query=24,
            database=128,
            image_size=32,
            num_classes=6,
            seed=0,
            rows_per_file=64,
        )
    )
    return out


@pytest.fixture(scope="session")
def s3_store(s3_plan, ray_session):
    """The running S3 store (SeaweedFS on loopback), ready once a write and a read went through."""
    if s3_plan.process is None:
        s3_plan.start()
    return s3_plan
