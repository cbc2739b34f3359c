"""Code health: distinct codes, buckets, bit entropy and the label structure, against brute-force counts."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from models.health import HEALTH_KEYS, bit_entropy, code_health, format_health
from models.metrics import multi_hot_words


def brute_force(codes: np.ndarray, multi_hot: np.ndarray) -> dict[str, float]:
    buckets = Counter(bytes(row) for row in codes)
    groups = Counter(tuple(np.flatnonzero(row)) for row in multi_hot)
    bits = np.unpackbits(codes, axis=1)
    entropies = []
    for column in bits.T:
        p = column.mean()
        entropies.append(0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p)))
    return {
        "distinct_codes": len(buckets),
        "largest_bucket": max(buckets.values()),
        "largest_bucket_share": max(buckets.values()) / len(codes),
        "bit_entropy": sum(entropies) / len(entropies),
        "distinct_label_sets": len(groups),
        "largest_label_group": max(groups.values()),
        "largest_label_group_share": max(groups.values()) / len(codes),
    }


@pytest.mark.parametrize("seed, bits, classes", [(0, 16, 5), (1, 32, 70), (2, 64, 3)])
def test_code_health_equals_brute_force_counts(seed: int, bits: int, classes: int) -> None:
    rng = np.random.default_rng(seed)
    # Few distinct values, so buckets and label groups of several rows appear.
    palette = rng.integers(0, 256, (12, bits // 8), dtype=np.uint8)
    codes = palette[rng.integers(0, 12, 500)]
    multi_hot = (rng.random((500, classes)) < 0.3).astype(np.float32)
    multi_hot[np.arange(500), rng.integers(0, classes, 500)] = 1  # at least one label each
    health = code_health(codes, multi_hot_words(multi_hot))
    expected = brute_force(codes, multi_hot)
    assert set(health) == set(HEALTH_KEYS)
    for key, value in expected.items():
        assert health[key] == pytest.approx(value), key


def test_collapsed_codes_look_collapsed_and_balanced_ones_do_not() -> None:
    words = np.arange(1, 101, dtype=np.uint64).reshape(-1, 1)  # 100 distinct label sets
    collapsed = np.zeros((100, 4), dtype=np.uint8)
    health = code_health(collapsed, words)
    assert (health["distinct_codes"], health["largest_bucket"], health["bit_entropy"]) == (1, 100, 0.0)
    assert health["largest_bucket_share"] == 1.0 and health["distinct_label_sets"] == 100
    balanced = np.packbits(np.random.default_rng(0).random((4096, 32)) < 0.5, axis=1)
    assert bit_entropy(balanced, 32) > 0.99


def test_health_lines_name_the_figures() -> None:
    words = np.array([[1], [1], [2]], dtype=np.uint64)
    codes = np.array([[7], [7], [9]], dtype=np.uint8)
    lines = format_health(code_health(codes, words), 3)
    assert lines[0].startswith("  codes  2 distinct of 3, largest bucket 2 (66.7%)")
    assert "largest identical-label group 2 (66.7%)" in lines[1]
