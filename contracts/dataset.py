"""The dataset dir: ``train/``, ``query/`` and ``database/`` Parquet splits plus ``dataset.json``.

``dataset.json`` (``{"name", "classes", "splits": {split: rows}, "created"}``)
is written last, so its presence means the dataset is complete. A command
opens the dir once (:meth:`DatasetDir.open`) and hands the object to
whatever needs the classes, the row counts or the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from contracts.fs import absolute, exists, join, parquet_files, read_json, write_json
from models.errors import HashrayError

SPLITS = ("train", "query", "database")
DATASET_JSON = "dataset.json"
REJECTS_JSONL = "rejects.jsonl"
DATASET_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("labels", pa.list_(pa.int32()))])
# Rows per Parquet row group in a dataset split: the smallest piece of a file
# that a preprocessing task reads on its own (see pipelines.preprocess).
ROW_GROUP_ROWS = 128


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise HashrayError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return split


@dataclass(frozen=True)
class DatasetDir:
    """A complete dataset dir, its ``dataset.json`` read once.

    Small and picklable: drivers pass it to Ray workers and replicas as is.
    """

    uri: str
    info: dict[str, Any] = field(repr=False)
    files: dict[str, tuple[str, ...]] = field(repr=False)  # Parquet files per split, listed at open

    @classmethod
    def open(cls, uri: str) -> DatasetDir:
        """Read ``dataset.json``; its absence means the dataset is missing or incomplete."""
        uri = absolute(uri)
        info_uri = join(uri, DATASET_JSON)
        if not exists(info_uri):
            raise HashrayError(
                f"{uri} is not a complete hashray dataset: {DATASET_JSON} is missing "
                "(run `hashray ingest ... --out DIR` first)"
            )
        info = read_json(info_uri)
        # Listed once: on object storage a listing is a request.
        return cls(uri, info, {split: tuple(parquet_files(join(uri, split))) for split in SPLITS})

    @property
    def name(self) -> str:
        return str(self.info.get("name", ""))

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.info["classes"])

    @property
    def created(self) -> str | None:
        return self.info.get("created")

    def rows(self, split: str) -> int:
        """Rows of ``split`` as ``dataset.json`` counts them."""
        return int(self.info.get("splits", {}).get(check_split(split), 0))

    def split_uri(self, split: str) -> str:
        return join(self.uri, check_split(split))

    def split_files(self, split: str) -> list[str]:
        """The Parquet files of a split, checking that the split exists and is not empty."""
        files = self.files.get(check_split(split), ())
        if self.rows(split) == 0 or not files:
            raise HashrayError(f"{self.uri}: split {split!r} is empty or missing")
        return list(files)


def write_dataset_info(
    uri: str, *, name: str, classes: list[str], splits: dict[str, int], created: str, **extra: Any
) -> None:
    """Write ``dataset.json`` -- always the last file of a dataset dir."""
    write_json(
        join(uri, DATASET_JSON), {**extra, "name": name, "classes": list(classes), "splits": splits, "created": created}
    )


def multi_hot(labels: list[np.ndarray] | np.ndarray, num_classes: int) -> np.ndarray:
    """Class-index lists -> (n, num_classes) float32 multi-hot matrix."""
    matrix = np.zeros((len(labels), num_classes), dtype=np.float32)
    for row, indices in enumerate(labels):
        matrix[row, np.asarray(indices, dtype=np.int64)] = 1.0
    return matrix
