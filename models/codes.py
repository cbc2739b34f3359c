"""Binary codes: packing sign bits, Hamming distances and the ranking rule.

Every place that ranks codes (evaluation, the serving index) uses
:func:`topk_by_hamming` so that ties are broken the same way everywhere:
smaller distance first, then smaller database position.
"""

from __future__ import annotations

import numpy as np

from models.errors import HashrayError


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is a positive multiple of 8, else raise."""
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or bits <= 0 or bits % 8:
        raise HashrayError(f"bits must be a positive multiple of 8 (8, 16, 24, 32, 48, 64, ...), got {bits!r}")
    return int(bits)


def pack_codes(hash_outputs: np.ndarray) -> np.ndarray:
    """Pack real hash outputs of shape (n, bits) into (n, bits/8) uint8.

    Bit = 1 for a positive output, packed big-endian (``np.packbits``), as the
    codes-dir contract says.
    """
    hash_outputs = np.asarray(hash_outputs)
    if hash_outputs.ndim != 2:
        raise HashrayError(f"hash outputs must be 2-D (n, bits), got shape {hash_outputs.shape}")
    check_bits(hash_outputs.shape[1])
    return np.packbits(hash_outputs > 0, axis=1, bitorder="big")


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unpack (n, bits/8) uint8 codes into (n, bits) int8 values in {-1, +1}."""
    bits01 = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1, count=bits, bitorder="big")
    return bits01.astype(np.int8) * 2 - 1


def _as_words(packed: np.ndarray) -> np.ndarray:
    """View packed codes as the widest unsigned words that divide the row length."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    for dtype in (np.uint64, np.uint32, np.uint16):
        if packed.shape[1] % np.dtype(dtype).itemsize == 0:
            return packed.view(dtype)
    return packed


def hamming_distances(query: np.ndarray, database: np.ndarray) -> np.ndarray:
    """Hamming distances between packed codes: (q, B) x (n, B) -> (q, n) int32."""
    if query.shape[1] != database.shape[1]:
        raise HashrayError(
            f"code lengths differ: query has {query.shape[1] * 8} bits, database has {database.shape[1] * 8}"
        )
    q_words, db_words = _as_words(query), _as_words(database)
    distances = np.zeros((q_words.shape[0], db_words.shape[0]), dtype=np.int32)
    for word in range(q_words.shape[1]):
        distances += np.bitwise_count(q_words[:, word, None] ^ db_words[None, :, word])
    return distances


def topk_by_hamming(distances: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k nearest items of one distance row, ties by position.

    Equivalent to ``np.argsort(distances, kind="stable")[:k]`` but linear in
    the row length: distances are small integers, so the k-th distance is found
    from a histogram and only the items at or below it are sorted.
    """
    distances = np.asarray(distances)
    k = min(int(k), distances.shape[0])
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    counts = np.bincount(distances)
    kth_distance = int(np.searchsorted(np.cumsum(counts), k))
    closer = np.flatnonzero(distances < kth_distance)
    at_boundary = np.flatnonzero(distances == kth_distance)[: k - closer.size]
    chosen = np.concatenate([closer, at_boundary])
    # Stable sort of the chosen positions (already ascending) by distance.
    return chosen[np.argsort(distances[chosen], kind="stable")]
