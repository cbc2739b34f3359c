"""Storage faults: the S3 store stopping during an encode, and damaged Parquet files in a dataset dir.

Each ends in one line on stderr and exit code 2; a store that stopped leaves
no ``manifest.json``, and the same command completes once the store is back.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import serve_support as support

import pipelines.encode as encode
from contracts.codes import CodesDir
from contracts.dataset import DatasetDir
from contracts.fs import Location, exists, join
from hashray.cli import main
from models.network import HashNetConfig, ResNetHash

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def s3_inputs(s3_store, tiny_dataset) -> tuple[str, str]:
    """(dataset dir, run dir) on S3: the tiny dataset ingested there and an untrained model saved there."""
    data, run = s3_store.uri("faults", "data"), s3_store.uri("faults", "run")
    assert main(["ingest", "synthetic", "--out", data, "--train", "32", "--query", "8", "--database", "96",
                 "--image-size", "32", "--num-classes", "6", "--rows-per-file", "32"]) == 0  # fmt: skip
    classes = DatasetDir.open(data).classes
    config = HashNetConfig(arch="resnet18", bits=16, image_size=32, classes=tuple(classes), loss="cosine")
    ResNetHash.from_config(config).save(Location(run))
    return data, run


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith(f"hashray {command}: error:")]
    assert len(lines) == 1, err[-5:]
    return lines[0]


def stop_after(monkeypatch, store, name: str) -> None:
    """Stop the store right after ``pipelines.encode.<name>`` ran (the fault's point in the encode)."""
    original = getattr(encode, name)

    @functools.wraps(original)
    def then_stop(*args, **kwargs):
        result = original(*args, **kwargs)
        store.stop()
        return result

    monkeypatch.setattr(encode, name, then_stop)


@pytest.mark.parametrize(
    "point",
    [
        "_codes_dataset",  # inputs opened and the old output cleared: the Ray Data job meets a dead store
        "parquet_files",  # the codes Parquet is written and listed: counting its rows and the manifest fail
    ],
)
def test_store_stopped_mid_encode_is_one_line_and_a_rerun_completes(
    s3_store, s3_inputs, point, monkeypatch, capsys
) -> None:
    import ray.data

    data, run = s3_inputs
    # Ray Data retries S3 calls that fail to connect for minutes (10 attempts,
    # back-off up to 32 s each), which rides out a blip; this store stays down.
    monkeypatch.setattr(ray.data.DataContext.get_current(), "retried_io_errors", [])
    out = s3_store.uri("faults", "codes", point)
    command = ["encode", "--run", run, "--data", data, "--split", "database", "--out", out, "--batch-size", "16"]
    stop_after(monkeypatch, s3_store, point)
    try:
        assert main(command) == 2
    finally:
        monkeypatch.setattr(encode, point, getattr(encode, point).__wrapped__)
        if s3_store.process is None:
            s3_store.start()
    line = one_error_line(capsys, "encode")
    assert "the storage failed" in line and out in line and "run the same command again" in line
    assert not exists(join(out, "manifest.json"))

    assert main(command) == 0  # the store is back: the same command redoes the unfinished output
    assert CodesDir.open(out).count == 96


def damage(path: Path, how: str) -> None:
    """Truncate the file, or overwrite the first data page header of its first row group."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        offset = pq.ParquetFile(path).metadata.row_group(0).column(0).data_page_offset
        path.write_bytes(data[:offset] + b"\xff" * 32 + data[offset + 32 :])


@pytest.fixture
def damaged_copy(tiny_dataset, tmp_path):
    """A copy of the tiny dataset and a function that damages one of its database or train files."""
    copy = tmp_path / "data"
    shutil.copytree(tiny_dataset, copy)

    def damaged(split: str, how: str) -> Path:
        victim = sorted((copy / split).glob("*.parquet"))[-1]
        damage(victim, how)
        return victim

    return str(copy), damaged


@pytest.mark.parametrize(
    "how",
    [
        "truncated",  # the footer is gone: the driver reads it while counting rows
        "page",  # the footer is fine, a page header is not: a Ray Data task reads it
    ],
)
def test_damaged_parquet_in_a_dataset_is_one_line_naming_the_file(damaged_copy, how, tmp_path, capsys) -> None:
    data, damaged = damaged_copy
    victim = damaged("database", how)
    run = support.make_run(tmp_path / "run", list(DatasetDir.open(data).classes))
    out = str(tmp_path / "codes")
    assert main(["encode", "--run", run, "--data", data, "--split", "database", "--out", out]) == 2
    line = one_error_line(capsys, "encode")
    assert f"{victim}: damaged Parquet file" in line
    assert not Path(out, "manifest.json").exists()


def test_damaged_parquet_read_by_a_training_worker_is_one_line(damaged_copy, tmp_path, capsys) -> None:
    """Inside Ray Train: the data task of a worker fails, and the worker's failure carries the file's name."""
    data, damaged = damaged_copy
    victim = damaged("train", "page")
    command = ["train", "--data", data, "--run", str(tmp_path / "run"), "--epochs", "1", "--bits", "16",
               "--image-size", "32", "--batch-size", "16", "--val-queries", "0", "--max-failures", "0",
               "--cpus-per-worker", "0.5", "--data-cpus", "0.5"]  # fmt: skip
    assert main(command) == 2
    assert f"{victim}: damaged Parquet file" in one_error_line(capsys, "train")
