"""The compiled Hamming scan: exact top-k and radius under (distance, position), every code width, pruning and ties."""

from __future__ import annotations

import numpy as np
import pytest

from serve.hamming import BLOCK, MIN_CANDIDATES, HammingScan, from_words, to_words, word_dtype


def brute_force(
    codes: np.ndarray, positions: np.ndarray, query: np.ndarray, k: int, radius: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(distances, rows) of the top-k by (distance, position), bit by bit."""
    distances = (np.unpackbits(codes, axis=1) != np.unpackbits(query[None], axis=1)).sum(axis=1)
    rows = np.arange(len(codes)) if radius is None else np.flatnonzero(distances <= radius)
    order = np.lexsort((positions[rows], distances[rows]))[:k]
    return distances[rows][order], rows[order]


@pytest.mark.parametrize("code_bytes", [1, 2, 3, 4, 6, 8, 9, 16])
def test_words_hold_every_code_width_and_give_each_code_back(code_bytes: int) -> None:
    codes = np.random.default_rng(code_bytes).integers(0, 256, size=(37, code_bytes), dtype=np.uint8)
    words = to_words(codes)
    dtype, count = word_dtype(code_bytes)
    assert words.dtype == dtype and words.shape == (count, 37)
    assert words.flags.c_contiguous
    for row in (0, 17, 36):
        np.testing.assert_array_equal(from_words(words, row, code_bytes), codes[row])


@pytest.mark.parametrize("code_bytes", [1, 3, 8, 16])
@pytest.mark.parametrize("distinct", [3, 40, None])
def test_topk_and_radius_equal_brute_force_with_ties_and_shuffled_positions(
    code_bytes: int, distinct: int | None
) -> None:
    """Many more rows than a block and than the candidates kept, so blocks are skipped and candidates pruned."""
    rng = np.random.default_rng(code_bytes * 100 + (distinct or 0))
    n = 3 * BLOCK + 77
    pool = rng.integers(0, 256, size=(distinct or n, code_bytes), dtype=np.uint8)
    codes = pool[rng.integers(0, len(pool), size=n)]
    positions = rng.permutation(10 * n).astype(np.int64)[:n] + 2**40  # not in row order, beyond int32
    scan = HammingScan(codes, positions, threads=2)
    queries = np.concatenate([codes[:2], rng.integers(0, 256, size=(3, code_bytes), dtype=np.uint8)])
    for k in (1, 10, MIN_CANDIDATES + 1, n + 3):
        for radius in (None, 0, 2, code_bytes * 4):
            for query, (distances, rows) in zip(queries, scan.search(queries, k, radius)):
                want_distances, want_rows = brute_force(codes, positions, query, k, radius)
                np.testing.assert_array_equal(rows, want_rows)
                np.testing.assert_array_equal(distances, want_distances)
                assert distances.dtype == np.int32 and rows.dtype == np.int64


def test_all_codes_equal_keeps_the_smallest_positions() -> None:
    """Every row ties with every other at distance 0: pruning keeps ranking by position alone."""
    n = 2 * BLOCK + 5
    codes = np.full((n, 8), 0xA5, dtype=np.uint8)
    positions = np.arange(n, dtype=np.int32)[::-1].copy()
    distances, rows = HammingScan(codes, positions).search(codes[:1], 5)[0]
    assert distances.tolist() == [0] * 5
    assert positions[rows].tolist() == [0, 1, 2, 3, 4]


def test_empty_index_nothing_within_a_negative_radius_and_k_zero() -> None:
    codes = np.zeros((4, 2), dtype=np.uint8)
    empty = HammingScan(codes[:0], np.zeros(0, np.int64))
    assert len(empty) == 0
    assert [len(rows) for _, rows in empty.search(codes[:2], 3)] == [0, 0]
    scan = HammingScan(codes, np.arange(4))
    assert [len(rows) for _, rows in scan.search(codes[:1], 0)] == [0]
    assert [len(rows) for _, rows in scan.search(codes[:1], 3, radius=-1)] == [0]
