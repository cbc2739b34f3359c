"""Shared fixtures: one small local Ray for the whole test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
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
