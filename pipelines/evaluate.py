"""``hashray evaluate``: Hamming ranking of query codes against database codes, scored on the driver.

Reads the two codes dirs (each opened once, :class:`contracts.codes.CodesDir`),
checks that they are comparable, scores them with :mod:`models.metrics` (the
one implementation of mAP/NDCG/ACG/WAP/P@r2 and the curves, shared with
training's validation and the benches) and writes ``metrics.json`` and the
PNG curves. Memory grows with the database and with chunk x K, never with
queries x database.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from contracts.codes import CodesDir, codes_matrix, label_sets
from contracts.fs import join, now_iso, write_bytes, write_json, write_table
from models.errors import HashrayError
from models.health import code_health, format_health
from models.metrics import SUMMARY_KEYS, evaluate_codes, random_codes_map

logger = logging.getLogger(__name__)

METRICS_JSON = "metrics.json"
# Each query's own figures (id + every SUMMARY_KEYS metric), for intervals and paired comparisons.
PER_QUERY_PARQUET = "per_query.parquet"
PR_CURVE_PNG = "pr_hamming.png"
TOP_N_PNG = "top_n.png"


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


# ---------------------------------------------------------------- driver


def _load(codes: CodesDir) -> tuple[np.ndarray, pa.ChunkedArray, pa.ChunkedArray]:
    """A complete codes dir as (packed codes, labels column, ids)."""
    table = codes.read(columns=("id", "code", "labels"))
    matrix = codes_matrix(table)
    if matrix.shape[1] * 8 != codes.bits:
        raise HashrayError(
            f"{codes.uri}: manifest says {codes.bits} bits but codes are {matrix.shape[1] * 8} bits wide"
        )
    if len(matrix) == 0:
        raise HashrayError(f"{codes.uri}: holds no codes")
    return matrix, table.column("labels"), table.column("id")


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
        logger.warning(
            "query and database codes come from different models (%s vs %s)",
            query_manifest.get("model"),
            db_manifest.get("model"),
        )


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate query codes against database codes; write metrics.json and the PNG curves."""
    if cfg.topk < 1:
        raise HashrayError(f"--topk must be at least 1, got {cfg.topk}")
    query, database = CodesDir.open(cfg.query), CodesDir.open(cfg.database)
    query_codes, query_labels, query_ids = _load(query)
    db_codes, db_labels, _ = _load(database)
    _check_pair(cfg, query.manifest, database.manifest)
    num_classes = _num_classes(query_labels, db_labels)
    logger.info(
        "evaluate: %d queries against %d codes of %d bits, K=%d",
        len(query_codes),
        len(db_codes),
        query.bits,
        min(cfg.topk, len(db_codes)),
    )
    query_words, db_words = label_sets(query_labels, num_classes), label_sets(db_labels, num_classes)
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
    metrics.update(database=len(db_codes), **code_health(db_codes, db_words))
    metrics.update(
        query_codes=cfg.query, database_codes=cfg.database, model=database.manifest.get("model"), created=now_iso()
    )
    per_query = pa.table({"id": query_ids, **metrics.pop("per_query")})
    write_table(join(cfg.out, PER_QUERY_PARQUET), per_query)
    write_json(join(cfg.out, METRICS_JSON), metrics)
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
    axis.set(
        xlabel="recall",
        ylabel="precision",
        title=f"PR over Hamming radius 0..{metrics['bits']}",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    _save_figure(figure, join(out_uri, PR_CURVE_PNG))
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    left.plot(top_n["n"], top_n["precision"])
    left.set(xlabel="N", ylabel="precision@N", ylim=(0, 1.02))
    right.plot(top_n["n"], top_n["recall"])
    right.set(xlabel="N", ylabel="recall@N", ylim=(0, 1.02))
    _save_figure(figure, join(out_uri, TOP_N_PNG))


def _save_figure(figure: Any, uri: str) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_bytes(uri, buffer.getvalue())


def format_table(metrics: dict[str, Any]) -> str:
    """The short table the command prints."""
    header = f"{metrics['queries']} queries, {metrics['bits']} bits, K={metrics['topk']}"
    lines = [header] + [f"  {name:<6} {metrics[name]:.4f}" for name in SUMMARY_KEYS]
    if "mAP_random" in metrics:
        lines[1] += f"   (random codes: {metrics['mAP_random']:.4f})"
    if "distinct_codes" in metrics:
        lines += format_health(metrics, metrics["database"])
    return "\n".join(lines)
