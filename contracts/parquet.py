"""Opening the Parquet files of a dataset or codes dir, with a damaged file named in one line.

A truncated copy, a file cut short by a crashed writer, or a flipped byte in
a footer or page header makes pyarrow raise ``ArrowInvalid`` ("magic bytes
not found") or an ``OSError`` ("Couldn't deserialize thrift"): on a Ray
worker that is a traceback without the file's name. Every reader of a
dir's Parquet goes through :func:`open_parquet`, so the user reads which file
is damaged, on the driver and in a Ray task alike. A failing store (network,
credentials) is a different problem and keeps its own error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from contracts.fs import resolve
from models.errors import HashrayError

# What pyarrow's Parquet reader says about bytes that are not (whole) Parquet.
# Storage failures are OSErrors too ("AWS Error NETWORK_CONNECTION ..."), so an
# OSError counts as damage only with one of these in its message.
DAMAGE_MARKERS = ("thrift", "corrupt", "page header", "decompress", "unexpected end", "magic bytes")


def is_damage(error: BaseException) -> bool:
    """Whether a pyarrow error says the file's bytes are not readable Parquet (not that the storage failed)."""
    if isinstance(error, pa.ArrowInvalid):
        return True
    message = str(error)
    return (
        isinstance(error, OSError) and "AWS Error" not in message and any(m in message.lower() for m in DAMAGE_MARKERS)
    )


def damaged(uri: str, error: BaseException) -> HashrayError:
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return HashrayError(f"{uri}: damaged Parquet file ({detail}); replace it or re-run the stage that wrote it")


@contextlib.contextmanager
def open_parquet(uri: str) -> Iterator[pq.ParquetFile]:
    """The Parquet file at a path or URI, open for reading; damage, also while reading it, is a HashrayError."""
    filesystem, path = resolve(uri)
    try:
        with filesystem.open_input_file(path) as source:
            yield pq.ParquetFile(source)
    except (pa.ArrowInvalid, OSError) as error:
        if not is_damage(error):
            raise
        raise damaged(uri, error) from error
