"""The in-process side of bench/serve_load.py: faiss alone on the served codes, exactness, radius search.

What a user would run instead of ``hashray serve``: one faiss
``IndexBinaryFlat`` over the same codes in their own process, searched with
the same batches the ingress sends its shards. The served answers are checked
against it, and faiss's multi-index hashing and the shards' own scan are
timed against faiss's flat scan for radius queries. Only :func:`shard_search`
and :func:`multihash_vs_flat` touch the serving code.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import faiss
import numpy as np

from contracts.codes import CodesDir, codes_matrix
from serve.hamming import HammingScan
from serve.index import ShardIndex, search_shards, slice_bounds

INDEX_ROUNDS = 9
FLIPS = 7  # radius queries: query i is a database code with i % FLIPS bits flipped, so some have neighbours


def read_codes(codes_dir: str) -> np.ndarray:
    """The ``code`` column of a codes dir as (n, bits/8) uint8, read through the contract's reader."""
    return codes_matrix(CodesDir.open(codes_dir).read(columns=("code",)))


def flat_index(codes: np.ndarray) -> faiss.IndexBinaryFlat:
    """One faiss IndexBinaryFlat over all codes, as a user would build it (faiss's defaults)."""
    flat = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    flat.add(codes)
    return flat


def timed_qps(search: Callable[[np.ndarray], object], queries: np.ndarray, batch: int, seconds: float) -> float:
    """Queries per second of ``search`` on consecutive batches of ``batch`` queries, for about ``seconds``."""
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        at = done % (len(queries) - batch + 1)
        search(queries[at : at + batch])
        done += batch
    return done / (time.perf_counter() - started)


def faiss_alone(
    flat: faiss.IndexBinaryFlat,
    queries: np.ndarray,
    *,
    batch: int,
    k: int,
    seconds: float,
    threads: list[int],
    rounds: int = 5,
) -> dict[int, float]:
    """QPS of ``flat.search(batch queries, k)`` per faiss thread count: the served search without the server.

    The thread counts alternate in ``rounds`` rounds and the median round
    counts: on a shared machine a burst of load on one core stalls faiss's
    OpenMP threads at every barrier, and it should hit every count alike.
    """
    qps: dict[int, list[float]] = {count: [] for count in threads}
    for _ in range(rounds):
        for count in threads:
            faiss.omp_set_num_threads(count)
            qps[count].append(timed_qps(lambda q: flat.search(q, k), queries, batch, seconds / rounds))
    return {count: float(np.median(values)) for count, values in qps.items()}


def shard_search(codes: np.ndarray, shards: int, k: int, threads: int) -> Callable[[np.ndarray], object]:
    """Our shard logic in-process: ``shards`` ShardIndex slices + exact merge (the only use of serve/index.py)."""
    parts = [ShardIndex(codes[a:b], start=a, threads=threads) for a, b in slice_bounds(len(codes), shards)]
    return lambda queries: search_shards(parts, queries, k)


def ours_vs_faiss(
    ours: Callable[[np.ndarray], object], theirs: Callable[[np.ndarray], object], queries: np.ndarray, batch: int
) -> tuple[float, float]:
    """ms per batch of ours and of faiss, alternating in rounds (median round), so a burst of load hits both alike."""
    rounds: tuple[list[float], list[float]] = ([], [])
    for chunk in np.array_split(queries, INDEX_ROUNDS):
        for times, search in zip(rounds, (ours, theirs)):
            started = time.perf_counter()
            for at in range(0, len(chunk), batch):
                search(chunk[at : at + batch])
            times.append((time.perf_counter() - started) / max(1, len(chunk) // batch) * 1000)
    return float(np.median(rounds[0])), float(np.median(rounds[1]))


def expected_hits(flat: faiss.IndexBinaryFlat, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k (positions, distances) under hashray's rule: smaller distance, then smaller position.

    faiss's own top-k settles ties at the k-th distance its own way, so every
    item within that distance is fetched (its radius is exclusive) and ranked here.
    """
    distances, _ = flat.search(query[None, :], k)
    kth = int(distances[0, -1])
    _, within, positions = flat.range_search(query[None, :], kth + 1)
    order = np.lexsort((positions, within))[:k]
    return positions[order], within[order].astype(np.int32)


def mismatches(
    flat: faiss.IndexBinaryFlat, codes: np.ndarray, answers: dict[int, tuple[list[int], list[int]]], k: int
) -> list[str]:
    """Served answers (query position -> (result positions, distances)) that differ from brute force."""
    wrong = []
    for position, (served, distances) in answers.items():
        want, want_distances = expected_hits(flat, codes[position], k)
        if distances != want_distances.tolist() or served != want.tolist():
            wrong.append(
                f"query {position}: served {list(zip(served, distances))} expected {list(zip(want, want_distances))}"
            )
    return wrong


def radius_queries(codes: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` database codes, the i-th with i % FLIPS random bits flipped."""
    rng = np.random.default_rng(seed)
    queries = np.unpackbits(codes[rng.integers(0, len(codes), size=count)], axis=1)
    for row in range(count):
        flip = rng.choice(queries.shape[1], size=row % FLIPS, replace=False)
        queries[row, flip] ^= 1
    return np.packbits(queries, axis=1)


def range_sets(index: faiss.IndexBinary, queries: np.ndarray, radius: int) -> list[set[tuple[int, int]]]:
    """(position, distance) of every item at distance <= radius, per query (faiss's radius is exclusive)."""
    lims, distances, positions = index.range_search(queries, radius + 1)
    return [set(zip(positions[a:b].tolist(), distances[a:b].tolist())) for a, b in zip(lims[:-1], lims[1:])]


def multihash_vs_flat(
    codes: np.ndarray, queries: np.ndarray, radii: list[int], *, nhash: int, k: int, rounds: int = 3
) -> tuple[float, list[tuple[int, float, float, float, bool]]]:
    """Build seconds of an IndexBinaryMultiHash, and per radius (r, flat, multi-hash and our scan's QPS, all equal).

    ``nhash`` tables of ``bits / nhash`` bits each; a radius r is exact with
    ``r // nhash`` flips per table (pigeonhole: one of the nhash substrings is
    within that many bits). Our scan answers as a shard does, the first ``k``
    within the radius (a ``radius`` query of ``GET /search``), so "equal" holds
    where no query has more than ``k`` items within it. Each figure is the best of ``rounds``.
    """
    bits = codes.shape[1] * 8
    flat = flat_index(codes)
    ours = HammingScan(codes, np.arange(len(codes), dtype=np.int64))
    started = time.perf_counter()
    multi = faiss.IndexBinaryMultiHash(bits, nhash, bits // nhash)
    multi.add(codes)
    build_s = time.perf_counter() - started
    rows = []
    for radius in radii:
        multi.nflip = radius // nhash
        searches = [lambda index=index: index.range_search(queries, radius + 1) for index in (flat, multi)]
        searches.append(lambda: ours.search(queries, k, radius))
        qps = [len(queries) / min(_seconds(search) for _ in range(rounds)) for search in searches]
        want = range_sets(flat, queries, radius)
        scanned = [set(zip(rows_.tolist(), distances.tolist())) for distances, rows_ in ours.search(queries, k, radius)]
        rows.append((radius, *qps, want == range_sets(multi, queries, radius) == scanned))
    return build_s, rows


def _seconds(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started
