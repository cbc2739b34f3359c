"""Exact Hamming top-k over packed codes: one compiled scan that skips what cannot rank.

faiss's ``IndexBinaryFlat`` computes one popcount per code and query, one
code at a time. This scan keeps the codes as unsigned words, one contiguous
array per word, so the compiler can take many codes per instruction
(AVX-512 ``vpopcntq`` where the CPU has it), and reads the codes in blocks
that stay in cache while every query of a batch passes over them. For each
query and block it first takes only the smallest distance; a block whose
smallest distance cannot enter that query's top-k so far is skipped without
writing anything, which after the first few blocks is almost every block.

Exact under hashray's ranking rule -- smaller distance first, then smaller
global database position -- ties included: a candidate is kept while
(distance, position) is below the k-th kept one, so no tie margin is needed.
Plain numpy and numba (compiled on first use and cached on disk), no Ray.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

# Codes per block: 512 words of 8 bytes (4 KiB) stay in L1 while a batch of queries passes over them.
BLOCK = 512
# Candidates a query keeps before it prunes back to its k best (never fewer than this).
MIN_CANDIDATES = 256
NO_BOUND = np.iinfo(np.int64).max


@intrinsic
def _popcount(typingctx, word):
    """Set bits of an unsigned word: LLVM's ctpop, which vectorises (``vpopcntq`` on AVX-512 machines)."""
    if not isinstance(word, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return word(word), codegen


def word_dtype(code_bytes: int) -> tuple[np.dtype, int]:
    """(unsigned word type, words per code) that hold ``code_bytes``-byte codes with zero padding.

    Codes of up to 8 bytes take one word of the next power-of-two size
    (3 bytes -> uint32); longer ones take ceil(bytes / 8) uint64 words.
    Padding bytes are zero in codes and queries alike, so distances do not change.
    """
    if code_bytes <= 8:
        size = 1 << max(0, math.ceil(math.log2(max(code_bytes, 1))))
        return np.dtype(f"uint{size * 8}"), 1
    return np.dtype(np.uint64), -(-code_bytes // 8)


def to_words(codes: np.ndarray) -> np.ndarray:
    """Packed (n, bytes) uint8 codes -> (words per code, n) unsigned words, each word's row contiguous."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    dtype, count = word_dtype(codes.shape[1])
    padded = np.zeros((len(codes), count * dtype.itemsize), dtype=np.uint8)
    padded[:, : codes.shape[1]] = codes
    return np.ascontiguousarray(padded.view(dtype).T)


def from_words(words: np.ndarray, row: int, code_bytes: int) -> np.ndarray:
    """The packed (bytes,) uint8 code of ``row``: :func:`to_words` undone for one row."""
    return np.ascontiguousarray(words[:, row]).view(np.uint8)[:code_bytes].copy()


@njit(nogil=True, cache=True, boundscheck=False)
def _block_distances(words, start, stop, queries, query, scratch):
    """Distances from ``query`` to rows [start, stop) into ``scratch[: stop - start]``.

    Each loop runs over a slice from index 0: numba then knows no index is
    negative and leaves out its wrap-around check, which would stop LLVM from
    vectorising (7x slower).
    """
    size = stop - start
    column = words[0, start:stop]
    word = queries[0, query]
    for i in range(size):
        scratch[i] = np.int64(_popcount(column[i] ^ word))
    for w in range(1, words.shape[0]):
        column = words[w, start:stop]
        word = queries[w, query]
        for i in range(size):
            scratch[i] += np.int64(_popcount(column[i] ^ word))


@njit(nogil=True, cache=True, boundscheck=False)
def _block_minimum(words, start, stop, queries, query, scratch):
    """The smallest distance from ``query`` to rows [start, stop): the hot loop, nothing written for one-word codes."""
    if words.shape[0] == 1:
        column = words[0, start:stop]
        word = queries[0, query]
        low = _popcount(column[0] ^ word)
        for i in range(1, column.shape[0]):
            low = min(low, _popcount(column[i] ^ word))
        return np.int64(low)
    _block_distances(words, start, stop, queries, query, scratch)
    low = scratch[0]
    for i in range(1, stop - start):
        low = min(low, scratch[i])
    return low


@njit(nogil=True, cache=True, boundscheck=False)
def _prune(kept_distances, kept_rows, fill, positions, k, max_distance):
    """Keep the ``k`` best of ``fill`` candidates by (distance, position); returns (k-th distance, its position)."""
    counts = np.zeros(max_distance + 1, np.int64)
    for i in range(fill):
        counts[kept_distances[i]] += 1
    below = 0
    kth = 0
    while below + counts[kth] < k:
        below += counts[kth]
        kth += 1
    tied = np.empty(counts[kth], np.int64)
    tied_positions = np.empty(counts[kth], np.int64)
    t = 0
    out = 0
    for i in range(fill):
        if kept_distances[i] < kth:
            kept_distances[out] = kept_distances[i]
            kept_rows[out] = kept_rows[i]
            out += 1
        elif kept_distances[i] == kth:
            tied[t] = kept_rows[i]
            tied_positions[t] = positions[kept_rows[i]]
            t += 1
    order = np.argsort(tied_positions)[: k - below]
    for i in order:
        kept_distances[out] = kth
        kept_rows[out] = tied[i]
        out += 1
    return kth, tied_positions[order[-1]]


@njit(nogil=True, cache=True, boundscheck=False)
def _scan(words, positions, queries, k, max_distance):
    """Candidates of every query: (distances, rows, counts); query q's are the first counts[q] of its row.

    A candidate is kept while (distance, position) is below the k-th kept
    one, and at distance <= ``max_distance``; the caller ranks what is kept.
    """
    n = words.shape[1]
    nq = queries.shape[1]
    capacity = max(4 * k, MIN_CANDIDATES)
    kept_distances = np.empty((nq, capacity), np.int64)
    kept_rows = np.empty((nq, capacity), np.int64)
    counts = np.zeros(nq, np.int64)
    limit = np.full(nq, max_distance, np.int64)  # keep d < limit, or d == limit at a position < bound
    bound = np.full(nq, NO_BOUND, np.int64)
    scratch = np.empty(BLOCK, np.int64)
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        for query in range(nq):
            if _block_minimum(words, start, stop, queries, query, scratch) > limit[query]:
                continue
            _block_distances(words, start, stop, queries, query, scratch)
            for i in range(stop - start):
                distance = scratch[i]
                if distance > limit[query]:
                    continue
                row = start + i
                if distance == limit[query] and positions[row] >= bound[query]:
                    continue
                if counts[query] == capacity:
                    kth, kth_position = _prune(
                        kept_distances[query], kept_rows[query], capacity, positions, k, max_distance
                    )
                    limit[query] = kth
                    bound[query] = kth_position
                    counts[query] = k
                    if distance > kth or (distance == kth and positions[row] >= kth_position):
                        continue
                kept_distances[query, counts[query]] = distance
                kept_rows[query, counts[query]] = row
                counts[query] += 1
    return kept_distances, kept_rows, counts


class HammingScan:
    """Exact top-k by (Hamming distance, global position) over packed codes, optionally within a radius.

    Args:
        codes: packed (n, bits/8) uint8 codes; kept only as words (:func:`to_words`).
        positions: the rows' global database positions (unique), which break ties.
        threads: threads that split a batch of queries (the scan releases the GIL).
    """

    def __init__(self, codes: np.ndarray, positions: np.ndarray, threads: int = 1) -> None:
        self.code_bytes = codes.shape[1]
        self.bits = self.code_bytes * 8
        self._words = to_words(codes)
        self._positions = positions
        self._threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self._threads) if self._threads > 1 else None
        if len(self):
            # Compile (or load from numba's disk cache) for these word and position types now,
            # not on the first query a user sends.
            self.search(codes[:1], 1)

    def __len__(self) -> int:
        return self._words.shape[1]

    @property
    def nbytes(self) -> int:
        return self._words.nbytes

    def code(self, row: int) -> np.ndarray:
        """The packed code of local ``row``."""
        return from_words(self._words, row, self.code_bytes)

    def search(self, queries: np.ndarray, k: int, radius: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """(distances int32, local rows int64) of each query's top-k, ranked; with ``radius``, only d <= radius."""
        queries = to_words(queries)
        max_distance = self.bits if radius is None else min(max(radius, -1), self.bits)
        if k <= 0 or len(self) == 0 or max_distance < 0:
            empty = (np.zeros(0, np.int32), np.zeros(0, np.int64))
            return [empty for _ in range(queries.shape[1])]
        chunks = np.array_split(np.arange(queries.shape[1]), min(self._threads, queries.shape[1]))
        if self._pool is None or len(chunks) == 1:
            parts = [self._search(queries, k, max_distance)]
        else:
            parts = list(self._pool.map(lambda rows: self._search(queries[:, rows], k, max_distance), chunks))
        return [result for part in parts for result in part]

    def _search(self, queries: np.ndarray, k: int, max_distance: int) -> list[tuple[np.ndarray, np.ndarray]]:
        queries = np.ascontiguousarray(queries)
        kept_distances, kept_rows, counts = _scan(self._words, self._positions, queries, k, max_distance)
        results = []
        for query, count in enumerate(counts):
            distances, rows = kept_distances[query, :count], kept_rows[query, :count]
            order = np.lexsort((self._positions[rows], distances))[:k]
            results.append((distances[order].astype(np.int32), rows[order]))
        return results
