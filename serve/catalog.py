"""The Catalog deployment: the one place that says which generation is current, and that runs reloads.

One replica asking no CPU (it idles in its followers' long polls). The ingress
replicas hold no state that another replica lacks: each follows the catalog
(:meth:`Catalog.watch`) and pins its current generation per request. The
protocol itself is :class:`serve.generations.CatalogState`; what is here are
the calls to the shards.

If this replica is lost, Serve starts another, which takes the newest
generation the shards still hold, else the start-up codes; an ingress replica
that knows a newer one hands it over on its next long poll.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from contracts.codes import CodesDir
from serve.generations import CatalogState, Generation
from serve.index import check_shards

logger = logging.getLogger(__name__)

# Longest a starting catalog waits for a shard to say what it holds (one may be down).
RECOVER_TIMEOUT_S = 5.0


@serve.deployment
class Catalog:
    """The current generation, its followers, and reloads one at a time."""

    async def __init__(self, shards: list[DeploymentHandle], codes: CodesDir, bits: int) -> None:
        self.shards = shards
        self.bits = bits
        start = Generation(0, codes, check_shards(len(shards)))
        recovered = await self._recover()
        if recovered is not None and recovered.number > 0:
            logger.warning("recovered generation %d (%s) from the shards", recovered.number, recovered.codes.uri)
            start = recovered
        else:
            await self.scatter(start, "load")
        self.state = CatalogState(start)
        self._retired_below = 0

    def current(self) -> Generation:
        return self.state.current

    async def watch(self, replica: str, adopted: Generation, oldest: int, timeout_s: float) -> Generation:
        """An ingress replica's long poll (see :meth:`CatalogState.watch`); retires what no replica holds any more."""
        generation = await self.state.watch(replica, adopted, oldest, timeout_s)
        await self._retire()
        return generation

    async def report(self, replica: str, adopted: Generation, oldest: int) -> None:
        """An ingress replica says its requests on older generations are done."""
        await self.state.report(replica, adopted, oldest)
        await self._retire()

    async def reload(self, uri: str | None) -> Generation:
        """Open the codes dir at ``uri`` (None: the current one again) and serve it everywhere."""
        codes = await asyncio.to_thread(CodesDir.open, uri or self.state.current.codes.uri)
        codes.require_bits(self.bits, "the served model makes")
        shards = len(self.shards)

        async def load(number: int) -> Generation:
            generation = Generation(number, codes, shards)
            await self.scatter(generation, "load")
            return generation

        async def discard(number: int) -> None:
            await self.scatter(Generation(number, codes, shards), "discard", by_number=True)

        generation = await self.state.reload(load, discard)
        logger.info("serving %d codes from %s (generation %d)", codes.count, codes.uri, generation.number)
        return generation

    async def scatter(self, generation: Generation, method: str, *, by_number: bool = False) -> list[Any]:
        """``method(part)`` (or ``method(number)``) on every shard at once."""
        args = [generation.number] * len(self.shards) if by_number else generation.parts
        return await asyncio.gather(
            *(getattr(shard, method).remote(arg) for shard, arg in zip(self.shards, args, strict=True))
        )

    async def _retire(self) -> None:
        below = self.state.retirable()
        if below > self._retired_below:
            self._retired_below = below
            await asyncio.gather(*(shard.retire_below.remote(below) for shard in self.shards))

    async def _recover(self) -> Generation | None:
        """The newest generation any shard holds (a shard still restarting is skipped)."""
        calls = [asyncio.ensure_future(shard.newest.remote()) for shard in self.shards]
        done, pending = await asyncio.wait(calls, timeout=RECOVER_TIMEOUT_S)
        for call in pending:
            call.cancel()
        held = [call.result() for call in done if call.exception() is None and call.result() is not None]
        return max(held, key=lambda g: g.number, default=None)
