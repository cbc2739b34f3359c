"""Exact Hamming search and id lookup over one shard's rows of the database: the shard logic.

A shard holds the rows whose id hashes to it (:func:`contracts.ids.owners`),
each once: code (as the words of :mod:`serve.hamming`), id and labels (:mod:`serve.columns`, each in its
narrowest form) and global database position, sorted by id so that finding an id's code is a binary search over the shard's own
ids. Plain numpy/numba/pyarrow, no Ray, so the Serve shard deployment, the
tests and the benchmark run the same code. Results follow the ranking rule of
``models.codes.topk_by_hamming`` -- smaller distance first, then smaller global
database position -- and stay exact when merged across shards because every
shard returns its own exact top-k under that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from contracts.codes import CodesDir, codes_matrix
from contracts.ids import owners
from models.codes import check_bits
from models.errors import HashrayError
from serve.columns import IdColumn, LabelColumn, combined
from serve.hamming import HammingScan


@dataclass(frozen=True)
class Hits:
    """Ranked search results of one query; ``ids``/``labels`` once described."""

    distances: np.ndarray  # (m,) int32
    positions: np.ndarray  # (m,) int64, global database positions
    ids: list[str] | None = None
    labels: list[list[int]] | None = None

    def take(self, order: np.ndarray) -> Hits:
        def pick(values: list | None) -> list | None:
            return None if values is None else [values[i] for i in order]

        return Hits(self.distances[order], self.positions[order], pick(self.ids), pick(self.labels))


def rank(distances: np.ndarray, positions: np.ndarray, k: int) -> Hits:
    """The first ``k`` of (distance, position) pairs in the global ranking order."""
    distances = np.asarray(distances, dtype=np.int32)
    positions = np.asarray(positions, dtype=np.int64)
    order = np.lexsort((positions, distances))[:k]
    return Hits(distances[order], positions[order])


def merge_hits(parts: Sequence[Hits], k: int) -> Hits:
    """Exact top-k of the union of shard results (each already an exact top-k)."""
    distances = np.concatenate([p.distances for p in parts])
    positions = np.concatenate([p.positions for p in parts])
    order = np.lexsort((positions, distances))[:k]
    merged = Hits(
        distances,
        positions,
        None if any(p.ids is None for p in parts) else [i for p in parts for i in p.ids],
        None if any(p.labels is None for p in parts) else [lab for p in parts for lab in p.labels],
    )
    return merged.take(order)


def slice_bounds(count: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous [start, stop) slices of ``count`` rows, sizes within one of each other.

    Splits work into even runs (Parquet files of a test set, benchmark shards);
    the serving shards partition by id hash instead (:func:`partition`).
    """
    check_shards(shards)
    edges = [count * i // shards for i in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


def check_shards(shards: int) -> int:
    """``shards`` when it is a usable shard count (one line naming the flag otherwise)."""
    if shards < 1:
        raise HashrayError(f"--shards must be at least 1, got {shards}")
    return shards


class IdIndex:
    """Row of an id in ids of any order: a binary search over them sorted once.

    Keeps the ids as an :class:`~serve.columns.IdColumn` (a few bytes each)
    instead of a dict of Python strings. A shard needs none: its rows are
    already sorted by id.
    """

    def __init__(self, ids: pa.Array | pa.ChunkedArray) -> None:
        ids = combined(ids)
        self._order = pc.sort_indices(ids).to_numpy()
        self._sorted = IdColumn(ids.take(pa.array(self._order)))

    def find(self, item_id: str) -> int | None:
        """The row of ``item_id`` (its first row if repeated), or None."""
        at = self._sorted.find_sorted(item_id)
        return None if at is None else int(self._order[at])


def partition(table: pa.Table, *, start: int, shard: int, shards: int) -> pa.Table:
    """The rows of ``table`` (database rows from ``start`` on) that ``shard`` of ``shards`` owns.

    Adds their global database position as column ``position`` (int64).
    """
    if not 0 <= shard < check_shards(shards):
        raise HashrayError(f"shard {shard} does not exist among {shards}; shards are 0..{shards - 1}")
    mine = np.flatnonzero(owners(table.column("id"), shards) == shard)
    picked = table.take(pa.array(mine, pa.int64()))
    return picked.append_column("position", pa.array(mine + start, pa.int64()))


def read_partition(codes: CodesDir, *, shard: int, shards: int) -> pa.Table:
    """``shard``'s rows of a codes dir, read one row group at a time, so memory stays near one share."""
    parts = [partition(table, start=start, shard=shard, shards=shards) for start, table in codes.row_groups()]
    if parts:
        return pa.concat_tables(parts)
    return partition(codes.read(start=0, stop=0), start=0, shard=shard, shards=shards)


class ShardIndex:
    """Exact top-k and radius search, and code by id, over some rows of the database.

    Args:
        codes: packed codes (n, bits/8) uint8 of these rows (kept only as the scan's words).
        start: global database position of the first row when ``positions`` is not given
            (the rows are then a contiguous run).
        positions: global database position of each row (int64).
        ids, labels: the rows' ``id`` and ``labels`` columns, to describe hits (kept as
            :mod:`serve.columns` holds them; labels come back as sets, ascending).
        ids_sorted: whether ``ids`` is sorted ascending, which :meth:`code_of` needs.
        threads: threads that split a batch of queries.
    """

    def __init__(
        self,
        codes: np.ndarray,
        *,
        start: int = 0,
        positions: np.ndarray | None = None,
        ids: pa.Array | pa.ChunkedArray | None = None,
        labels: pa.Array | pa.ChunkedArray | None = None,
        ids_sorted: bool = False,
        threads: int = 1,
    ) -> None:
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        self.bits = check_bits(codes.shape[1] * 8)
        positions = np.arange(start, start + len(codes), dtype=np.int64) if positions is None else positions
        # Four bytes a row instead of eight below 2^31 rows: at 10^8 rows that is 400 MB of a shard.
        fits = len(positions) == 0 or int(np.max(positions)) < 2**31
        self._positions = np.ascontiguousarray(positions, dtype=np.int32 if fits else np.int64)
        if len(self._positions) != len(codes):
            raise HashrayError(f"{len(codes)} codes but {len(self._positions)} positions")
        self._scan = HammingScan(codes, self._positions, threads=threads)
        self._ids = None if ids is None else IdColumn(ids)
        self._labels = None if labels is None else LabelColumn(labels)
        self._ids_sorted = ids_sorted

    @classmethod
    def from_partition(cls, table: pa.Table, *, threads: int = 1) -> ShardIndex:
        """A shard over rows of a codes table with their ``position`` column (:func:`partition`), sorted by id here."""
        table = table.take(pc.sort_indices(table, sort_keys=[("id", "ascending")]))
        return cls(
            codes_matrix(table),
            positions=table.column("position").to_numpy(),
            ids=table.column("id"),
            labels=table.column("labels"),
            ids_sorted=True,
            threads=threads,
        )

    def __len__(self) -> int:
        return len(self._scan)

    def code_of(self, item_id: str) -> np.ndarray | None:
        """The packed code of ``item_id`` (read back from the scan's words, the one copy), or None when no row has it."""
        if self._ids is None or not self._ids_sorted:
            raise HashrayError("this shard was built without ids sorted for lookup")
        row = self._ids.find_sorted(item_id)
        return None if row is None else self._scan.code(row)

    def topk(self, queries: np.ndarray, k: int, radius: int | None = None) -> list[Hits]:
        """Exact top-k per query; with ``radius``, only items at distance <= radius."""
        return [Hits(distances, self._global(local)) for distances, local in self._ranked(queries, k, radius)]

    def search(self, queries: np.ndarray, k: int, radius: int | None = None) -> list[Hits]:
        """:meth:`topk` with each hit's id and labels attached."""
        if self._ids is None or self._labels is None:
            raise HashrayError("this shard was built without ids and labels")
        results = []
        for distances, local in self._ranked(queries, k, radius):
            results.append(Hits(distances, self._global(local), self._ids.take(local), self._labels.take(local)))
        return results

    def _global(self, local: np.ndarray) -> np.ndarray:
        """The global database positions of local rows, as int64 whatever the stored width."""
        return self._positions[local].astype(np.int64)

    def _ranked(self, queries: np.ndarray, k: int, radius: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """(distances, local rows) of each query's exact top-k, in the global ranking order."""
        return self._scan.search(self._check_queries(queries), k, radius)

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(queries, dtype=np.uint8)
        if queries.ndim != 2 or queries.shape[1] * 8 != self.bits:
            raise HashrayError(f"query codes must have shape (q, {self.bits // 8}), got {queries.shape}")
        return queries


def search_shards(shards: Sequence[ShardIndex], queries: np.ndarray, k: int, radius: int | None = None) -> list[Hits]:
    """In-process scatter/merge over shards: what the Serve ingress does over replicas."""
    per_shard = [shard.topk(queries, k, radius) for shard in shards]
    return [merge_hits([hits[row] for hits in per_shard], k) for row in range(len(queries))]
