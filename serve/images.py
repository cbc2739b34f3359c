"""Stored images out of the service: their bytes by id and their content type."""

from __future__ import annotations

import functools
import io

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from contracts.dataset import DatasetDir
from contracts.parquet import open_parquet
from serve.index import IdIndex


def content_type(data: bytes) -> str:
    """The MIME type of stored image bytes, from their header."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return Image.MIME.get(image.format or "", "application/octet-stream")
    except (UnidentifiedImageError, OSError):
        return "application/octet-stream"


class ImageStore:
    """Stored image bytes of a dataset split by id, read one row group at a time.

    Only the ids are read up front; an image read loads its row group's
    ``image`` column, and the last ``cache_row_groups`` of those stay cached,
    so memory stays bounded whatever the dataset size.
    """

    def __init__(self, dataset: DatasetDir, *, split: str = "database", cache_row_groups: int = 8) -> None:
        self._files = dataset.split_files(split)
        ids, locations = [], []
        for file_index, uri in enumerate(self._files):
            with open_parquet(uri) as parquet:
                for group in range(parquet.num_row_groups):
                    column = parquet.read_row_group(group, columns=["id"]).column("id")
                    ids.append(column)
                    rows = np.arange(len(column), dtype=np.int32)
                    locations.append(
                        np.stack([np.full_like(rows, file_index), np.full_like(rows, group), rows], axis=1)
                    )
        self._ids = IdIndex(pa.chunked_array([c for chunked in ids for c in chunked.chunks], type=pa.string()))
        self._locations = np.concatenate(locations) if locations else np.zeros((0, 3), dtype=np.int32)
        self._row_group = functools.lru_cache(maxsize=cache_row_groups)(self._read_row_group)

    def __len__(self) -> int:
        return len(self._locations)

    def get(self, item_id: str) -> bytes | None:
        """The stored bytes of ``item_id``, or None when the split has no such id."""
        row = self._ids.find(item_id)
        if row is None:
            return None
        file_index, group, offset = (int(v) for v in self._locations[row])
        return self._row_group(file_index, group)[offset].as_py()

    def _read_row_group(self, file_index: int, group: int) -> pa.Array:
        with open_parquet(self._files[file_index]) as parquet:
            return parquet.read_row_group(group, columns=["image"]).column("image").combine_chunks()
