"""The IndexShard deployment: one hash partition of the codes per generation, its id lookup and its searches.

Every call names its :class:`ShardPart` (generation, codes dir, shard of
shards), so a replica loads what it is asked for on first use: one that Serve
restarted after its node was lost recovers by itself. A generation the catalog
has retired here is answered with None instead of being loaded again, and the
ingress retries that request whole on the current generation.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from ray import serve

from serve.generations import Generation, ShardPart
from serve.index import Hits, ShardIndex, read_partition
from serve.memory import return_freed_memory, rss_bytes

logger = logging.getLogger(__name__)


@serve.deployment
class IndexShard:
    """Exact top-k and code by id over the rows whose id hashes to this shard, per index generation."""

    def __init__(self, threads: int) -> None:
        self._threads = threads  # scan threads per batch of queries: more than the replica's CPUs only contend
        self._indexes: dict[ShardPart, asyncio.Future[ShardIndex]] = {}
        self._retired_below = 0  # generations below this number were dropped here on purpose

    async def load(self, part: ShardPart) -> int | None:
        """Load ``part`` (once) and return its number of rows; None when its generation is retired."""
        index = await self._index(part)
        return None if index is None else len(index)

    async def status(self, part: ShardPart) -> dict[str, int] | None:
        """Rows of ``part`` and this replica's resident memory, for ``GET /healthz``."""
        index = await self._index(part)
        return None if index is None else {"rows": len(index), "rss_bytes": rss_bytes()}

    async def lookup(self, part: ShardPart, item_ids: list[str]) -> list[bytes | None] | None:
        """The packed code of each id (None for an id this shard does not hold)."""
        index = await self._index(part)
        if index is None:
            return None
        codes = [index.code_of(item_id) for item_id in item_ids]
        return [None if code is None else code.tobytes() for code in codes]

    async def search_ids(
        self, part: ShardPart, item_ids: list[str], k: int, radius: int | None
    ) -> list[Hits | None] | None:
        """The hits of each id's own code in this shard's rows (None for an id it does not hold).

        What a query by id needs in one call when one shard holds every code;
        with several, the ingress looks the code up and then asks every shard.
        """
        index = await self._index(part)
        if index is None:
            return None
        codes = [index.code_of(item_id) for item_id in item_ids]
        found = [code for code in codes if code is not None]
        hits = iter(index.search(np.stack(found), k, radius) if found else [])
        return [None if code is None else next(hits) for code in codes]

    async def search(self, part: ShardPart, queries: np.ndarray, k: int, radius: int | None) -> list[Hits] | None:
        index = await self._index(part)
        return None if index is None else index.search(queries, k, radius)

    def retire_below(self, number: int) -> None:
        """Drop every generation older than ``number``: no ingress replica has a request left on them."""
        self._retired_below = max(self._retired_below, number)
        self._drop(lambda part: part.generation < number)

    def discard(self, number: int) -> None:
        """Drop what a failed reload loaded of generation ``number``."""
        self._drop(lambda part: part.generation == number)

    def newest(self) -> Generation | None:
        """The newest generation loaded here: what a restarted catalog recovers."""
        loaded = [part for part, future in self._indexes.items() if future.done() and not future.exception()]
        if not loaded:
            return None
        part = max(loaded, key=lambda p: p.generation)
        return Generation(part.generation, part.codes, part.shards)

    def _drop(self, which) -> None:
        for part in [p for p in self._indexes if which(p)]:
            del self._indexes[part]
            logger.info("dropped shard %d of generation %d", part.shard, part.generation)

    async def _index(self, part: ShardPart) -> ShardIndex | None:
        if part.generation < self._retired_below:
            return None
        future = self._indexes.get(part)
        if future is None:
            # Read in a thread: searches of the current generation keep running meanwhile.
            future = self._indexes[part] = asyncio.ensure_future(asyncio.to_thread(self._read, part))
        try:
            return await future
        except BaseException:
            if self._indexes.get(part) is future:
                del self._indexes[part]  # let the next request try again
            raise

    def _read(self, part: ShardPart) -> ShardIndex:
        table = read_partition(part.codes, shard=part.shard, shards=part.shards)
        logger.info(
            "loaded shard %d of %d of %s: %d rows (generation %d)",
            part.shard,
            part.shards,
            part.codes.uri,
            table.num_rows,
            part.generation,
        )
        index = ShardIndex.from_partition(table, threads=self._threads)
        del table
        # What the row groups and the sort freed goes back to the OS, so the
        # replica's resident memory (/healthz) is its share, not its peak.
        return_freed_memory()
        return index
