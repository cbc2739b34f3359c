"""Index generations: what a request pins for its lifetime, and how a reload swaps one in.

Every request pins the current :class:`Generation` (:meth:`Generations.pinned`)
and gets all its answers from it, so a reload in the middle of a request never
mixes two indexes. A reload loads the new generation beside the current one,
swaps it in for every later request, then waits until no request holds the
previous one before the shards drop it. Plain asyncio, no Ray and no Serve,
so the pin/drain rules are unit-tested alone (tests/test_generations.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from contracts.codes import CodesDir
from serve.index import CodeBook

logger = logging.getLogger(__name__)

# How often a swap checks whether requests still use the previous generation.
DRAIN_POLL_S = 0.01


@dataclass(frozen=True)
class ShardSlice:
    """Rows [start, stop) of an opened codes dir, as loaded for one generation: a shard's cache key.

    The :class:`CodesDir` travels with the slice, so a shard reads its rows
    without opening the dir (and its manifest) again.
    """

    generation: int
    codes: CodesDir
    start: int
    stop: int


@dataclass(frozen=True)
class Generation:
    """One loaded codes dir: its shard slices and the code book of every id."""

    number: int
    codes: CodesDir
    slices: tuple[ShardSlice, ...]
    codebook: CodeBook = field(compare=False, repr=False)

    @property
    def count(self) -> int:
        return self.codes.count


class Generations:
    """The current generation and how many requests hold each one.

    One instance lives in the ingress; reloads run one at a time.
    """

    def __init__(self, drain_poll_s: float = DRAIN_POLL_S) -> None:
        self.current: Generation | None = None
        self._drain_poll_s = drain_poll_s
        self._in_flight: collections.Counter[int] = collections.Counter()
        self._swap_lock = asyncio.Lock()

    def next_number(self) -> int:
        return 0 if self.current is None else self.current.number + 1

    def in_flight(self, number: int) -> int:
        """Requests that hold generation ``number`` right now."""
        return self._in_flight[number]

    @contextlib.contextmanager
    def pinned(self) -> Iterator[Generation]:
        """The current generation, kept loaded until the block ends (even if a swap happens meanwhile)."""
        generation = self.current
        if generation is None:
            raise RuntimeError("no index generation is loaded yet")
        self._in_flight[generation.number] += 1
        try:
            yield generation
        finally:
            self._in_flight[generation.number] -= 1

    async def swap(
        self,
        load: Callable[[int], Awaitable[Generation]],
        retire_all_but: Callable[[Generation], Awaitable[None]],
    ) -> Generation:
        """Load the next generation with ``load(number)``, make it current, then drain and retire the previous one.

        A ``load`` that fails leaves the current generation serving; whatever
        it loaded halfway is retired (``retire_all_but(current)``).
        """
        async with self._swap_lock:
            try:
                generation = await load(self.next_number())
            except BaseException:
                if self.current is not None:
                    await retire_all_but(self.current)
                raise
            previous, self.current = self.current, generation
            if previous is not None:
                await self.drained(previous)
                await retire_all_but(generation)
            return generation

    async def drained(self, generation: Generation) -> None:
        """Return once no request holds ``generation`` (which is no longer current)."""
        while self._in_flight[generation.number]:
            await asyncio.sleep(self._drain_poll_s)
        del self._in_flight[generation.number]
