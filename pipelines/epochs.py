"""The order training reads its split in: a fresh, seeded shuffle every epoch, the same for every run of a seed.

The driver reads the train split's Parquet footers once (:func:`row_groups`)
and makes an :class:`EpochPlan`. A few rows, fixed for the run, are held out
for the per-epoch validation queries (and a fixed run of training rows is the
validation database), so validation never reads the query or database split.
Every epoch the remaining rows' row groups are permuted with a generator of
``(seed, epoch)``, laid end to end and cut into one equal share per worker
(the remainder of fewer than ``workers`` rows waits for another epoch, so
every worker takes the same number of steps, as data parallelism needs);
each share is cut into pieces that Ray Data tasks read, and each task shuffles
its rows within windows of a few row groups with a generator of ``(seed,
epoch, rank, piece)``, which also seeds the augmentation. The consumer reads
the pieces in order (``preserve_order``), so the batches of an epoch are a
pure function of the seed, the epoch and the data.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data

from contracts.dataset import DatasetDir
from contracts.parquet import open_parquet
from pipelines.preprocess import PreprocessConfig, Preprocessor, without_errors

# Row groups whose rows a task shuffles together: a window of rows in memory
# (128-row groups: about 500 rows) and mixing beyond one row group's neighbours.
SHUFFLE_WINDOW_GROUPS = 4
# Salts of the generators, so no two uses of one seed draw the same numbers.
_HOLDOUT, _EPOCH, _PIECE = 0, 1, 2
# Ray Data tasks that prepare a training worker's batches beside a GPU (--data-workers unset with --gpu).
GPU_DATA_TASKS = 2


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of row group ``group`` of the Parquet file ``path``."""

    path: str
    group: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def row_groups(dataset: DatasetDir, split: str = "train") -> list[Segment]:
    """Every row group of a split as a whole segment, in file order (one footer read per file)."""
    segments = []
    for path in dataset.split_files(split):
        with open_parquet(path) as parquet:
            metadata = parquet.metadata
        segments += [Segment(path, g, 0, metadata.row_group(g).num_rows) for g in range(metadata.num_row_groups)]
    return segments


def take(segments: list[Segment], start: int, stop: int) -> list[Segment]:
    """Rows [start, stop) of the segments laid end to end, as segments (cut where needed)."""
    taken, offset = [], 0
    for segment in segments:
        low, high = max(start, offset), min(stop, offset + segment.rows)
        if low < high:
            first = segment.start + low - offset
            taken.append(Segment(segment.path, segment.group, first, first + high - low))
        offset += segment.rows
    return taken


def total_rows(segments: list[Segment]) -> int:
    return sum(segment.rows for segment in segments)


def _permuted(segments: list[Segment], *key: int) -> list[Segment]:
    order = np.random.default_rng(list(key)).permutation(len(segments))
    return [segments[i] for i in order]


@dataclass(frozen=True)
class EpochPlan:
    """What each worker reads in each epoch, and the validation rows.

    Args:
        groups: the train split's row groups (:func:`row_groups`).
        seed: the run's seed.
        holdout: rows held out of training as validation queries.
        val_database: training rows that are the validation database.
    """

    groups: tuple[Segment, ...]
    seed: int
    holdout: int = 0
    val_database: int = 0

    @functools.cached_property
    def _fixed_order(self) -> list[Segment]:
        return _permuted(list(self.groups), self.seed, _HOLDOUT)

    def validation_queries(self) -> list[Segment]:
        return take(self._fixed_order, 0, self.holdout)

    def validation_database(self) -> list[Segment]:
        return take(self._fixed_order, self.holdout, self.holdout + self.val_database)

    def training_rows(self) -> list[Segment]:
        """Every row that trains: all but the held-out queries."""
        return take(self._fixed_order, self.holdout, total_rows(list(self.groups)))

    def shard(self, epoch: int, rank: int, workers: int) -> list[Segment]:
        """Worker ``rank``'s rows of ``epoch``: its equal share of that epoch's permutation."""
        rows = self.training_rows()
        share = total_rows(rows) // workers
        return take(_permuted(rows, self.seed, _EPOCH, epoch), rank * share, (rank + 1) * share)

    def pieces(self, epoch: int, rank: int, workers: int, count: int) -> list[dict[str, Any]]:
        """:meth:`shard` cut into ``count`` pieces of about equal rows, each with its shuffle seed."""
        segments = self.shard(epoch, rank, workers)
        rows = total_rows(segments)
        edges = [rows * k // count for k in range(count + 1)]
        return [
            {
                "segments": [dataclasses.asdict(s) for s in take(segments, a, b)],
                "seed": [self.seed, _PIECE, epoch, rank, piece],
            }
            for piece, (a, b) in enumerate(zip(edges[:-1], edges[1:]))
            if b > a
        ]


def read_segments(segments: list[Segment]) -> pa.Table:
    """The ``id``, ``image``, ``labels`` rows of the segments, in their order."""
    tables = []
    for segment in segments:
        with open_parquet(segment.path) as parquet:
            group = parquet.read_row_group(segment.group, columns=["id", "image", "labels"])
        tables.append(group.slice(segment.start, segment.rows))
    return pa.concat_tables(tables)


def shuffled_batches(
    pieces: pa.Table, *, config: PreprocessConfig, num_classes: int, batch_size: int, shuffle: bool
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: each piece's rows, shuffled within windows of row groups, preprocessed, in batches."""
    for piece in pieces.to_pylist():
        rng = np.random.default_rng(piece["seed"])
        preprocessor = Preprocessor(config, num_classes, seed=int(rng.integers(2**63)), per_process=False)
        segments = [Segment(**segment) for segment in piece["segments"]]
        for first in range(0, len(segments), SHUFFLE_WINDOW_GROUPS):
            window = read_segments(segments[first : first + SHUFFLE_WINDOW_GROUPS])
            if shuffle:
                window = window.take(pa.array(rng.permutation(window.num_rows)))
            for start in range(0, window.num_rows, batch_size):
                rows = window.slice(start, batch_size)
                batch = preprocessor(
                    {name: rows.column(name).to_numpy(zero_copy_only=False) for name in rows.column_names}
                )
                yield without_errors(batch, segments[first].path)


def rebatched(
    batches: Iterable[dict[str, np.ndarray]], batch_size: int, *, drop_last: bool
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` rows cut from batches of any size, in row order, as Ray Data's ``iter_batches`` cuts.

    The last batch is shorter, or dropped with ``drop_last``.
    """
    pending: list[dict[str, np.ndarray]] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += len(next(iter(batch.values())))
        while held >= batch_size:
            joined = {name: np.concatenate([part[name] for part in pending]) for name in pending[0]}
            yield {name: column[:batch_size] for name, column in joined.items()}
            rest = {name: column[batch_size:] for name, column in joined.items()}
            held -= batch_size
            pending = [rest] if held else []
    if held and not drop_last:
        yield {name: np.concatenate([part[name] for part in pending]) for name in pending[0]}


@dataclass(frozen=True)
class LocalEpoch:
    """An epoch's pieces prepared in the calling process, between training steps, instead of in Ray Data tasks.

    On a CPU-only node the training step's OpenMP threads take every core, and
    a data task running beside them stalls every barrier of the step on the
    core it shares; decoding and augmenting between steps costs less than that
    stall (a few percent of a step at 64 px). The same rows, shuffle and
    augmentation as :func:`segments_dataset` over the same pieces, in the same order.
    """

    pieces: tuple[dict[str, Any], ...]
    config: PreprocessConfig
    num_classes: int
    shuffle: bool

    def iter_batches(
        self, *, batch_size: int, batch_format: str = "numpy", drop_last: bool = False
    ) -> Iterator[dict[str, np.ndarray]]:
        """The pieces' rows in batches of ``batch_size`` (NumPy only, as the training loop reads them)."""
        if batch_format != "numpy":
            raise ValueError(f"a local epoch makes NumPy batches only, not {batch_format!r}")
        prepared = shuffled_batches(
            pa.Table.from_pylist(list(self.pieces)),
            config=self.config,
            num_classes=self.num_classes,
            batch_size=batch_size,
            shuffle=self.shuffle,
        )
        return rebatched(prepared, batch_size, drop_last=drop_last)


def segments_dataset(
    pieces: list[dict[str, Any]],
    config: PreprocessConfig,
    num_classes: int,
    *,
    batch_size: int,
    num_cpus: float,
    max_workers: int,
    shuffle: bool,
) -> ray.data.Dataset:
    """A lazy Ray Dataset of the pieces' rows (``image`` uint8, ``labels`` multi-hot), in piece order."""
    prepared = ray.data.from_items(pieces, override_num_blocks=len(pieces)).map_batches(
        shuffled_batches,
        fn_kwargs={"config": config, "num_classes": num_classes, "batch_size": batch_size, "shuffle": shuffle},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=num_cpus,
        compute=ray.data.TaskPoolStrategy(size=max_workers),
    )
    prepared.context.target_max_block_size = batch_size * 3 * config.image_size**2
    # The consumer sees the pieces in plan order whichever task finishes first:
    # with it, an epoch's batches depend on the seed alone, not on timing.
    prepared.context.execution_options.preserve_order = True
    return prepared


def data_tasks(data_workers: int | None, *, gpu: bool) -> int:
    """Ray Data tasks preparing a training worker's batches: ``data_workers``, or the device's default.

    Beside a GPU the tasks decode and augment while it computes. On CPU there
    are none (:class:`LocalEpoch`): the step's threads take every core, and a
    task sharing one stalls every barrier of the step (0.60x of a plain loop
    at 64 px on 2 cores with two tasks, 1.03x without).
    """
    if data_workers is not None:
        return data_workers
    return GPU_DATA_TASKS if gpu else 0


def epoch_batches(
    pieces: list[dict[str, Any]],
    config: PreprocessConfig,
    num_classes: int,
    *,
    batch_size: int,
    num_cpus: float,
    tasks: int,
) -> LocalEpoch | ray.data.Dataset:
    """An epoch's pieces, shuffled: prepared in this process with ``tasks`` 0, else by that many Ray Data tasks."""
    if tasks == 0:
        return LocalEpoch(tuple(pieces), config, num_classes, shuffle=True)
    return segments_dataset(
        pieces, config, num_classes, batch_size=batch_size, num_cpus=num_cpus, max_workers=tasks, shuffle=True
    )
