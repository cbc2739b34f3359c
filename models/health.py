"""Code health: whether a set of binary codes uses its bits, beside what the labels allow.

A model that collapses maps many images with different labels onto one code:
the Hamming ranking then returns long runs of ties in database order, and mAP
hides it behind the images that happen to share a label. These figures show
it at once: how many distinct codes there are and how large the largest bucket
of identical codes is, set beside the label structure (how many distinct label
sets there are and how large the largest group of identically labelled images
is: a bucket that large is what a perfect model could be forgiven), and how
balanced each bit is (its entropy: 1 for a bit that is on for half the images,
0 for a constant bit).
"""

from __future__ import annotations

import numpy as np

HEALTH_KEYS = (
    "distinct_codes",
    "largest_bucket",
    "largest_bucket_share",
    "bit_entropy",
    "distinct_label_sets",
    "largest_label_group",
    "largest_label_group_share",
)


def row_counts(rows: np.ndarray) -> np.ndarray:
    """How often each distinct row of a 2-D array occurs (order unspecified)."""
    rows = np.ascontiguousarray(rows)
    as_bytes = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    return np.unique(as_bytes, return_counts=True)[1]


def bit_entropy(codes: np.ndarray, bits: int) -> float:
    """Mean over bits of the binary entropy of each bit's share of ones, in [0, 1]."""
    ones = np.unpackbits(np.asarray(codes, dtype=np.uint8), axis=1, count=bits, bitorder="big").mean(axis=0)
    p = np.clip(ones, 1e-12, 1 - 1e-12)
    entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return float(np.where((ones == 0) | (ones == 1), 0.0, entropy).mean())


def code_health(codes: np.ndarray, label_words: np.ndarray) -> dict[str, float | int]:
    """The :data:`HEALTH_KEYS` figures of packed codes (n, bits/8) and their label bit sets (n, W).

    Args:
        codes: packed codes, one row per database item.
        label_words: the items' label sets as bit sets (``models.metrics.label_words``).
    """
    count = len(codes)
    if count == 0:
        return {key: 0 for key in HEALTH_KEYS}
    buckets, groups = row_counts(codes), row_counts(label_words)
    return {
        "distinct_codes": int(len(buckets)),
        "largest_bucket": int(buckets.max()),
        "largest_bucket_share": float(buckets.max() / count),
        "bit_entropy": bit_entropy(codes, codes.shape[1] * 8),
        "distinct_label_sets": int(len(groups)),
        "largest_label_group": int(groups.max()),
        "largest_label_group_share": float(groups.max() / count),
    }


def format_health(health: dict[str, float | int], count: int) -> list[str]:
    """Two lines for a metrics table: the codes, then what the labels allow."""
    return [
        f"  codes  {health['distinct_codes']} distinct of {count}, largest bucket {health['largest_bucket']} "
        f"({health['largest_bucket_share']:.1%}), bit entropy {health['bit_entropy']:.3f}",
        f"  labels {health['distinct_label_sets']} distinct sets, largest identical-label group "
        f"{health['largest_label_group']} ({health['largest_label_group_share']:.1%})",
    ]
