"""The inputs of bench/serve_load.py: a codes dir of N random codes, an untrained run dir, a small dataset dir.

The codes dir is built for 10^7-10^8 rows on a 24 GiB machine: every column is
made from numpy arrays straight into Arrow buffers (no Python object per row),
one chunk of ``row_group`` rows at a time, each chunk written as one Parquet
row group and dropped, so the bench process never holds more than a chunk.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

from contracts.codes import codes_schema, codes_table, write_manifest
from contracts.dataset import DATASET_SCHEMA, write_dataset_info
from contracts.fs import now_iso
from models.network import HashNetConfig, ResNetHash

ID_PREFIX = b"item-"
ID_DIGITS = 9  # item-000000042: fixed width up to 10^9 rows
ID_WIDTH = len(ID_PREFIX) + ID_DIGITS
CLASSES = 10
ROWS_PER_FILE = 10_000_000  # and at least MIN_FILES files, so a shard reads only the files of its slice
MIN_FILES = 4
SAMPLE_IMAGES = 16  # stored images of the small dataset dir, posted by POST /search


def item_id(position: int) -> str:
    """The id of the item at database ``position`` (the generator's naming)."""
    return f"{ID_PREFIX.decode()}{position:0{ID_DIGITS}d}"


def id_array(start: int, stop: int) -> pa.StringArray:
    """Ids of rows [start, stop) as one Arrow string array, built from a (n, ID_WIDTH) digit matrix."""
    numbers = np.arange(start, stop, dtype=np.int64)
    chars = np.empty((len(numbers), ID_WIDTH), dtype=np.uint8)
    chars[:, : len(ID_PREFIX)] = np.frombuffer(ID_PREFIX, dtype=np.uint8)
    for digit in range(ID_DIGITS):
        chars[:, ID_WIDTH - 1 - digit] = numbers // 10**digit % 10 + ord("0")
    offsets = np.arange(0, (len(numbers) + 1) * ID_WIDTH, ID_WIDTH, dtype=np.int32)
    return pa.StringArray.from_buffers(len(numbers), pa.py_buffer(offsets), pa.py_buffer(chars))


def label_array(rng: np.random.Generator, count: int) -> pa.ListArray:
    """One random class per row as list<int32>: offsets 0..n and the values, no per-row lists."""
    offsets = pa.array(np.arange(count + 1, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, CLASSES, size=count, dtype=np.int32)))


def chunk_codes(seed: int, start: int, count: int, width: int) -> np.ndarray:
    """Random packed codes of the chunk at row ``start``; seeded by (seed, start), so no chunk depends on another."""
    rng = np.random.default_rng([seed, start])
    return np.frombuffer(rng.bytes(count * width), dtype=np.uint8).reshape(count, width)


def file_chunks(count: int, row_group: int) -> list[list[tuple[int, int]]]:
    """Row ranges of every row group, grouped by Parquet file: several files, row groups of <= ``row_group`` rows."""
    files = max(MIN_FILES, math.ceil(count / ROWS_PER_FILE))
    chunks = max(files, math.ceil(count / row_group))
    edges = [count * i // chunks for i in range(chunks + 1)]
    ranges = list(zip(edges[:-1], edges[1:]))
    per_file = [chunks * i // files for i in range(files + 1)]
    return [ranges[a:b] for a, b in zip(per_file[:-1], per_file[1:]) if b > a]


def write_codes_dir(codes_dir: Path, *, count: int, bits: int, seed: int, row_group: int) -> float:
    """Write ``count`` random ``bits``-bit codes as a codes dir (contracts/codes.py); returns the seconds taken."""
    started = time.perf_counter()
    codes_dir.mkdir(parents=True)
    for part, chunks in enumerate(file_chunks(count, row_group)):
        # Ids and codes are unique per row: a dictionary would be tried, grow, and be thrown away.
        with pq.ParquetWriter(
            codes_dir / f"part-{part:04d}.parquet", codes_schema(bits), use_dictionary=["labels"]
        ) as out:
            for a, b in chunks:
                codes = chunk_codes(seed, a, b - a, bits // 8)
                labels = label_array(np.random.default_rng([seed, a, 1]), b - a)
                out.write_table(codes_table(id_array(a, b), codes, labels), row_group_size=b - a)
    write_manifest(str(codes_dir), bits=bits, count=count, model="bench", dataset="bench", split="database")
    return time.perf_counter() - started


def sample_image(rng: np.random.Generator, size: int) -> bytes:
    """A JPEG of a few coloured shapes on a coloured ground: what a stored photo costs to decode."""
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
        side = int(rng.integers(size // 8, size // 2))
        draw.ellipse((x, y, x + side, y + side), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_run_and_data(root: Path, *, bits: int, image_size: int, seed: int) -> tuple[str, str, list[bytes]]:
    """An untrained run dir and a small dataset dir (a few stored images, the class names); their images."""
    classes = [f"class-{i}" for i in range(CLASSES)]
    torch.manual_seed(seed)
    config = HashNetConfig(arch="resnet18", bits=bits, image_size=image_size, classes=tuple(classes), loss="cosine")
    ResNetHash.from_config(config).save(root / "run")

    rng = np.random.default_rng(seed)
    images = [sample_image(rng, image_size) for _ in range(SAMPLE_IMAGES)]
    database = pa.table(
        {
            "id": [item_id(i) for i in range(len(images))],
            "image": images,
            "labels": [[int(v)] for v in rng.integers(0, len(classes), size=len(images))],
        },
        schema=DATASET_SCHEMA,
    )
    (root / "data" / "database").mkdir(parents=True)
    pq.write_table(database, root / "data" / "database" / "part-0.parquet")
    write_dataset_info(
        str(root / "data"), name="bench", classes=classes, splits={"database": len(images)}, created=now_iso()
    )
    return str(root / "run"), str(root / "data"), images


def ids_bytes(count: int) -> int:
    """Bytes of the ``id`` column in Arrow: the characters and the int32 offsets."""
    return count * ID_WIDTH + (count + 1) * 4
