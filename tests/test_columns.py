"""A shard's id and label columns: the same answers in every form, and the narrow form where it is smaller."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from contracts.codes import label_sets
from serve.columns import IdColumn, LabelColumn

LISTS = pa.list_(pa.int32())


def brute_find(ids: list[str], item_id: str) -> int | None:
    return ids.index(item_id) if item_id in ids else None


@pytest.mark.parametrize(
    "ids",
    [
        ["id-0003", "id-0007", "id-0007", "id-0042", "id-9999"],  # one width: bytes without offsets
        ["a", "bb", "bb", "c", "zzz"],  # widths differ: Arrow strings
        ["ab", "b\0", "c1", "é"],  # two bytes each, one ending in NUL: Arrow strings
    ],
    ids=["fixed", "variable", "trailing-nul"],
)
def test_ids_are_found_and_taken_as_stored(ids: list[str]) -> None:
    column = IdColumn(pa.chunked_array([ids[:2], ids[2:]]))
    assert len(column) == len(ids)
    for item_id in [*ids, "id-0004", "b", "a\0", "", "zzzz", "id-00420"]:
        assert column.find_sorted(item_id) == brute_find(ids, item_id), item_id
    rows = np.array([*range(len(ids) - 1, -1, -1), 1], dtype=np.int64)
    assert column.take(rows) == [ids[r] for r in rows]


def test_ids_of_one_width_take_their_bytes_and_no_offsets() -> None:
    ids = [f"item-{i:09d}" for i in range(1000)]
    assert IdColumn(pa.array(ids)).nbytes == 1000 * 14
    mixed = pa.array([*ids, "short"])
    assert IdColumn(mixed).nbytes == mixed.nbytes


def test_a_slice_of_an_arrow_column_keeps_its_own_ids() -> None:
    ids = pa.array([f"x{i:03d}" for i in range(50)])
    column = IdColumn(ids.slice(10, 5))
    assert column.take(np.arange(5)) == [f"x{i:03d}" for i in range(10, 15)]
    assert column.find_sorted("x012") == 2 and column.find_sorted("x020") is None


@pytest.mark.parametrize("classes", [1, 6, 8, 9, 64, 81])
def test_labels_come_back_as_their_sets(classes: int) -> None:
    rng = np.random.default_rng(classes)
    lists = [sorted(set(rng.integers(0, classes, size=rng.integers(0, 4)).tolist())) for _ in range(300)]
    lists[7] = [classes - 1]  # the highest class occurs
    column = LabelColumn(pa.array(lists, LISTS).slice(2))
    rows = np.array([5, 0, 297, 3, 3], dtype=np.int64)
    assert column.take(rows) == [lists[2 + r] for r in rows]
    assert column.take(np.arange(len(column))) == lists[2:]


def test_labels_take_the_smaller_form() -> None:
    few = pa.array([[i % 10] for i in range(1000)], LISTS)  # 8 bytes a row as lists, 2 as bit sets
    assert LabelColumn(few).nbytes == 1000 * 2
    sparse = pa.array([[i % 1000] for i in range(1000)], LISTS)  # 125 bytes a row as bit sets
    assert LabelColumn(sparse).nbytes == sparse.nbytes


def test_byte_label_sets_hold_the_same_bits_as_word_label_sets() -> None:
    labels = pa.array([[0, 3, 63], [], [8, 9], [70, 129]], LISTS)
    words = label_sets(labels, 130)
    as_bytes = label_sets(labels, 130, np.uint8)
    assert as_bytes.shape == (4, 17) and words.shape == (4, 3)
    little = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :130]
    from_words = np.unpackbits(words.astype("<u8").view(np.uint8), axis=1, bitorder="little")[:, :130]
    assert np.array_equal(little, from_words)
    assert [np.flatnonzero(row).tolist() for row in little] == labels.to_pylist()
