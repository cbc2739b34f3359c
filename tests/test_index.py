"""The shard index: hash partitions, id lookup, exact top-k and radius search, exact merge across shards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contracts.codes import CodesDir, codes_table, write_manifest
from contracts.ids import owners
from models.codes import hamming_distances, topk_by_hamming
from models.errors import HashrayError
from serve.index import IdIndex, ShardIndex, merge_hits, partition, read_partition, search_shards, slice_bounds


def tied_codes(rng: np.random.Generator, n: int, bytes_per_code: int, pool: int) -> np.ndarray:
    """Codes drawn from a small pool, so many items tie at every distance."""
    return rng.integers(0, 256, size=(pool, bytes_per_code), dtype=np.uint8)[rng.integers(0, pool, size=n)]


def database(codes: np.ndarray) -> pa.Table:
    """A codes table over ``codes`` with ids in no particular order and labels."""
    labels = pa.array([[i % 3] for i in range(len(codes))], type=pa.list_(pa.int32()))
    return codes_table([f"id-{(i * 7919) % 10007:05d}" for i in range(len(codes))], codes, labels)


def make_shards(codes: np.ndarray, count: int, threads: int = 1) -> list[ShardIndex]:
    """The serving layout: each shard holds the rows whose id hashes to it, sorted by id."""
    table = database(codes)
    return [
        ShardIndex.from_partition(partition(table, start=0, shard=i, shards=count), threads=threads)
        for i in range(count)
    ]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shard_count", [1, 2, 3, 7])
def test_topk_equals_stable_brute_force(seed: int, shard_count: int) -> None:
    rng = np.random.default_rng(seed)
    bytes_per_code = (1, 2, 3, 8, 9, 16)[seed]
    codes = tied_codes(rng, n=int(rng.integers(40, 400)), bytes_per_code=bytes_per_code, pool=int(rng.integers(3, 60)))
    queries = np.concatenate([codes[:3], rng.integers(0, 256, size=(3, bytes_per_code), dtype=np.uint8)])
    distances = hamming_distances(queries, codes)
    # Three threads split each batch of queries three ways.
    for threads in (1, 3):
        shards = make_shards(codes, shard_count, threads)
        for k in (1, 5, 17, 64, len(codes), len(codes) + 5):
            for row, hits in enumerate(search_shards(shards, queries, k)):
                expected = np.argsort(distances[row], kind="stable")[:k]
                np.testing.assert_array_equal(hits.positions, expected)
                np.testing.assert_array_equal(hits.distances, distances[row, expected])
                np.testing.assert_array_equal(hits.positions, topk_by_hamming(distances[row], k))


@pytest.mark.parametrize("shard_count", [1, 3])
def test_radius_is_every_item_within_it_ranked(shard_count: int) -> None:
    rng = np.random.default_rng(7)
    codes = tied_codes(rng, n=300, bytes_per_code=2, pool=40)
    queries = codes[:4]
    distances = hamming_distances(queries, codes)
    shards = make_shards(codes, shard_count)
    for radius in (0, 3, 7, 16):
        for k in (1, 10, 1000):
            for row, hits in enumerate(search_shards(shards, queries, k, radius=radius)):
                order = np.argsort(distances[row], kind="stable")
                expected = order[distances[row, order] <= radius][:k]
                np.testing.assert_array_equal(hits.positions, expected)
                assert (hits.distances <= radius).all()


def test_merge_keeps_ids_and_labels_with_their_positions() -> None:
    codes = np.array([[0], [1], [3], [0], [7]], dtype=np.uint8)
    ids = pa.array(["a", "b", "c", "d", "e"])
    labels = pa.array([[0], [1], [2], [0, 1], [3]], type=pa.list_(pa.int32()))
    shards = [ShardIndex(codes[a:b], start=a, ids=ids[a:b], labels=labels[a:b]) for a, b in slice_bounds(len(codes), 2)]
    shards.append(ShardIndex(codes[:0], positions=np.zeros(0, np.int64), ids=ids[:0], labels=labels[:0]))  # empty
    query = np.zeros((1, 1), dtype=np.uint8)
    merged = merge_hits([shard.search(query, 3)[0] for shard in shards], 3)
    assert merged.ids == ["a", "d", "b"]  # distance 0, 0 (by position), then 1
    assert merged.labels == [[0], [0, 1], [1]]
    assert merged.distances.tolist() == [0, 0, 1]
    assert merged.positions.tolist() == [0, 3, 1]


@pytest.mark.parametrize("base", [0, 2**31 - 2, 2**40])
def test_positions_rank_ties_and_come_back_exactly_below_and_above_two_to_the_31(base: int) -> None:
    codes = np.array([[5], [5], [5], [4]], dtype=np.uint8)
    positions = np.array([base + 3, base + 1, base + 2, base], dtype=np.int64)
    shard = ShardIndex(codes, positions=positions, ids=pa.array(list("wxyz")), labels=pa.array([[0]] * 4))
    hits = shard.search(np.array([[5]], dtype=np.uint8), 4)[0]
    assert hits.positions.dtype == np.int64
    assert hits.positions.tolist() == [base + 1, base + 2, base + 3, base]  # ties by position, then distance 1
    assert hits.ids == ["x", "y", "w", "z"]


@pytest.mark.parametrize("shard_count", [1, 2, 3])
def test_search_by_id_through_the_owning_shard_is_brute_force_for_every_id(shard_count: int) -> None:
    """What ``GET /search/{id}`` does: the owner's code, then every shard, merged; ties everywhere."""
    rng = np.random.default_rng(shard_count)
    codes = tied_codes(rng, n=150, bytes_per_code=2, pool=6)  # ~25 duplicates of each code
    table = database(codes)
    ids = table.column("id").to_pylist()
    shards = make_shards(codes, shard_count)
    owner_of = owners(table.column("id"), shard_count)
    distances = hamming_distances(codes, codes)
    looked_up = []
    for row, item_id in enumerate(ids):
        found = [shard.code_of(item_id) for shard in shards]
        assert [i for i, code in enumerate(found) if code is not None] == [owner_of[row]]
        looked_up.append(found[owner_of[row]])
    looked_up = np.stack(looked_up)
    np.testing.assert_array_equal(looked_up, codes)
    for k in (1, 30):
        described = [shard.search(looked_up, k) for shard in shards]
        for row, hits in enumerate(search_shards(shards, looked_up, k)):
            np.testing.assert_array_equal(hits.positions, topk_by_hamming(distances[row], k))
            merged = merge_hits([answers[row] for answers in described], k)
            assert merged.ids == [ids[p] for p in hits.positions]
    assert all(shard.code_of("no-such-id") is None for shard in shards)


def test_every_row_is_in_exactly_its_hash_partition(tmp_path) -> None:
    codes = np.random.default_rng(3).integers(0, 256, size=(301, 2), dtype=np.uint8)
    table = write_codes_dir(tmp_path / "codes", codes, files=3, row_group_size=40)
    codes_dir = CodesDir.open(str(tmp_path / "codes"))
    for shards in (1, 2, 3):
        owner_of = owners(table.column("id"), shards)
        seen = []
        for shard in range(shards):
            part = read_partition(codes_dir, shard=shard, shards=shards)
            positions = part.column("position").to_numpy()
            np.testing.assert_array_equal(positions, np.flatnonzero(owner_of == shard))
            assert part.drop_columns(["position"]).equals(table.take(pa.array(positions)))
            seen.extend(positions.tolist())
        assert sorted(seen) == list(range(len(codes)))  # every row once, in one shard


def test_row_groups_stream_the_dir_in_read_order(tmp_path) -> None:
    codes = np.random.default_rng(4).integers(0, 256, size=(95, 2), dtype=np.uint8)
    table = write_codes_dir(tmp_path / "codes", codes, files=2, row_group_size=20)
    groups = list(CodesDir.open(str(tmp_path / "codes")).row_groups(columns=("id", "code")))
    assert [start for start, _ in groups] == [0, 20, 40, 47, 67, 87]
    assert pa.concat_tables([g for _, g in groups]).equals(table.select(["id", "code"]))


def test_shard_rejects_queries_of_the_wrong_width() -> None:
    shard = ShardIndex(np.arange(12, dtype=np.uint8).reshape(6, 2))
    with pytest.raises(HashrayError, match="shape"):
        shard.topk(np.zeros((1, 3), dtype=np.uint8), 1)


def test_id_index_finds_first_row_and_rejects_unknown() -> None:
    index = IdIndex(pa.chunked_array([["m", "b", "z"], ["b", "é", "a"]]))
    assert [index.find(i) for i in ("m", "b", "z", "é", "a")] == [0, 1, 2, 4, 5]
    assert index.find("c") is None
    assert index.find("zz") is None


def test_slice_bounds_cover_every_row_once() -> None:
    for count in (0, 1, 10, 101):
        for shards in (1, 2, 3, 8):
            bounds = slice_bounds(count, shards)
            assert len(bounds) == shards
            assert bounds[0][0] == 0 and bounds[-1][1] == count
            assert all(b[1] == c[0] for b, c in zip(bounds, bounds[1:]))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(HashrayError, match="--shards"):
        slice_bounds(10, 0)


def write_codes_dir(path, codes: np.ndarray, files: int, row_group_size: int | None = None) -> pa.Table:
    """A codes dir split over ``files`` Parquet files (rows in file order)."""
    labels = pa.array([[i % 3] for i in range(len(codes))], type=pa.list_(pa.int32()))
    table = codes_table([f"id-{i:04d}" for i in range(len(codes))], codes, labels)
    path.mkdir(parents=True, exist_ok=True)
    for part, (a, b) in enumerate(slice_bounds(len(codes), files)):
        pq.write_table(table.slice(a, b - a), path / f"part-{part:03d}.parquet", row_group_size=row_group_size)
    write_manifest(str(path), bits=codes.shape[1] * 8, count=len(codes), model="m", dataset="d", split="database")
    return table


def test_a_shard_slice_read_spans_files(tmp_path) -> None:
    codes = np.random.default_rng(0).integers(0, 256, size=(23, 2), dtype=np.uint8)
    table = write_codes_dir(tmp_path / "codes", codes, files=4)
    codes_dir = CodesDir.open(str(tmp_path / "codes"))
    for start, stop in ((0, 23), (0, 5), (4, 17), (22, 23), (6, 6)):
        manifest, piece = codes_dir.manifest, codes_dir.read(start=start, stop=stop)
        assert manifest["bits"] == 16
        assert piece.equals(table.slice(start, stop - start))
    with pytest.raises(HashrayError, match="outside"):
        codes_dir.read(start=20, stop=30)


def test_a_shard_slice_read_rejects_incomplete_dirs(tmp_path) -> None:
    codes = np.zeros((5, 1), dtype=np.uint8)
    write_codes_dir(tmp_path / "codes", codes, files=1)
    write_manifest(str(tmp_path / "codes"), bits=8, count=9, model="m", dataset="d", split="database")
    with pytest.raises(HashrayError, match="manifest says 9"):
        CodesDir.open(str(tmp_path / "codes")).read(start=0, stop=5)
    with pytest.raises(HashrayError, match="manifest.json"):
        CodesDir.open(str(tmp_path / "missing")).read(start=0, stop=1)
