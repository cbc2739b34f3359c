"""Index generations: what a request pins, and how a reload reaches every ingress replica.

A generation is one codes dir loaded on every shard, named by a number that
only grows. Two pieces of state, both plain asyncio (no Ray, no Serve), so the
rules are unit-tested alone (tests/test_generations.py):

- :class:`Generations` lives in each ingress replica. Every request pins the
  replica's current generation (:meth:`Generations.pinned`) and names it in
  every shard call, so no answer mixes two indexes.
- :class:`CatalogState` lives in the one catalog replica: the current
  generation, the ingress replicas that follow it (each long-polls
  :meth:`CatalogState.watch`), and the reload protocol: load on every shard,
  make current, wait until every live follower has adopted it, answer. The
  shards drop a generation once no follower has a request left on it
  (:meth:`CatalogState.retirable`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from contracts.codes import CodesDir

logger = logging.getLogger(__name__)

# How often a wait on in-flight requests or on followers checks again.
POLL_S = 0.01
# A follower's long poll returns after this long even when nothing changed...
WATCH_S = 2.0
# ...so one not heard from for this long is gone (its replica stopped or was lost).
LIVE_S = 3 * WATCH_S
# Longest a reload waits for every live follower to adopt the new generation.
ADOPT_TIMEOUT_S = 30.0
# Longest the shards keep a previous generation for requests still on it.
DRAIN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ShardPart:
    """Shard ``shard`` of ``shards`` of an opened codes dir, as loaded for one generation: a shard's cache key.

    The :class:`CodesDir` travels with the part, so a shard (also one Serve has
    just restarted) reads its rows without opening the dir again.
    """

    generation: int
    codes: CodesDir
    shard: int
    shards: int


@dataclass(frozen=True)
class Generation:
    """One codes dir as served: its number, the dir, and how many shards split it. Small and picklable."""

    number: int
    codes: CodesDir
    shards: int

    @property
    def count(self) -> int:
        return self.codes.count

    @property
    def parts(self) -> tuple[ShardPart, ...]:
        """What each shard holds of this generation, in shard order."""
        return tuple(ShardPart(self.number, self.codes, shard, self.shards) for shard in range(self.shards))


class Generations:
    """An ingress replica's current generation and how many of its requests hold each one."""

    def __init__(self, poll_s: float = POLL_S) -> None:
        self.current: Generation | None = None
        self._poll_s = poll_s
        self._in_flight: collections.Counter[int] = collections.Counter()

    def in_flight(self, number: int) -> int:
        """Requests that hold generation ``number`` right now."""
        return self._in_flight[number]

    def oldest_in_use(self) -> int:
        """The oldest generation a request still holds (the current one when none holds an older)."""
        held = [number for number, count in self._in_flight.items() if count > 0]
        return min([*held, self.current.number]) if self.current is not None else 0

    @contextlib.contextmanager
    def pinned(self) -> Iterator[Generation]:
        """The current generation, kept by this request until the block ends (even if a newer one is adopted)."""
        generation = self.current
        if generation is None:
            raise RuntimeError("no index generation is loaded yet")
        self._in_flight[generation.number] += 1
        try:
            yield generation
        finally:
            self._in_flight[generation.number] -= 1
            if not self._in_flight[generation.number]:
                del self._in_flight[generation.number]

    def adopt(self, generation: Generation) -> bool:
        """Make ``generation`` current for every later request, if it is newer; whether it was."""
        if self.current is not None and generation.number <= self.current.number:
            return False
        self.current = generation
        return True

    async def drained(self, below: int) -> None:
        """Return once no request holds a generation older than ``below``."""
        while self.oldest_in_use() < below:
            await asyncio.sleep(self._poll_s)


@dataclass
class Follower:
    """What the catalog knows of one ingress replica."""

    adopted: int  # the generation its new requests get
    oldest: int  # the oldest generation one of its requests still holds
    seen: float  # when it last called


class CatalogState:
    """The current generation, the ingress replicas following it, and reloads one at a time.

    Args:
        current: the generation served at start (or recovered after a restart).
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, current: Generation, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.current = current
        self.followers: dict[str, Follower] = {}
        self._clock = clock
        self._since = clock()  # when ``current`` became current
        self._changed = asyncio.Event()  # set, then replaced, at every change of current or of a follower
        self._reload_lock = asyncio.Lock()

    def live(self) -> dict[str, Follower]:
        """Followers heard from within :data:`LIVE_S`; the others are forgotten."""
        now = self._clock()
        self.followers = {name: f for name, f in self.followers.items() if now - f.seen <= LIVE_S}
        return self.followers

    async def report(self, replica: str, adopted: Generation, oldest: int) -> None:
        """Record what ``replica`` serves; a follower that knows a newer generation than this catalog wins it.

        That newer generation is one a previous catalog replica made current
        before it was lost: its shards loaded it, so it is served again.
        """
        if adopted.number > self.current.number:
            logger.warning("recovered generation %d from ingress replica %s", adopted.number, replica)
            await self._make_current(adopted)
        self.followers[replica] = Follower(adopted.number, oldest, self._clock())
        self._signal()

    async def watch(self, replica: str, adopted: Generation, oldest: int, timeout_s: float = WATCH_S) -> Generation:
        """A follower's long poll: the current generation once it differs from ``adopted``, or after ``timeout_s``."""
        await self.report(replica, adopted, oldest)
        deadline = self._clock() + timeout_s
        while self.current.number == adopted.number and self._clock() < deadline:
            await self._next_change(deadline - self._clock())
        return self.current

    async def reload(
        self,
        load: Callable[[int], Awaitable[Generation]],
        discard: Callable[[int], Awaitable[None]],
        adopt_timeout_s: float = ADOPT_TIMEOUT_S,
    ) -> Generation:
        """Load the next generation with ``load(number)``, make it current, and return once every live follower uses it.

        A ``load`` that fails leaves the current generation serving; what it
        loaded halfway is dropped (``discard(number)``). Past ``adopt_timeout_s``
        the followers that have not adopted are forgotten (they are gone).
        """
        async with self._reload_lock:
            number = self.current.number + 1
            try:
                generation = await load(number)
            except BaseException:
                await discard(number)
                raise
            await self._make_current(generation)
            if not await self._adopted(number, adopt_timeout_s):
                lagging = sorted(n for n, f in self.live().items() if f.adopted < number)
                logger.warning("ingress replicas %s did not adopt generation %d; forgetting them", lagging, number)
                for name in lagging:
                    del self.followers[name]
            return generation

    def retirable(self) -> int:
        """Generations below this number may be dropped on the shards: no live follower has a request on them.

        Past :data:`DRAIN_TIMEOUT_S` after a swap, a follower's old requests no
        longer hold anything back (a shard asked for a dropped generation
        answers so, and the request is retried whole on the current one).
        """
        if self._clock() - self._since > DRAIN_TIMEOUT_S:
            return self.current.number
        return min([f.oldest for f in self.live().values()] + [self.current.number])

    async def _make_current(self, generation: Generation) -> None:
        self.current, self._since = generation, self._clock()
        self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _next_change(self, timeout_s: float) -> None:
        """Return at the next change, or after ``timeout_s`` (never swallowing a cancellation)."""
        waiter = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait([waiter], timeout=max(timeout_s, 0))
        finally:
            waiter.cancel()

    async def _adopted(self, number: int, timeout_s: float) -> bool:
        """Whether every live follower adopted generation ``number`` within ``timeout_s``."""
        deadline = self._clock() + timeout_s
        while any(f.adopted < number for f in self.live().values()):
            if self._clock() > deadline:
                return False
            await self._next_change(POLL_S * 10)
        return True
