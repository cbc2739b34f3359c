"""Evaluation metrics against brute-force references, and the evaluate command."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contracts.codes import codes_schema, write_manifest
from hashray.cli import main
from models.codes import pack_codes, unpack_codes
from models.errors import HashrayError
from models.metrics import (
    average_cumulative_gain,
    average_precision,
    evaluate_codes,
    ideal_levels,
    label_words,
    ndcg,
    random_codes_map,
    weighted_average_precision,
)
from pipelines.evaluate import EvaluateConfig, run

# ---------------------------------------------------------------- brute force


def brute_force(query_codes, query_labels, db_codes, db_labels, k):
    """Every metric by the textbook definitions, one query at a time, no shortcuts."""
    bits = db_codes.shape[1] * 8
    q_bits, db_bits = unpack_codes(query_codes, bits), unpack_codes(db_codes, bits)
    per_query = {"mAP": [], "NDCG": [], "ACG": [], "WAP": [], "P@r2": []}
    for q in range(len(query_codes)):
        distances = (q_bits[q] != db_bits).sum(axis=1)
        shared = np.array([len(set(query_labels[q]) & set(labels)) for labels in db_labels])
        order = np.argsort(distances, kind="stable")[:k]
        r = shared[order]
        hits, precision_sum, acg_sum = 0, 0.0, 0.0
        for i, level in enumerate(r, start=1):
            if level > 0:
                hits += 1
                precision_sum += hits / i
                acg_sum += r[:i].sum() / i
        per_query["mAP"].append(precision_sum / hits if hits else 0.0)
        per_query["WAP"].append(acg_sum / hits if hits else 0.0)
        per_query["ACG"].append(r.mean())
        gain = lambda levels: sum((2.0**g - 1) / math.log2(i + 1) for i, g in enumerate(levels, start=1))  # noqa: E731
        ideal = gain(sorted(shared, reverse=True)[:k])
        per_query["NDCG"].append(gain(r) / ideal if ideal else 0.0)
        within = distances <= 2
        per_query["P@r2"].append((shared[within] > 0).sum() / within.sum() if within.any() else 0.0)
    return {key: float(np.mean(values)) for key, values in per_query.items()}, per_query


def random_case(seed: int, *, queries: int, database: int, bits: int, classes: int):
    rng = np.random.default_rng(seed)
    labels = lambda n: [sorted(set(rng.integers(0, classes, size=rng.integers(1, 4)).tolist())) for _ in range(n)]  # noqa: E731
    query_codes = pack_codes(rng.standard_normal((queries, bits)))
    db_codes = pack_codes(rng.standard_normal((database, bits)))
    return query_codes, labels(queries), db_codes, labels(database)


def words(labels, classes):
    return label_words([len(row) for row in labels], [c for row in labels for c in row], classes)


# ---------------------------------------------------------------- per-query functions


@pytest.mark.parametrize("seed", range(5))
def test_single_list_metrics_match_loops(seed):
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, 4, size=30) * (rng.random(30) < 0.5)
    hits = np.cumsum(levels > 0)
    expected_ap = np.mean([hits[i] / (i + 1) for i in range(30) if levels[i] > 0]) if hits[-1] else 0.0
    expected_wap = np.mean([levels[: i + 1].mean() for i in range(30) if levels[i] > 0]) if hits[-1] else 0.0
    assert average_precision(levels > 0) == pytest.approx(expected_ap)
    assert weighted_average_precision(levels) == pytest.approx(expected_wap)
    assert average_cumulative_gain(levels) == pytest.approx(levels.mean())


def test_metrics_work_row_wise_on_blocks():
    rng = np.random.default_rng(1)
    block = rng.integers(0, 3, size=(6, 12))
    for function in (average_cumulative_gain, weighted_average_precision):
        np.testing.assert_allclose(function(block), [function(row) for row in block])
    np.testing.assert_allclose(average_precision(block > 0), [average_precision(row > 0) for row in block])


def test_ideal_levels_and_ndcg_edge_cases():
    # 1 item at level 2, 3 items at level 1, 5 at level 0.
    np.testing.assert_array_equal(ideal_levels(np.array([5, 3, 1]), 6), [2, 1, 1, 1, 0, 0])
    assert ndcg(np.array([2, 1, 1]), ideal_levels(np.array([5, 3, 1]), 3)) == pytest.approx(1.0)
    assert ndcg(np.array([0, 0, 0]), ideal_levels(np.array([9, 0, 0]), 3)) == 0.0  # nothing relevant anywhere
    assert average_precision(np.zeros(5, bool)) == 0.0
    assert weighted_average_precision(np.zeros(5)) == 0.0


# ---------------------------------------------------------------- whole ranking vs brute force


@pytest.mark.parametrize(
    "seed, bits, k, chunk_size",
    [(0, 8, 7, 3), (1, 8, 200, 64), (2, 16, 25, 1), (3, 24, 40, 5)],
)
def test_evaluate_codes_matches_brute_force(seed, bits, k, chunk_size):
    """8-bit codes over 120 items tie massively, also at the K boundary."""
    classes = 6
    query_codes, query_labels, db_codes, db_labels = random_case(
        seed, queries=13, database=120, bits=bits, classes=classes
    )
    metrics = evaluate_codes(
        query_codes, words(query_labels, classes), db_codes, words(db_labels, classes), topk=k, chunk_size=chunk_size
    )
    expected, expected_per_query = brute_force(query_codes, query_labels, db_codes, db_labels, min(k, 120))
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
        np.testing.assert_allclose(metrics["per_query"][key], expected_per_query[key], atol=1e-12, err_msg=key)
    assert metrics["topk"] == min(k, 120) and metrics["bits"] == bits


def test_curves_are_consistent():
    classes = 5
    query_codes, query_labels, db_codes, db_labels = random_case(7, queries=10, database=80, bits=16, classes=classes)
    metrics = evaluate_codes(query_codes, words(query_labels, classes), db_codes, words(db_labels, classes), topk=80)
    radius, top_n = metrics["curves"]["hamming_radius"], metrics["curves"]["top_n"]
    assert radius["radius"] == list(range(17))
    assert radius["recall"][-1] == pytest.approx(1.0)  # radius = bits retrieves everything
    assert np.all(np.diff(radius["recall"]) >= -1e-12)
    assert metrics["P@r2"] == pytest.approx(radius["precision"][2])
    assert top_n["n"][0] == 1 and top_n["n"][-1] == 80
    assert top_n["recall"][-1] == pytest.approx(1.0)  # K = whole database


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(3)
    outputs = rng.standard_normal((17, 48))
    packed = pack_codes(outputs)
    assert packed.shape == (17, 6) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_codes(packed, 48), np.where(outputs > 0, 1, -1))
    np.testing.assert_array_equal(pack_codes(unpack_codes(packed, 48)), packed)


# ---------------------------------------------------------------- the command on codes dirs


def write_codes_dir(path, codes, labels, *, model="run-a", split="query"):
    bits = codes.shape[1] * 8
    table = pa.table(
        {
            "id": [f"{split}-{i}" for i in range(len(codes))],
            "code": pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(bits // 8), len(codes), [None, pa.py_buffer(codes.tobytes())]
            ),
            "labels": pa.array(labels, type=pa.list_(pa.int32())),
        },
        schema=codes_schema(bits),
    )
    path.mkdir(parents=True)
    half = len(codes) // 2  # two files: file order is database order
    pq.write_table(table.slice(0, half), path / "part-0.parquet")
    pq.write_table(table.slice(half), path / "part-1.parquet")
    write_manifest(str(path), bits=bits, count=len(codes), model=model, dataset="data", split=split)
    return str(path)


def test_run_writes_metrics_and_plots(tmp_path, capsys):
    classes = 6
    query_codes, query_labels, db_codes, db_labels = random_case(4, queries=9, database=50, bits=16, classes=classes)
    query = write_codes_dir(tmp_path / "q", query_codes, query_labels)
    database = write_codes_dir(tmp_path / "db", db_codes, db_labels, split="database")
    out = tmp_path / "eval"
    assert main(["evaluate", "--query", query, "--database", database, "--out", str(out), "--topk", "20"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    expected, expected_per_query = brute_force(query_codes, query_labels, db_codes, db_labels, 20)
    for key in ("bits", "topk", "mAP", "NDCG", "ACG", "WAP", "P@r2"):
        assert key in metrics
    assert metrics["mAP"] == pytest.approx(expected["mAP"])
    # Each query's own figures, by id, for intervals and paired comparisons.
    per_query = pq.read_table(out / "per_query.parquet").to_pydict()
    assert per_query["id"] == [f"query-{i}" for i in range(9)]
    np.testing.assert_allclose(per_query["mAP"], expected_per_query["mAP"], atol=1e-12)
    assert "per_query" not in metrics
    # Code health of the database codes, in metrics.json and in the printed table.
    assert metrics["database"] == 50 and metrics["distinct_codes"] == len({bytes(row) for row in db_codes})
    assert 0.0 < metrics["bit_entropy"] <= 1.0 and metrics["largest_bucket"] >= 1
    assert (out / "pr_hamming.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "top_n.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "mAP" in printed and f"codes  {metrics['distinct_codes']} distinct of 50" in printed
    # K larger than the database is clipped.
    assert run(EvaluateConfig(query=query, database=database, out=str(out), topk=10_000))["topk"] == 50


def test_bad_inputs_are_refused(tmp_path, capsys):
    query_codes, query_labels, db_codes, db_labels = random_case(5, queries=4, database=10, bits=16, classes=4)
    query = write_codes_dir(tmp_path / "q", query_codes, query_labels)
    wide_db = write_codes_dir(tmp_path / "db32", np.repeat(db_codes, 2, axis=1), db_labels, split="database")
    with pytest.raises(HashrayError, match="code lengths differ"):
        run(EvaluateConfig(query=query, database=wide_db, out=str(tmp_path / "e")))
    incomplete = write_codes_dir(tmp_path / "db", db_codes, db_labels, split="database")
    (tmp_path / "db" / "manifest.json").unlink()
    assert main(["evaluate", "--query", query, "--database", incomplete, "--out", str(tmp_path / "e")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    with pytest.raises(HashrayError, match="at least 1"):
        run(EvaluateConfig(query=query, database=wide_db, out=str(tmp_path / "e"), topk=0))
    assert not (tmp_path / "e").exists()


def test_random_codes_map_is_the_share_of_relevant_items():
    """Random codes rank at random, so their mAP is about the fraction of relevant database items."""
    rng = np.random.default_rng(1)
    query_words = np.ones((200, 1), dtype=np.uint64)  # every query has class 0
    relevant = rng.random(4000) < 0.3
    db_words = np.where(relevant, 1, 2).astype(np.uint64).reshape(-1, 1)  # class 0 or class 1
    chance = random_codes_map(query_words, db_words, bits=64, topk=4000)
    assert abs(chance - relevant.mean()) < 0.03
    everyone = random_codes_map(query_words, np.ones((500, 1), dtype=np.uint64), bits=64, topk=500)
    assert everyone == pytest.approx(1.0)
