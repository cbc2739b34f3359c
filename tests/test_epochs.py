"""The training order: a fresh seeded shuffle every epoch, every row once, validation rows held out."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contracts.dataset import DATASET_SCHEMA
from pipelines.epochs import (
    EpochPlan,
    LocalEpoch,
    Segment,
    rebatched,
    segments_dataset,
    shuffled_batches,
    take,
    total_rows,
)
from pipelines.preprocess import PreprocessConfig
from pipelines.synthetic import synthetic_example


def rows_of(segments: list[Segment]) -> list[tuple[str, int, int]]:
    return [(s.path, s.group, row) for s in segments for row in range(s.start, s.stop)]


def groups(files: int = 3, per_file: int = 4, rows: int = 10) -> tuple[Segment, ...]:
    return tuple(Segment(f"f{f}.parquet", g, 0, rows) for f in range(files) for g in range(per_file))


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_each_epoch_reads_every_training_row_once_across_the_workers(workers: int) -> None:
    plan = EpochPlan(groups(), seed=7, holdout=6, val_database=20)  # 120 rows, 6 held out, 114 train
    training = set(rows_of(plan.training_rows()))
    held_out = set(rows_of(plan.validation_queries()))
    assert len(training) == 114 and len(held_out) == 6 and not training & held_out
    assert set(rows_of(plan.validation_database())) <= training  # the validation database is training rows
    for epoch in range(3):
        shards = [rows_of(plan.shard(epoch, rank, workers)) for rank in range(workers)]
        assert len({len(shard) for shard in shards}) == 1  # equal shares: every rank takes the same steps
        seen = [row for shard in shards for row in shard]
        assert len(seen) == len(set(seen)) == 114 // workers * workers and set(seen) <= training


def test_the_order_changes_every_epoch_and_repeats_for_the_seed() -> None:
    plan = EpochPlan(groups(), seed=7, holdout=6)
    first, second = rows_of(plan.shard(0, 0, 1)), rows_of(plan.shard(1, 0, 1))
    assert first != second and sorted(first) == sorted(second)
    assert rows_of(EpochPlan(groups(), seed=7, holdout=6).shard(0, 0, 1)) == first
    assert rows_of(EpochPlan(groups(), seed=8, holdout=6).shard(0, 0, 1)) != first


def test_pieces_cut_a_shard_into_equal_runs_with_their_own_seeds() -> None:
    plan = EpochPlan(groups(), seed=1)
    pieces = plan.pieces(0, 1, 2, count=4)
    assert [total_rows([Segment(**s) for s in piece["segments"]]) for piece in pieces] == [15, 15, 15, 15]
    assert len({tuple(piece["seed"]) for piece in pieces}) == 4
    joined = [Segment(**s) for piece in pieces for s in piece["segments"]]
    assert rows_of(joined) == rows_of(plan.shard(0, 1, 2))


def test_take_cuts_segments_at_any_row() -> None:
    segments = [Segment("a", 0, 0, 5), Segment("a", 1, 0, 5)]
    assert take(segments, 3, 7) == [Segment("a", 0, 3, 5), Segment("a", 1, 0, 2)]
    assert take(segments, 0, 0) == []


@pytest.fixture
def parquet_split(tmp_path: Path) -> list[Segment]:
    """40 synthetic rows in one file of 5 row groups of 8."""
    drawn = [synthetic_example(i, split="database", seed=0, image_size=32, num_classes=4) for i in range(40)]
    table = pa.table(
        {"id": [f"row-{i}" for i in range(40)], "image": [d[0] for d in drawn], "labels": [d[1] for d in drawn]},
        schema=DATASET_SCHEMA,
    )
    path = tmp_path / "part.parquet"
    pq.write_table(table, path, row_group_size=8)
    return [Segment(str(path), g, 0, 8) for g in range(5)]


def piece_table(segments: list[Segment], seed: list[int]) -> pa.Table:
    return pa.Table.from_pylist([{"segments": [dataclasses.asdict(s) for s in segments], "seed": seed}])


def test_a_piece_is_shuffled_and_augmented_the_same_way_for_the_same_seed(parquet_split) -> None:
    config = PreprocessConfig(image_size=32, train=True)

    def read(seed: list[int]) -> tuple[np.ndarray, np.ndarray]:
        batches = list(
            shuffled_batches(
                piece_table(parquet_split, seed), config=config, num_classes=4, batch_size=16, shuffle=True
            )
        )
        return np.concatenate([b["image"] for b in batches]), np.concatenate([b["labels"] for b in batches])

    images, labels = read([1, 2])
    again_images, again_labels = read([1, 2])
    assert len(images) == 40 and np.array_equal(images, again_images) and np.array_equal(labels, again_labels)
    other_images, _ = read([1, 3])
    assert not np.array_equal(images, other_images)
    plain = list(
        shuffled_batches(piece_table(parquet_split, [1, 2]), config=config, num_classes=4, batch_size=40, shuffle=False)
    )
    file_labels = np.concatenate([batch["labels"] for batch in plain])
    assert not np.array_equal(labels, file_labels)  # shuffled: not the file's order
    assert sorted(map(tuple, labels)) == sorted(map(tuple, file_labels))  # the same rows


def test_the_ray_dataset_yields_the_pieces_in_plan_order(ray_session, parquet_split) -> None:
    config = PreprocessConfig(image_size=32, train=False)
    pieces = [
        {"segments": [dataclasses.asdict(s) for s in parquet_split[:2]], "seed": [0]},
        {"segments": [dataclasses.asdict(s) for s in parquet_split[2:]], "seed": [1]},
    ]

    def labels_in_order() -> np.ndarray:
        dataset = segments_dataset(pieces, config, 4, batch_size=8, num_cpus=0.5, max_workers=2, shuffle=False)
        return np.concatenate([batch["labels"] for batch in dataset.iter_batches(batch_size=8)])

    first = labels_in_order()
    direct = list(
        shuffled_batches(piece_table(parquet_split, [0]), config=config, num_classes=4, batch_size=40, shuffle=False)
    )
    expected = np.concatenate([batch["labels"] for batch in direct])
    assert np.array_equal(first, expected) and np.array_equal(labels_in_order(), first)


def test_a_local_epoch_gives_the_ray_datasets_batches_in_the_workers_own_process(ray_session, parquet_split) -> None:
    """``--data-workers 0``: the same rows, shuffle, augmentation and batches as the Ray Data tasks, every row once."""
    config = PreprocessConfig(image_size=32, train=True)
    plan = EpochPlan(tuple(parquet_split), seed=3)
    pieces = plan.pieces(0, 0, 1, count=2)
    streamed = segments_dataset(pieces, config, 4, batch_size=6, num_cpus=0.5, max_workers=2, shuffle=True)
    local = LocalEpoch(tuple(pieces), config, 4, shuffle=True)
    for drop_last in (False, True):
        want = list(streamed.iter_batches(batch_size=6, batch_format="numpy", drop_last=drop_last))
        got = list(local.iter_batches(batch_size=6, drop_last=drop_last))
        assert [len(b["image"]) for b in got] == [len(b["image"]) for b in want]
        assert len(got) == (6 if drop_last else 7)  # 40 rows: six full batches and one of 4
        for ours, theirs in zip(got, want):
            np.testing.assert_array_equal(ours["image"], theirs["image"])
            np.testing.assert_array_equal(ours["labels"], theirs["labels"])
    next_epoch = np.concatenate(
        [
            b["labels"]
            for b in LocalEpoch(tuple(plan.pieces(1, 0, 1, count=2)), config, 4, shuffle=True).iter_batches(
                batch_size=6
            )
        ]
    )
    this_epoch = np.concatenate([b["labels"] for b in got])
    assert sorted(map(tuple, next_epoch)) == sorted(
        map(tuple, np.concatenate([b["labels"] for b in local.iter_batches(batch_size=6)]))
    )
    assert not np.array_equal(next_epoch[: len(this_epoch)], this_epoch)  # another epoch, another order


def test_rebatched_cuts_any_sizes_into_equal_batches_in_order() -> None:
    parts = [{"x": np.arange(a, b)} for a, b in ((0, 3), (3, 4), (4, 11), (11, 11), (11, 13))]
    assert [b["x"].tolist() for b in rebatched(parts, 5, drop_last=False)] == [
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
        [10, 11, 12],
    ]
    assert [len(b["x"]) for b in rebatched(parts, 5, drop_last=True)] == [5, 5]
    assert list(rebatched([], 5, drop_last=False)) == []
