"""The codes dir: Parquet files of ``id``, ``code``, ``labels`` plus ``manifest.json``, written last.

``manifest.json`` (``{"bits", "count", "model", "dataset", "split", "created", ...}``)
marks the dir complete; a dir without one is never read. :class:`CodesDir`
is the one reader: evaluate reads every row (:meth:`CodesDir.read`), a serving
shard streams it one row group at a time and keeps its own rows
(:meth:`CodesDir.row_groups`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from contracts.fs import absolute, exists, join, now_iso, parquet_files, read_json, write_json
from contracts.parquet import open_parquet
from models.errors import HashrayError
from models.metrics import label_words

MANIFEST_JSON = "manifest.json"
CODES_COLUMNS = ("id", "code", "labels")


def codes_schema(bits: int) -> pa.Schema:
    """Schema of a codes dir's Parquet files for codes of ``bits`` bits."""
    return pa.schema([("id", pa.string()), ("code", pa.binary(bits // 8)), ("labels", pa.list_(pa.int32()))])


def codes_table(ids: np.ndarray | Sequence[str], packed: np.ndarray, labels: pa.ListArray) -> pa.Table:
    """Rows of the codes-dir schema from ids, packed codes (n, bits/8) and label lists."""
    width = packed.shape[1]
    code = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), len(packed), [None, pa.py_buffer(np.ascontiguousarray(packed).tobytes())]
    )
    return pa.table({"id": pa.array(ids, pa.string()), "code": code, "labels": labels}, schema=codes_schema(width * 8))


def label_lists(multi_hot: np.ndarray) -> pa.ListArray:
    """(n, C) multi-hot rows -> list<int32> class indices, ascending."""
    rows, classes = np.nonzero(np.asarray(multi_hot) > 0)
    offsets = np.zeros(len(multi_hot) + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=len(multi_hot)), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(classes.astype(np.int32)))


def label_sets(
    labels: pa.Array | pa.ChunkedArray, num_classes: int, dtype: type[np.unsignedinteger] = np.uint64
) -> np.ndarray:
    """A ``labels`` column (list<int32>) -> the label bit sets of :func:`models.metrics.label_words`."""
    column = labels.combine_chunks() if isinstance(labels, pa.ChunkedArray) else labels
    lengths = column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    values = column.flatten().to_numpy(zero_copy_only=False)
    return label_words(lengths, values, num_classes, dtype)


def codes_matrix(table: pa.Table) -> np.ndarray:
    """The ``code`` column as an (n, bits/8) uint8 matrix (zero-copy where possible)."""
    column = table.column("code").combine_chunks()
    width = column.type.byte_width
    return np.frombuffer(
        column.buffers()[1], dtype=np.uint8, count=len(column) * width, offset=column.offset * width
    ).reshape(-1, width)


def write_manifest(
    codes_uri: str, *, bits: int, count: int, model: str, dataset: str, split: str, **extra: Any
) -> dict[str, Any]:
    """Write ``manifest.json`` -- always the last file of a codes dir -- and return it.

    ``extra`` holds provenance beyond the contract's keys (e.g. the model's checksum).
    """
    manifest = {
        **extra,
        "bits": bits,
        "count": count,
        "model": model,
        "dataset": dataset,
        "split": split,
        "created": now_iso(),
    }
    write_json(join(codes_uri, MANIFEST_JSON), manifest)
    return manifest


@dataclass(frozen=True)
class CodesDir:
    """A complete codes dir: its manifest read and its files listed once, at :meth:`open`.

    Two CodesDir are equal when they name the same dir (the manifest and the
    listing are what was found there), so a (codes dir, rows) pair can key a cache.
    """

    uri: str
    manifest: dict[str, Any] = field(compare=False, repr=False)
    files: tuple[str, ...] = field(compare=False, repr=False)

    @classmethod
    def open(cls, uri: str) -> CodesDir:
        uri = absolute(uri)
        manifest_uri = join(uri, MANIFEST_JSON)
        if not exists(manifest_uri):
            raise HashrayError(
                f"{uri} has no {MANIFEST_JSON}: the codes are missing or incomplete (re-run `hashray encode`)"
            )
        return cls(uri, read_json(manifest_uri), tuple(parquet_files(uri)))

    @property
    def bits(self) -> int:
        return int(self.manifest["bits"])

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    def require_bits(self, bits: int, who: str) -> None:
        """Refuse codes of another length than ``bits``, the length ``who`` makes (one line naming both)."""
        if self.bits != bits:
            raise HashrayError(f"{self.uri} holds {self.bits}-bit codes but {who} {bits}-bit codes")

    def read(self, columns: Sequence[str] = CODES_COLUMNS, start: int = 0, stop: int | None = None) -> pa.Table:
        """Rows [start, stop) of ``columns``, reading only the files that overlap them.

        Every file's footer is read (it is small) to check the row total against the manifest.
        """
        stop = self.count if stop is None else stop
        pieces, offset = [], 0
        for uri in self.files:
            with open_parquet(uri) as parquet:
                rows = parquet.metadata.num_rows
                low, high = max(start, offset), min(stop, offset + rows)
                if low < high:
                    pieces.append(parquet.read(columns=list(columns)).slice(low - offset, high - low))
            offset += rows
        if offset != self.count:
            raise HashrayError(f"{self.uri}: manifest says {self.count} codes but the Parquet files hold {offset}")
        if not 0 <= start <= stop <= offset:
            raise HashrayError(f"{self.uri}: rows [{start}, {stop}) are outside its {offset} codes")
        full = codes_schema(self.bits)
        schema = pa.schema([full.field(name) for name in columns])
        return pa.concat_tables([p.cast(schema) for p in pieces]) if pieces else schema.empty_table()

    def row_groups(self, columns: Sequence[str] = CODES_COLUMNS) -> Iterator[tuple[int, pa.Table]]:
        """Every Parquet row group in :meth:`read`'s row order, one at a time, with its first row's position.

        A reader that keeps a part of each (a shard of a 100M-row dir) never
        holds more than its part plus one row group. The row total is checked
        against the manifest at the end.
        """
        full = codes_schema(self.bits)
        schema = pa.schema([full.field(name) for name in columns])
        offset = 0
        for uri in self.files:
            with open_parquet(uri) as parquet:
                for group in range(parquet.num_row_groups):
                    table = parquet.read_row_group(group, columns=list(columns)).cast(schema)
                    yield offset, table
                    offset += table.num_rows
        if offset != self.count:
            raise HashrayError(f"{self.uri}: manifest says {self.count} codes but the Parquet files hold {offset}")
