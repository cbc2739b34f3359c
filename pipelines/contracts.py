"""The data contracts between stages (DESIGN.md), in one place.

Dataset dir, codes dir and run dir: their schemas, their JSON metadata files,
and the filesystem plumbing that lets every stage take a local path or a
``pyarrow.fs`` URI (``s3://...``, ``gs://...``). ``serve/`` reads codes and
models through this module too; it is the only thing it shares with
``pipelines/`` besides ``models/``.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from models.errors import HashrayError
from models.network import HashNetConfig, ResNetHash

SPLITS = ("train", "query", "database")
DATASET_JSON = "dataset.json"
REJECTS_JSONL = "rejects.jsonl"
MANIFEST_JSON = "manifest.json"
MODEL_PT = "model.pt"
CONFIG_JSON = "config.json"

DATASET_SCHEMA = pa.schema(
    [("id", pa.string()), ("image", pa.binary()), ("labels", pa.list_(pa.int32()))]
)


# Rows per Parquet row group in a dataset split: the smallest piece of a file
# that a preprocessing task reads on its own (see pipelines.preprocess).
ROW_GROUP_ROWS = 128


def codes_schema(bits: int) -> pa.Schema:
    """Schema of a codes dir's Parquet files for codes of ``bits`` bits."""
    return pa.schema(
        [("id", pa.string()), ("code", pa.binary(bits // 8)), ("labels", pa.list_(pa.int32()))]
    )


# ---------------------------------------------------------------- filesystem


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Split a local path or filesystem URI into (filesystem, path on it)."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        # A plain relative path is not a URI: make it absolute on the local disk.
        return pafs.LocalFileSystem(), posixpath.abspath(uri)


def absolute(uri: str) -> str:
    """A local path made absolute, a URI without its trailing slash.

    Stage drivers pass paths to Ray workers and replicas, whose working dir is
    not the caller's, so every path leaves the driver absolute.
    """
    return uri.rstrip("/") if "://" in uri else os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a path or URI without breaking the scheme."""
    return posixpath.join(uri.rstrip("/"), *parts)


def exists(uri: str) -> bool:
    filesystem, path = resolve(uri)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    filesystem, path = resolve(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as error:
        raise HashrayError(f"{uri}: file not found") from error


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file, creating parent directories as needed."""
    filesystem, path = resolve(uri)
    filesystem.create_dir(posixpath.dirname(path), recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(data)


def read_json(uri: str) -> dict[str, Any]:
    try:
        return json.loads(read_bytes(uri))
    except json.JSONDecodeError as error:
        raise HashrayError(f"{uri}: not valid JSON ({error})") from error


def write_json(uri: str, payload: dict[str, Any]) -> None:
    write_bytes(uri, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def remove_dir(uri: str) -> None:
    """Delete a directory tree if it exists (used to redo incomplete outputs)."""
    filesystem, path = resolve(uri)
    if filesystem.get_file_info(path).type == pafs.FileType.Directory:
        filesystem.delete_dir(path)


def parquet_files(uri: str) -> list[str]:
    """The Parquet files under a directory, sorted, as URIs/paths Ray Data can read."""
    filesystem, path = resolve(uri)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    files = sorted(info.path for info in filesystem.get_file_info(selector) if info.path.endswith(".parquet"))
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        return [f"{scheme}://{f}" for f in files]
    return files


def now_iso() -> str:
    """The current UTC time to the second, for the ``created`` fields of dataset.json and manifests.

    ``SOURCE_DATE_EPOCH`` (the reproducible-builds convention), when set,
    stands in for the clock, so a rerun can write a byte-identical directory.
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    try:
        return datetime.fromtimestamp(int(epoch), timezone.utc).isoformat()
    except (ValueError, OverflowError, OSError) as error:
        raise HashrayError(f"SOURCE_DATE_EPOCH={epoch!r} is not a time in whole seconds since 1970") from error


# ---------------------------------------------------------------- dataset dir


def read_dataset_info(dataset_uri: str) -> dict[str, Any]:
    """Read ``dataset.json``; its absence means the dataset is missing or incomplete."""
    info_uri = join(dataset_uri, DATASET_JSON)
    if not exists(info_uri):
        raise HashrayError(
            f"{dataset_uri} is not a complete hashray dataset: {DATASET_JSON} is missing "
            "(run `hashray ingest ... --out DIR` first)"
        )
    return read_json(info_uri)


def split_uri(dataset_uri: str, split: str) -> str:
    if split not in SPLITS:
        raise HashrayError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return join(dataset_uri, split)


def split_files(dataset_uri: str, split: str) -> list[str]:
    """The Parquet files of a split, checking that the split exists and is not empty."""
    info = read_dataset_info(dataset_uri)
    rows = info.get("splits", {}).get(split, 0)
    files = parquet_files(split_uri(dataset_uri, split))
    if rows == 0 or not files:
        raise HashrayError(f"{dataset_uri}: split {split!r} is empty or missing")
    return files


def multi_hot(labels: list[np.ndarray] | np.ndarray, num_classes: int) -> np.ndarray:
    """Class-index lists -> (n, num_classes) float32 multi-hot matrix."""
    matrix = np.zeros((len(labels), num_classes), dtype=np.float32)
    for row, indices in enumerate(labels):
        matrix[row, np.asarray(indices, dtype=np.int64)] = 1.0
    return matrix


# ---------------------------------------------------------------- codes dir


def write_manifest(
    codes_uri: str, *, bits: int, count: int, model: str, dataset: str, split: str, **extra: Any
) -> dict[str, Any]:
    """Write ``manifest.json`` -- always the last file of a codes dir -- and return it.

    ``extra`` holds provenance beyond the contract's keys (e.g. the model's checksum).
    """
    manifest = {**extra, "bits": bits, "count": count, "model": model, "dataset": dataset, "split": split, "created": now_iso()}
    write_json(join(codes_uri, MANIFEST_JSON), manifest)
    return manifest


def read_manifest(codes_uri: str) -> dict[str, Any]:
    """Read a codes dir's manifest; a dir without one is incomplete and never read."""
    manifest_uri = join(codes_uri, MANIFEST_JSON)
    if not exists(manifest_uri):
        raise HashrayError(
            f"{codes_uri} has no {MANIFEST_JSON}: the codes are missing or incomplete "
            "(re-run `hashray encode`)"
        )
    return read_json(manifest_uri)


def read_codes(codes_uri: str) -> tuple[dict[str, Any], pa.Table]:
    """Read a complete codes dir: (manifest, table with id, code, labels) in file order."""
    import pyarrow.parquet as pq

    manifest = read_manifest(codes_uri)
    filesystem, _ = resolve(codes_uri)
    files = [resolve(f)[1] for f in parquet_files(codes_uri)]
    tables = [pq.read_table(f, filesystem=filesystem) for f in files]
    table = pa.concat_tables(tables) if tables else codes_schema(manifest["bits"]).empty_table()
    if table.num_rows != manifest["count"]:
        raise HashrayError(
            f"{codes_uri}: manifest says {manifest['count']} codes but the Parquet files hold {table.num_rows}"
        )
    return manifest, table


def codes_matrix(table: pa.Table) -> np.ndarray:
    """The ``code`` column as an (n, bits/8) uint8 matrix (zero-copy where possible)."""
    column = table.column("code").combine_chunks()
    width = column.type.byte_width
    return np.frombuffer(column.buffers()[1], dtype=np.uint8, count=len(column) * width, offset=column.offset * width).reshape(-1, width)


# ---------------------------------------------------------------- run dir


def save_model(run_uri: str, model: ResNetHash, config: HashNetConfig) -> None:
    """Write ``model.pt`` (plain state_dict) then ``config.json`` into the run dir."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    write_bytes(join(run_uri, MODEL_PT), buffer.getvalue())
    write_json(join(run_uri, CONFIG_JSON), config.to_dict())


def read_model_config(run_uri: str) -> HashNetConfig:
    """A finished run's config, without loading its weights; checks that both files exist."""
    for name in (MODEL_PT, CONFIG_JSON):
        if not exists(join(run_uri, name)):
            raise HashrayError(f"{run_uri} has no {name}: is it a finished `hashray train` run dir?")
    return HashNetConfig.from_dict(read_json(join(run_uri, CONFIG_JSON)))


def load_model(run_uri: str, map_location: str | torch.device = "cpu") -> tuple[ResNetHash, HashNetConfig]:
    """Load a finished run's model (eval mode) and its config."""
    config = read_model_config(run_uri)
    state = torch.load(io.BytesIO(read_bytes(join(run_uri, MODEL_PT))), map_location=map_location, weights_only=True)
    model = ResNetHash(config.arch, config.bits)
    model.load_state_dict(state)
    return model.eval(), config
