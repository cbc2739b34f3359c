"""Retrieval evaluation: Hamming ranking of query codes against database codes.

Pure numpy on the driver. Each query is ranked against the whole database on
its own (a few database-length vectors at a time), and its results are scored
in chunks of queries, so memory grows with the database and with chunk x K,
never with queries x database: 10k queries against 1M codes is fine. For every
query we keep only what the metrics need: the graded relevance of its top K
(ranked with ``models.codes.topk_by_hamming``, ties by database position) and a
joint histogram of (Hamming distance, shared labels) over the whole database,
from which the Hamming-radius curves, recall and the ideal DCG follow.

Per-query metric functions work on the last axis, so they take one ranked
list or a (queries, K) block alike; tests compare them with brute force.
"""
from __future__ import annotations

import argparse
import io
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.codes import hamming_distances, topk_by_hamming
from models.errors import HashrayError
from pipelines import contracts

logger = logging.getLogger(__name__)

METRICS_JSON = "metrics.json"
PR_CURVE_PNG = "pr_hamming.png"
TOP_N_PNG = "top_n.png"
SUMMARY_KEYS = ("mAP", "NDCG", "ACG", "WAP", "P@r2")
# "P@r2": precision of a Hamming-radius-2 lookup, the literature's hash-table figure.
LOOKUP_RADIUS = 2


@dataclass(frozen=True)
class EvaluateConfig:
    """Inputs of ``hashray evaluate``.

    Args:
        query: codes dir of the queries.
        database: codes dir of the database.
        out: where metrics.json and the PNG curves go.
        topk: K of the @K metrics; clipped to the database size.
        chunk_size: queries scored together; memory grows with chunk_size x topk,
            never with the database size (distances are kept for one query at a time).
        curve_points: how many N values the precision@N / recall@N curves keep.
        progress_seconds: at most one progress line per this many seconds.
    """

    query: str
    database: str
    out: str
    topk: int = 5000
    chunk_size: int = 256
    curve_points: int = 100
    progress_seconds: float = 10.0


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


def label_words(labels: pa.Array | pa.ChunkedArray, num_classes: int) -> np.ndarray:
    """Class-index lists -> (n, ceil(C/64)) uint64 bit sets, so overlaps are popcounts."""
    if isinstance(labels, pa.ChunkedArray):
        labels = labels.combine_chunks()
    lengths = labels.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    values = labels.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.repeat(np.arange(len(labels)), lengths)
    words = np.zeros((len(labels), max(1, -(-num_classes // 64))), dtype=np.uint64)
    np.bitwise_or.at(words, (rows, values // 64), np.left_shift(np.uint64(1), (values % 64).astype(np.uint64)))
    return words


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
    totals = _Totals({key: 0.0 for key in SUMMARY_KEYS}, np.zeros(bits + 1), np.zeros(bits + 1), np.zeros(k), np.zeros(k))
    started = last_log = time.perf_counter()
    for start in range(0, len(query_codes), chunk_size):
        stop = min(start + chunk_size, len(query_codes))
        rankings = [rank_query(query_codes[q], query_words[q], db_codes, db_words, k, levels) for q in range(start, stop)]
        ranked, joint = (np.stack(parts) for parts in zip(*rankings))
        _add_chunk(totals, ranked, joint)
        if time.perf_counter() - last_log >= progress_seconds or stop == len(query_codes):
            last_log = time.perf_counter()
            rate = stop / max(last_log - started, 1e-9)
            logger.info("evaluate: %d/%d queries (%.0f queries/s, ~%.0f s left)", stop, len(query_codes), rate, (len(query_codes) - stop) / rate)
    return _summary(totals, bits=bits, k=k, curve_points=curve_points)


def random_codes_map(query_words: np.ndarray, db_words: np.ndarray, *, bits: int, topk: int,
                     max_queries: int = 200, seed: int = 0) -> float:
    """mAP@K of random codes on the same labels: the chance level a trained model must beat.

    It depends on the label statistics (how many database items share a label
    with a query), so it is reported next to every mAP. A sample of the queries
    keeps its cost small on large databases.
    """
    rng = np.random.default_rng(seed)
    sample = query_words[: max_queries]
    random_query = rng.integers(0, 256, (len(sample), bits // 8), dtype=np.uint8)
    random_db = rng.integers(0, 256, (len(db_words), bits // 8), dtype=np.uint8)
    return evaluate_codes(random_query, sample, random_db, db_words, topk=topk, progress_seconds=float("inf"))["mAP"]


def _summary(totals: _Totals, *, bits: int, k: int, curve_points: int) -> dict[str, Any]:
    """Means over queries, in the metrics.json layout."""
    mean = 1.0 / max(totals.queries, 1)
    scalars = {key: value * mean for key, value in totals.scalars.items()}
    keep = np.unique(np.linspace(1, k, num=min(curve_points, k)).round().astype(int))
    return {
        "bits": bits,
        "topk": k,
        "queries": totals.queries,
        **scalars,
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


# ---------------------------------------------------------------- driver


def _load(codes_uri: str) -> tuple[dict[str, Any], np.ndarray, pa.ChunkedArray]:
    """A complete codes dir as (manifest, packed codes, labels column)."""
    manifest, table = contracts.read_codes(codes_uri)
    codes = contracts.codes_matrix(table)
    if codes.shape[1] * 8 != manifest["bits"]:
        raise HashrayError(f"{codes_uri}: manifest says {manifest['bits']} bits but codes are {codes.shape[1] * 8} bits wide")
    if len(codes) == 0:
        raise HashrayError(f"{codes_uri}: holds no codes")
    return manifest, codes, table.column("labels")


def _num_classes(*label_columns: pa.ChunkedArray) -> int:
    """Enough classes for every label seen (codes dirs do not carry the class list)."""
    return 1 + max(int(pc.max(pc.list_flatten(column)).as_py() or 0) for column in label_columns)


def _check_pair(cfg: EvaluateConfig, query_manifest: dict[str, Any], db_manifest: dict[str, Any]) -> None:
    """Query and database codes must be comparable: same length, ideally the same model."""
    if query_manifest["bits"] != db_manifest["bits"]:
        raise HashrayError(
            f"code lengths differ: {cfg.query} has {query_manifest['bits']}-bit codes, {cfg.database} has "
            f"{db_manifest['bits']}-bit codes; encode both with the same model"
        )
    # The checksum when encode wrote one: the same weights under two paths are the same model.
    key = "model_sha256" if "model_sha256" in query_manifest and "model_sha256" in db_manifest else "model"
    if query_manifest.get(key) != db_manifest.get(key):
        logger.warning("query and database codes come from different models (%s vs %s)", query_manifest.get("model"), db_manifest.get("model"))


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate query codes against database codes; write metrics.json and the PNG curves."""
    if cfg.topk < 1:
        raise HashrayError(f"--topk must be at least 1, got {cfg.topk}")
    query_manifest, query_codes, query_labels = _load(cfg.query)
    db_manifest, db_codes, db_labels = _load(cfg.database)
    _check_pair(cfg, query_manifest, db_manifest)
    num_classes = _num_classes(query_labels, db_labels)
    logger.info("evaluate: %d queries against %d codes of %d bits, K=%d", len(query_codes), len(db_codes), query_manifest["bits"], min(cfg.topk, len(db_codes)))
    query_words, db_words = label_words(query_labels, num_classes), label_words(db_labels, num_classes)
    metrics = evaluate_codes(
        query_codes,
        query_words,
        db_codes,
        db_words,
        topk=cfg.topk,
        chunk_size=cfg.chunk_size,
        curve_points=cfg.curve_points,
        progress_seconds=cfg.progress_seconds,
    )
    metrics["mAP_random"] = random_codes_map(query_words, db_words, bits=metrics["bits"], topk=cfg.topk)
    metrics.update(query_codes=cfg.query, database_codes=cfg.database, model=db_manifest.get("model"), created=contracts.now_iso())
    contracts.write_json(contracts.join(cfg.out, METRICS_JSON), metrics)
    write_plots(cfg.out, metrics)
    return metrics


def write_plots(out_uri: str, metrics: dict[str, Any]) -> None:
    """PR curve over Hamming radii and precision/recall@N, as PNGs next to metrics.json."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    radius, top_n = metrics["curves"]["hamming_radius"], metrics["curves"]["top_n"]
    figure, axis = plt.subplots(figsize=(5, 4))
    axis.plot(radius["recall"], radius["precision"], marker=".")
    axis.set(xlabel="recall", ylabel="precision", title=f"PR over Hamming radius 0..{metrics['bits']}", xlim=(0, 1), ylim=(0, 1.02))
    _save_figure(figure, contracts.join(out_uri, PR_CURVE_PNG))
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    left.plot(top_n["n"], top_n["precision"])
    left.set(xlabel="N", ylabel="precision@N", ylim=(0, 1.02))
    right.plot(top_n["n"], top_n["recall"])
    right.set(xlabel="N", ylabel="recall@N", ylim=(0, 1.02))
    _save_figure(figure, contracts.join(out_uri, TOP_N_PNG))


def _save_figure(figure: Any, uri: str) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    contracts.write_bytes(uri, buffer.getvalue())


def format_table(metrics: dict[str, Any]) -> str:
    """The short table the command prints."""
    header = f"{metrics['queries']} queries, {metrics['bits']} bits, K={metrics['topk']}"
    lines = [header] + [f"  {name:<6} {metrics[name]:.4f}" for name in SUMMARY_KEYS]
    if "mAP_random" in metrics:
        lines[1] += f"   (random codes: {metrics['mAP_random']:.4f})"
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="mAP/NDCG/ACG/WAP@K and PR curves of query codes against database codes")
    parser.add_argument("--query", required=True, help="codes dir of the queries (from `hashray encode --split query`)")
    parser.add_argument("--database", required=True, help="codes dir of the database (from `hashray encode --split database`)")
    parser.add_argument("--out", required=True, help="output dir for metrics.json and the PNG curves")
    parser.add_argument("--topk", type=int, default=EvaluateConfig.topk, help="K of the @K metrics (clipped to the database size)")
    parser.add_argument("--chunk-size", type=int, default=EvaluateConfig.chunk_size, help="queries scored together (memory ~ chunk size x topk)")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    cfg = EvaluateConfig(query=args.query, database=args.database, out=args.out, topk=args.topk, chunk_size=args.chunk_size)
    print(format_table(run(cfg)))
    return 0
