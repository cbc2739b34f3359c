"""Local paths and ``pyarrow.fs`` URIs (``s3://...``, ``gs://...``) behind one set of helpers.

Every stage takes either, so the same command runs on a laptop and on a
cluster. :class:`Location` gives a URI the small part of ``pathlib.Path``'s
interface that :meth:`models.network.ResNetHash.save` uses, so the network
saves itself to object storage without knowing about it.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from models.errors import HashrayError, find_cause


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


def write_table(uri: str, table: pa.Table) -> None:
    """Write a small whole table as one Parquet file (reports beside a JSON, not data sets)."""
    filesystem, path = resolve(uri)
    filesystem.create_dir(posixpath.dirname(path), recursive=True)
    pq.write_table(table, path, filesystem=filesystem)


def read_table(uri: str) -> pa.Table:
    """A whole Parquet file written by :func:`write_table`."""
    filesystem, path = resolve(uri)
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        raise HashrayError(f"{uri}: file not found")
    return pq.read_table(path, filesystem=filesystem)


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


@contextlib.contextmanager
def storage_errors(stage: str, uri: str) -> Iterator[None]:
    """A failing store inside (an ``OSError``, also one raised in a Ray worker) becomes one HashrayError line.

    An object store that stops answering mid-job surfaces as pyarrow's
    ``OSError`` ("AWS Error NETWORK_CONNECTION ...") wrapped in Ray's task
    errors: the user gets that one line, and the hint that completion markers
    are written last, so the same command redoes the unfinished output.
    """
    try:
        yield
    except Exception as error:
        cause = find_cause(error, OSError)
        if cause is None or find_cause(error, HashrayError) is not None:
            raise
        detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise HashrayError(
            f"{stage}: the storage failed while writing {uri} ({detail}); the output is not marked complete: "
            "run the same command again once the storage answers"
        ) from error


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


class Location:
    """A file or directory at a path or URI, with the ``pathlib.Path`` methods the models use.

    ``joinpath``, ``read_bytes``, ``write_bytes``, ``read_text``, ``write_text``
    and ``exists`` behave as ``Path``'s do, on any ``pyarrow.fs`` filesystem.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    def joinpath(self, *parts: str) -> Location:
        return Location(join(self.uri, *parts))

    def exists(self) -> bool:
        return exists(self.uri)

    def read_bytes(self) -> bytes:
        return read_bytes(self.uri)

    def write_bytes(self, data: bytes) -> None:
        write_bytes(self.uri, data)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))
