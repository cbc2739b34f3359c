"""A stable hash of item ids, vectorized over Arrow string arrays: which shard owns an id.

The serving tier partitions the database by ``id_hash(id) % shards``, so the
shard that holds an id's code is known from the id alone, in every process and
on every machine: Python's ``hash()`` is salted per process, so it cannot be
used. The hash is a polynomial over the UTF-8 bytes modulo 2**64, computed with
numpy over the array's offsets and data buffers (no Python loop over rows),
then mixed with the length and a 64-bit finalizer so that the low bits (what
``% shards`` reads) spread evenly.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# An odd 64-bit multiplier (FNV-1's prime) and the finalizer of splitmix64.
PRIME = np.uint64(0x100000001B3)
LENGTH_SALT = np.uint64(0x9E3779B97F4A7C15)
MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
MIX_2 = np.uint64(0x94D049BB133111EB)


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit reaches every output bit (uint64 in, uint64 out)."""
    values = values ^ (values >> np.uint64(30))
    values = values * MIX_1
    values = values ^ (values >> np.uint64(27))
    values = values * MIX_2
    return values ^ (values >> np.uint64(31))


def _string_hashes(array: pa.Array) -> np.ndarray:
    """Hashes of one contiguous string (or large_string) array; a null hashes like ''."""
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        array = array.cast(pa.string())
    if len(array) == 0:
        return np.zeros(0, dtype=np.uint64)
    width = 8 if pa.types.is_large_string(array.type) else 4
    _, offsets_buffer, data_buffer = array.buffers()
    offsets = np.frombuffer(
        offsets_buffer, dtype=np.int64 if width == 8 else np.int32, count=len(array) + 1, offset=array.offset * width
    ).astype(np.int64)
    first, last = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(data_buffer, dtype=np.uint8, count=last - first, offset=first) if last > first else None
    lengths = np.diff(offsets)
    hashes = np.zeros(len(array), dtype=np.uint64)
    if data is not None:
        # Byte j of a string of length L weighs PRIME ** (L - 1 - j): the sum over a
        # string is then a difference of two prefix sums (all modulo 2**64).
        row = np.repeat(np.arange(len(array)), lengths)
        exponent = offsets[1:][row] - first - 1 - np.arange(len(data))
        with np.errstate(over="ignore"):
            powers = np.cumprod(np.concatenate([[np.uint64(1)], np.full(int(lengths.max()), PRIME)]))
            terms = (data.astype(np.uint64) + np.uint64(1)) * powers[exponent]
            prefix = np.concatenate([[np.uint64(0)], np.cumsum(terms, dtype=np.uint64)])
            hashes = prefix[offsets[1:] - first] - prefix[offsets[:-1] - first]
    with np.errstate(over="ignore"):
        return mix64(hashes ^ ((lengths.astype(np.uint64) + np.uint64(1)) * LENGTH_SALT))


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The stable 64-bit hash of every id (uint64), the same in every process and on every machine."""
    if isinstance(ids, pa.ChunkedArray):
        parts = [_string_hashes(chunk) for chunk in ids.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
    return _string_hashes(ids)


def id_hash(item_id: str) -> int:
    """The stable hash of one id: :func:`id_hashes` of a one-element array."""
    return int(id_hashes(pa.array([item_id], pa.string()))[0])


def owners(ids: pa.Array | pa.ChunkedArray, shards: int) -> np.ndarray:
    """The shard that owns each id: ``id_hash(id) % shards`` (int64)."""
    return (id_hashes(ids) % np.uint64(shards)).astype(np.int64)


def owner(item_id: str, shards: int) -> int:
    """The shard that owns one id."""
    return id_hash(item_id) % shards
