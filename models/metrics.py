"""Retrieval metrics of Hamming rankings: mAP, NDCG, ACG, WAP, P@r2 and the curves, in one place.

Pure numpy, so evaluation, training's per-epoch validation and the
benchmarks all score with the same code. Each query is ranked against the
whole database on its own (a few database-length vectors at a time), and its
results are scored in chunks of queries, so memory grows with the database and
with chunk x K, never with queries x database: 10k queries against 1M codes is
fine. For every query we keep only what the metrics need: the graded relevance
of its top K (ranked with :func:`models.codes.topk_by_hamming`, ties by
database position) and a joint histogram of (Hamming distance, shared labels)
over the whole database, from which the Hamming-radius curves, recall and the
ideal DCG follow.

Per-query metric functions work on the last axis, so they take one ranked
list or a (queries, K) block alike; tests compare them with brute force.
Labels enter as bit sets (:func:`label_words`), so overlaps are popcounts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.codes import hamming_distances, topk_by_hamming
from models.errors import HashrayError

logger = logging.getLogger(__name__)

SUMMARY_KEYS = ("mAP", "NDCG", "ACG", "WAP", "P@r2")
# "P@r2": precision of a Hamming-radius-2 lookup, the literature's hash-table figure.
LOOKUP_RADIUS = 2

# ---------------------------------------------------------------- per-query metrics


def _positions(length: int) -> np.ndarray:
    """1-based ranks 1..length as floats."""
    return np.arange(1, length + 1, dtype=np.float64)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (a query with nothing to score)."""
    numerator, denominator = np.broadcast_arrays(np.asarray(numerator, np.float64), np.asarray(denominator, np.float64))
    return np.divide(numerator, denominator, out=np.zeros(numerator.shape), where=denominator > 0)


def average_precision(relevant: np.ndarray) -> np.ndarray:
    """AP of ranked lists (last axis): mean precision@i over the relevant positions i.

    Normalised by the number of relevant items *retrieved* in the list (the
    DPSH/HashNet convention for mAP@K); a list with none scores 0.
    """
    relevant = np.asarray(relevant, dtype=np.float64)
    hits = np.cumsum(relevant, axis=-1)
    precision = hits / _positions(relevant.shape[-1])
    return _safe_divide((precision * relevant).sum(axis=-1), hits[..., -1])


def dcg(gains_levels: np.ndarray) -> np.ndarray:
    """DCG of graded relevance r (last axis): sum (2^r - 1) / log2(i + 1), i = 1-based rank."""
    levels = np.asarray(gains_levels, dtype=np.float64)
    return ((2.0**levels - 1.0) / np.log2(_positions(levels.shape[-1]) + 1.0)).sum(axis=-1)


def ndcg(ranked_levels: np.ndarray, ideal_levels: np.ndarray) -> np.ndarray:
    """DCG of the ranking over DCG of the best possible ranking; 0 when nothing is relevant."""
    return _safe_divide(dcg(ranked_levels), dcg(ideal_levels))


def average_cumulative_gain(ranked_levels: np.ndarray) -> np.ndarray:
    """ACG: mean number of shared labels over the ranked list (last axis)."""
    return np.asarray(ranked_levels, dtype=np.float64).mean(axis=-1)


def weighted_average_precision(ranked_levels: np.ndarray) -> np.ndarray:
    """DSRH's weighted AP: ACG@i averaged over the relevant positions i (0 if none)."""
    levels = np.asarray(ranked_levels, dtype=np.float64)
    relevant = levels > 0
    acg_at = np.cumsum(levels, axis=-1) / _positions(levels.shape[-1])
    return _safe_divide((acg_at * relevant).sum(axis=-1), relevant.sum(axis=-1))


def ideal_levels(level_counts: np.ndarray, k: int) -> np.ndarray:
    """The k best relevance levels of the whole database, descending.

    ``level_counts[..., r]`` is how many database items share r labels with
    the query; the ideal ranking lists the highest levels first.
    """
    level_counts = np.asarray(level_counts)
    top = level_counts.shape[-1] - 1
    ends = np.cumsum(level_counts[..., ::-1], axis=-1)  # items at level >= top, >= top-1, ...
    levels_passed = (np.arange(k)[:, None] >= ends[..., None, :]).sum(axis=-1)
    return top - levels_passed


def radius_curve(joint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of Hamming-radius lookup for every radius 0..bits.

    ``joint[..., d, r]`` counts database items at distance d sharing r labels.
    Precision is 0 where the radius retrieves nothing; recall is 0 for a
    query with no relevant item in the database.
    """
    retrieved = np.cumsum(joint.sum(axis=-1), axis=-1)
    relevant = np.cumsum(joint[..., 1:].sum(axis=-1), axis=-1)
    return _safe_divide(relevant, retrieved), _safe_divide(relevant, relevant[..., -1:])


def top_n_curve(relevant: np.ndarray, total_relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """precision@N and recall@N for N = 1..len of ranked lists (last axis)."""
    hits = np.cumsum(np.asarray(relevant, dtype=np.float64), axis=-1)
    return hits / _positions(hits.shape[-1]), _safe_divide(hits, np.asarray(total_relevant)[..., None])


# ---------------------------------------------------------------- ranking


def label_words(
    lengths: np.ndarray, values: np.ndarray, num_classes: int, dtype: type[np.unsignedinteger] = np.uint64
) -> np.ndarray:
    """Class-index lists, flattened (``lengths`` per row, ``values`` concatenated) -> (n, ceil(C/w)) bit sets.

    Class c is bit c % w of word c // w, for words of w bits (``dtype``):
    uint64 for fast popcounts here, uint8 where a row's bytes count (a
    serving shard), which :func:`numpy.unpackbits` with ``bitorder="little"``
    turns back into class order.
    """
    width = np.dtype(dtype).itemsize * 8
    lengths = np.asarray(lengths, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    words = np.zeros((len(lengths), max(1, -(-num_classes // width))), dtype=dtype)
    np.bitwise_or.at(words, (rows, values // width), np.left_shift(dtype(1), (values % width).astype(dtype)))
    return words


def multi_hot_words(multi_hot: np.ndarray) -> np.ndarray:
    """(n, C) multi-hot rows -> the bit sets of :func:`label_words`."""
    rows, classes = np.nonzero(np.asarray(multi_hot) > 0)
    return label_words(np.bincount(rows, minlength=len(multi_hot)), classes, np.asarray(multi_hot).shape[1])


def shared_labels(query_words: np.ndarray, database_words: np.ndarray) -> np.ndarray:
    """(q, W) x (n, W) label bit sets -> (q, n) uint8 counts of shared labels."""
    shared = np.zeros((query_words.shape[0], database_words.shape[0]), dtype=np.uint8)
    for word in range(query_words.shape[1]):
        shared += np.bitwise_count(query_words[:, word, None] & database_words[None, :, word])
    return shared


@dataclass
class _Totals:
    """Running sums over queries of every metric and curve point."""

    scalars: dict[str, float]
    radius_precision: np.ndarray
    radius_recall: np.ndarray
    top_precision: np.ndarray
    top_recall: np.ndarray
    queries: int = 0
    per_query: dict[str, list[np.ndarray]] = field(default_factory=lambda: {key: [] for key in SUMMARY_KEYS})


def rank_query(
    query_code: np.ndarray, query_words: np.ndarray, db_codes: np.ndarray, db_words: np.ndarray, k: int, levels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rank the database for one query.

    Returns the shared-label counts of its top K in rank order (K,) and the
    joint histogram (bits+1, levels) of (Hamming distance, shared labels) over
    the whole database. One query at a time keeps the temporaries at a few
    database-length vectors, which stay in cache-friendly reused memory.
    """
    distances = hamming_distances(query_code[None], db_codes)[0]
    shared = shared_labels(query_words[None], db_words)[0]
    joint = np.bincount(distances * levels + shared, minlength=(db_codes.shape[1] * 8 + 1) * levels)
    return shared[topk_by_hamming(distances, k)], joint.reshape(-1, levels)


def _add_chunk(totals: _Totals, ranked: np.ndarray, joint: np.ndarray) -> None:
    """Score one chunk's rankings and add them to the running sums."""
    relevant = ranked > 0
    level_counts = joint.sum(axis=1)
    total_relevant = level_counts[:, 1:].sum(axis=1)
    radius_precision, radius_recall = radius_curve(joint)
    top_precision, top_recall = top_n_curve(relevant, total_relevant)
    chunk = {
        "mAP": average_precision(relevant),
        "NDCG": ndcg(ranked, ideal_levels(level_counts, ranked.shape[1])),
        "ACG": average_cumulative_gain(ranked),
        "WAP": weighted_average_precision(ranked),
        "P@r2": radius_precision[:, LOOKUP_RADIUS],
    }
    for key, values in chunk.items():
        totals.scalars[key] += float(values.sum())
        totals.per_query[key].append(values)
    totals.radius_precision += radius_precision.sum(axis=0)
    totals.radius_recall += radius_recall.sum(axis=0)
    totals.top_precision += top_precision.sum(axis=0)
    totals.top_recall += top_recall.sum(axis=0)
    totals.queries += len(ranked)


def evaluate_codes(
    query_codes: np.ndarray,
    query_words: np.ndarray,
    db_codes: np.ndarray,
    db_words: np.ndarray,
    *,
    topk: int,
    chunk_size: int = 256,
    curve_points: int = 100,
    progress_seconds: float = 10.0,
) -> dict[str, Any]:
    """All metrics of packed query codes against packed database codes.

    Args:
        query_codes, db_codes: (n, bits/8) uint8 packed codes.
        query_words, db_words: label bit sets from :func:`label_words`.
        topk: K, clipped to the database size.
        chunk_size: queries scored together (bounds the (chunk, K) metric arrays).

    Returns:
        The metrics.json payload (without file provenance).
    """
    bits = db_codes.shape[1] * 8
    k = min(topk, len(db_codes))
    levels = int(max(np.bitwise_count(query_words).sum(axis=1).max(), 1)) + 1
    if chunk_size < 1:
        raise HashrayError(f"chunk size must be at least 1, got {chunk_size}")
    totals = _Totals(
        {key: 0.0 for key in SUMMARY_KEYS}, np.zeros(bits + 1), np.zeros(bits + 1), np.zeros(k), np.zeros(k)
    )
    started = last_log = time.perf_counter()
    for start in range(0, len(query_codes), chunk_size):
        stop = min(start + chunk_size, len(query_codes))
        rankings = [
            rank_query(query_codes[q], query_words[q], db_codes, db_words, k, levels) for q in range(start, stop)
        ]
        ranked, joint = (np.stack(parts) for parts in zip(*rankings))
        _add_chunk(totals, ranked, joint)
        if time.perf_counter() - last_log >= progress_seconds or stop == len(query_codes):
            last_log = time.perf_counter()
            rate = stop / max(last_log - started, 1e-9)
            logger.info(
                "evaluate: %d/%d queries (%.0f queries/s, ~%.0f s left)",
                stop,
                len(query_codes),
                rate,
                (len(query_codes) - stop) / rate,
            )
    return _summary(totals, bits=bits, k=k, curve_points=curve_points)


def random_codes_map(
    query_words: np.ndarray, db_words: np.ndarray, *, bits: int, topk: int, max_queries: int = 200, seed: int = 0
) -> float:
    """mAP@K of random codes on the same labels: the chance level a trained model must beat.

    It depends on the label statistics (how many database items share a label
    with a query), so it is reported next to every mAP. A sample of the queries
    keeps its cost small on large databases.
    """
    rng = np.random.default_rng(seed)
    sample = query_words[:max_queries]
    random_query = rng.integers(0, 256, (len(sample), bits // 8), dtype=np.uint8)
    random_db = rng.integers(0, 256, (len(db_words), bits // 8), dtype=np.uint8)
    return evaluate_codes(random_query, sample, random_db, db_words, topk=topk, progress_seconds=float("inf"))["mAP"]


def _summary(totals: _Totals, *, bits: int, k: int, curve_points: int) -> dict[str, Any]:
    """Means over queries, in the metrics.json layout, and each query's own figures under ``per_query``.

    The per-query figures are what confidence intervals and paired comparisons
    of two models need (the same queries ranked by each).
    """
    mean = 1.0 / max(totals.queries, 1)
    scalars = {key: value * mean for key, value in totals.scalars.items()}
    keep = np.unique(np.linspace(1, k, num=min(curve_points, k)).round().astype(int))
    return {
        "bits": bits,
        "topk": k,
        "queries": totals.queries,
        **scalars,
        "per_query": {key: np.concatenate(parts) if parts else np.zeros(0) for key, parts in totals.per_query.items()},
        "curves": {
            "hamming_radius": {
                "radius": list(range(bits + 1)),
                "precision": (totals.radius_precision * mean).tolist(),
                "recall": (totals.radius_recall * mean).tolist(),
            },
            "top_n": {
                "n": keep.tolist(),
                "precision": (totals.top_precision[keep - 1] * mean).tolist(),
                "recall": (totals.top_recall[keep - 1] * mean).tolist(),
            },
        },
    }


def mean_average_precision(
    query_codes: np.ndarray,
    query_words: np.ndarray,
    db_codes: np.ndarray,
    db_words: np.ndarray,
    topk: int | None = None,
) -> float:
    """mAP@K alone, K the whole database unless given: training's per-epoch validation figure."""
    k = len(db_codes) if topk is None else topk
    return float(
        evaluate_codes(query_codes, query_words, db_codes, db_words, topk=k, progress_seconds=float("inf"))["mAP"]
    )
