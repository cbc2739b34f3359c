"""The Ray Data side of ``hashray ingest``: the workers that draw or check rows, and the sink that writes them.

:mod:`pipelines.ingest` plans the job on the driver; the functions here run in
Ray Data tasks. Every candidate row leaves a worker as one row of the
``CHECKED_COLUMNS`` table (an empty ``reason`` means good), and
:class:`DatasetSink` writes the good rows of a block to one Parquet file per
split, named after the block's first source row, so reruns are byte-identical.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from contracts.dataset import DATASET_SCHEMA, ROW_GROUP_ROWS, SPLITS
from contracts.fs import join, resolve
from models.transforms import BadImage, decode_image
from pipelines import synthetic

# What a worker adds to a candidate row; an empty reason means the row is good.
CHECKED_COLUMNS = ("seq", "id", "image", "labels", "splits", "where", "reason", "detail")


def draw_synthetic(batch: pa.Table, *, sizes: dict[str, int], seed: int, image_size: int, num_classes: int) -> pa.Table:
    """Rows ``seq`` of the synthetic set: first the database stream (also train), then the queries."""
    stream_rows = max(sizes["train"], sizes["database"])
    rows = []
    for seq in batch.column("id").to_pylist():
        split, index = ("database", seq) if seq < stream_rows else ("query", seq - stream_rows)
        splits = ["query"] if split == "query" else [s for s in ("train", "database") if index < sizes[s]]
        image, labels = synthetic.synthetic_example(
            index, split=split, seed=seed, image_size=image_size, num_classes=num_classes
        )
        rows.append(
            (seq, synthetic.synthetic_id(index, split), image, labels, splits, f"synthetic {split} #{index}", "", "")
        )
    return _checked_table(rows)


def load_images(batch: pa.Table, *, root: str, max_pixels: int) -> pa.Table:
    """Read and fully decode each row's file; bad files get a reason instead of bytes."""
    filesystem, root_path = resolve(root)
    rows = []
    for row in batch.to_pylist():
        image, reason, detail = b"", "", ""
        try:
            image = _read_image(filesystem, posixpath.join(root_path, row["path"]), max_pixels)
        except BadImage as error:
            reason, detail = error.reason, error.detail
        rows.append((row["seq"], row["id"], image, row["labels"], row["splits"], row["where"], reason, detail))
    return _checked_table(rows)


def _read_image(filesystem: pafs.FileSystem, path: str, max_pixels: int) -> bytes:
    """The file's bytes, as read (never re-encoded), once they are known to decode."""
    try:
        with filesystem.open_input_stream(path) as stream:
            data = stream.read()
    except FileNotFoundError as error:
        raise BadImage("missing_file", f"{path} does not exist") from error
    except OSError as error:  # a directory, no permission, a network error...
        raise BadImage("unreadable_file", f"{path}: {error}") from error
    decode_image(data, max_pixels=max_pixels)
    return data


def _checked_table(rows: list[tuple]) -> pa.Table:
    columns = list(zip(*rows)) if rows else [[] for _ in CHECKED_COLUMNS]
    types = (
        pa.int64(),
        pa.string(),
        pa.binary(),
        pa.list_(pa.int32()),
        pa.list_(pa.string()),
        pa.string(),
        pa.string(),
        pa.string(),
    )
    return pa.table({name: pa.array(list(values), type=t) for name, values, t in zip(CHECKED_COLUMNS, columns, types)})


def reject_record(row: dict[str, Any]) -> dict[str, Any]:
    """One line of rejects.jsonl."""
    return {
        "row": row["seq"],
        "id": row["id"],
        "where": row["where"],
        "splits": list(row["splits"]),
        "reason": row["reason"],
        "detail": row["detail"],
    }


# ---------------------------------------------------------------- writing


class DatasetSink(Datasink):
    """Writes the good rows of each block to ``out/<split>/part-<first row>.parquet``.

    Each write task returns its rejects and counts, which the driver collects
    in ``on_write_complete``: rejected rows never go through the object store
    with their bytes, and nothing is counted twice.
    """

    def __init__(self, out: str) -> None:
        self.out = out
        self.rows = 0
        self.written: Counter = Counter()
        self.rejects: list[dict[str, Any]] = []

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
        result = {"rows": 0, "written": Counter(), "rejects": []}
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow().sort_by("seq")
            bad = np.array([bool(r) for r in table.column("reason").to_pylist()], dtype=bool)
            result["rejects"] += [reject_record(r) for r in table.filter(pa.array(bad)).to_pylist()]
            good = table.filter(pa.array(~bad))
            result["rows"] += good.num_rows
            for split in SPLITS:
                result["written"][split] += self._write_split(good, split)
        return result

    def _write_split(self, good: pa.Table, split: str) -> int:
        rows = good.filter(pa.array([split in s for s in good.column("splits").to_pylist()], type=pa.bool_()))
        if rows.num_rows == 0:
            return 0
        filesystem, path = resolve(join(self.out, split, f"part-{rows.column('seq')[0].as_py():010d}.parquet"))
        filesystem.create_dir(posixpath.dirname(path), recursive=True)
        pq.write_table(
            rows.select(DATASET_SCHEMA.names).cast(DATASET_SCHEMA),
            path,
            filesystem=filesystem,
            row_group_size=ROW_GROUP_ROWS,
        )
        return rows.num_rows

    def on_write_complete(self, write_result: Any) -> None:
        for result in write_result.write_returns:
            self.rows += result["rows"]
            self.written.update(result["written"])
            self.rejects += result["rejects"]
