"""Benchmark: seconds to evaluate 2,000 queries against 1,000,000 random 64-bit codes.

Prints our figure (``models.metrics.evaluate_codes``: chunked Hamming
ranking + every metric and curve) next to a naive reference on a subset of
the queries (full ``np.argsort(kind="stable")`` per query, as the published
DPSH/HashNet evaluation scripts do, extrapolated to all queries), and the ratio.

    .venv/bin/python bench/evaluate.py [--queries 2000] [--database 1000000] [--bits 64]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.codes import hamming_distances  # noqa: E402
from models.metrics import average_precision, evaluate_codes  # noqa: E402

TARGET_SECONDS = 30.0


def random_labels(rng: np.random.Generator, n: int, num_classes: int, max_labels: int) -> np.ndarray:
    """Random multi-hot rows (1..max_labels labels each) as one uint64 bit-set word per row."""
    words = np.zeros(n, dtype=np.uint64)
    counts = rng.integers(1, max_labels + 1, size=n)
    for slot in range(max_labels):
        classes = rng.integers(0, num_classes, size=n).astype(np.uint64)
        words |= np.where(counts > slot, np.left_shift(np.uint64(1), classes), np.uint64(0))
    return words[:, None]


def naive_seconds_per_query(query_codes, query_words, db_codes, db_words, k: int, sample: int) -> float:
    """Per-query time of the textbook loop: full distances, full stable argsort, AP@K."""
    started = time.perf_counter()
    for q in range(sample):
        distances = hamming_distances(query_codes[q : q + 1], db_codes)[0]
        order = np.argsort(distances, kind="stable")[:k]
        relevant = (query_words[q, 0] & db_words[order, 0]) != 0
        average_precision(relevant)
    return (time.perf_counter() - started) / sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2000, help="number of query codes")
    parser.add_argument("--database", type=int, default=1_000_000, help="number of database codes")
    parser.add_argument("--bits", type=int, default=64, help="code length")
    parser.add_argument("--classes", type=int, default=20, help="number of label classes")
    parser.add_argument("--topk", type=int, default=5000, help="K of the @K metrics")
    parser.add_argument("--naive-sample", type=int, default=20, help="queries timed with the naive loop")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    rng = np.random.default_rng(0)
    db_codes = rng.integers(0, 256, size=(args.database, args.bits // 8), dtype=np.uint8)
    query_codes = rng.integers(0, 256, size=(args.queries, args.bits // 8), dtype=np.uint8)
    db_words = random_labels(rng, args.database, args.classes, 3)
    query_words = random_labels(rng, args.queries, args.classes, 3)

    started = time.perf_counter()
    metrics = evaluate_codes(query_codes, query_words, db_codes, db_words, topk=args.topk)
    ours = time.perf_counter() - started
    naive = args.queries * naive_seconds_per_query(
        query_codes, query_words, db_codes, db_words, args.topk, args.naive_sample
    )

    print(f"{args.queries} queries x {args.database} codes, {args.bits} bits, K={args.topk}, {args.classes} classes")
    print(
        f"  {'hashray evaluate (all metrics + curves)':<44} {ours:8.1f} s   (target < {TARGET_SECONDS:.0f} s: {'met' if ours < TARGET_SECONDS else 'NOT met'})"
    )
    print(f"  {'naive argsort loop (mAP only, extrapolated)':<44} {naive:8.1f} s")
    print(f"  {'speed-up':<44} {naive / ours:8.1f} x")
    print(f"  mAP of random codes: {metrics['mAP']:.4f}")


if __name__ == "__main__":
    main()
