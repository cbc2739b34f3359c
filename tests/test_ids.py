"""The stable id hash that says which shard owns an id: the same everywhere, spread evenly."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa

from contracts.ids import id_hash, id_hashes, owner, owners

IDS = ["", "a", "b", "ab", "ba", "item-000001", "héllo wörld", "日本語のid", "\x00", "x" * 300]


def test_an_id_hashes_alike_alone_in_a_many_element_array_and_in_chunks() -> None:
    array = pa.array(IDS, pa.string())
    many = id_hashes(array)
    assert many.dtype == np.uint64
    assert [id_hash(item) for item in IDS] == many.tolist()
    chunked = pa.chunked_array([IDS[:3], IDS[3:4], [], IDS[4:]], pa.string())
    assert id_hashes(chunked).tolist() == many.tolist()
    assert id_hashes(array.slice(4, 3)).tolist() == many[4:7].tolist()  # an offset into the buffers
    assert id_hashes(pa.array(IDS, pa.large_string())).tolist() == many.tolist()
    assert len(set(many.tolist())) == len(IDS)  # empty, unicode, NUL and long ids all differ
    assert id_hashes(pa.array([], pa.string())).tolist() == []


def test_the_hash_is_the_same_in_another_process() -> None:
    """Python's own str hash is salted per process; this one is not."""
    code = "from contracts.ids import id_hash; print([id_hash(i) for i in ('', 'a', 'héllo wörld')])"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=".")
    assert other.stdout.strip() == str([id_hash(i) for i in ("", "a", "héllo wörld")])


def test_owners_spread_evenly_over_shards() -> None:
    ids = pa.array([f"img_{i:06d}.jpg" for i in range(30_000)])
    for shards in (2, 3, 7):
        counts = np.bincount(owners(ids, shards), minlength=shards)
        assert counts.max() / counts.min() < 1.1, counts
        assert owner("img_000042.jpg", shards) == owners(ids, shards)[42]
