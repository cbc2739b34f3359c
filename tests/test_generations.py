"""Index generations alone: a pinned request keeps its generation, a reload reaches every follower, drains retire."""

from __future__ import annotations

import asyncio

import pytest

from contracts.codes import CodesDir
from serve import generations as gens
from serve.generations import CatalogState, Generation, Generations


def generation(number: int, count: int = 4, shards: int = 2) -> Generation:
    """A generation over a codes dir that exists only in memory (nothing here reads it)."""
    return Generation(number, CodesDir(f"mem://codes-{number}", {"bits": 16, "count": count}, ()), shards)


class Shards:
    """What the catalog's shards see: loads and discards, in order."""

    def __init__(self) -> None:
        self.loaded: list[int] = []
        self.discarded: list[int] = []

    async def load(self, number: int) -> Generation:
        await asyncio.sleep(0)  # a real load waits on the shards
        self.loaded.append(number)
        return generation(number)

    async def broken(self, number: int) -> Generation:
        raise ValueError(f"generation {number} cannot be read")

    async def discard(self, number: int) -> None:
        self.discarded.append(number)


class Follower:
    """An ingress replica: its own Generations, following the catalog by long polls."""

    def __init__(self, name: str, catalog: CatalogState) -> None:
        self.name, self.catalog = name, catalog
        self.generations = Generations(poll_s=0.001)
        self.generations.adopt(catalog.current)
        self.task = asyncio.ensure_future(self.follow())

    async def follow(self) -> None:
        while True:
            latest = await self.catalog.watch(
                self.name, self.generations.current, self.generations.oldest_in_use(), 0.05
            )
            if self.generations.adopt(latest):
                asyncio.ensure_future(self.report_drained(latest.number))

    async def report_drained(self, number: int) -> None:
        await self.generations.drained(number)
        await self.catalog.report(self.name, self.generations.current, self.generations.oldest_in_use())


def test_shard_parts_name_their_generation_and_shard() -> None:
    parts = generation(3, shards=3).parts
    assert [(p.generation, p.shard, p.shards) for p in parts] == [(3, 0, 3), (3, 1, 3), (3, 2, 3)]
    assert generation(3).count == 4


def test_pinning_before_any_generation_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no index generation"):
        with Generations().pinned():
            pass


def test_a_pin_keeps_its_generation_after_a_newer_one_is_adopted() -> None:
    async def scenario() -> None:
        local = Generations(poll_s=0.001)
        assert local.adopt(generation(0)) and local.oldest_in_use() == 0
        with local.pinned() as held:
            assert local.adopt(generation(1))
            assert not local.adopt(generation(0))  # never back to an older one
            with local.pinned() as later:
                assert later.number == 1
            assert held.number == 0 and local.in_flight(0) == 1 and local.oldest_in_use() == 0
            drained = asyncio.ensure_future(local.drained(1))
            await asyncio.sleep(0.01)
            assert not drained.done()
        await asyncio.wait_for(drained, 1)
        assert local.oldest_in_use() == 1 and local.in_flight(0) == 0

    asyncio.run(scenario())


def test_a_reload_answers_once_every_follower_uses_the_new_generation() -> None:
    async def scenario() -> None:
        shards = Shards()
        catalog = CatalogState(generation(0))
        followers = [Follower(f"ingress-{i}", catalog) for i in range(3)]
        await asyncio.sleep(0.01)  # each has registered by its first long poll
        assert set(catalog.followers) == {"ingress-0", "ingress-1", "ingress-2"}
        with followers[0].generations.pinned() as held:
            reloaded = await asyncio.wait_for(catalog.reload(shards.load, shards.discard), 5)
            assert reloaded.number == 1 and shards.loaded == [1]
            # When the reload answers, every follower's new requests get generation 1...
            assert all(f.generations.current.number == 1 for f in followers)
            # ...while a request that pinned 0 keeps it, and holds its shards back.
            assert held.number == 0
            await asyncio.sleep(0.01)
            assert catalog.retirable() == 0
        await asyncio.sleep(0.05)
        assert catalog.retirable() == 1  # drained everywhere: the shards may drop generation 0
        for f in followers:
            f.task.cancel()

    asyncio.run(scenario())


def test_a_failed_load_leaves_the_current_generation_serving() -> None:
    async def scenario() -> None:
        shards = Shards()
        catalog = CatalogState(generation(0))
        with pytest.raises(ValueError, match="generation 1 cannot be read"):
            await catalog.reload(shards.broken, shards.discard)
        assert catalog.current.number == 0
        assert shards.discarded == [1]  # whatever the failed load left on the shards goes
        assert (await catalog.reload(shards.load, shards.discard)).number == 1

    asyncio.run(scenario())


def test_a_follower_that_stopped_is_forgotten_and_does_not_hold_a_reload(monkeypatch) -> None:
    monkeypatch.setattr(gens, "LIVE_S", 0.2)

    async def scenario() -> None:
        shards = Shards()
        catalog = CatalogState(generation(0))
        alive, gone = Follower("alive", catalog), Follower("gone", catalog)
        await asyncio.sleep(0.01)
        gone.task.cancel()  # its replica stopped without a word
        gone.generations.pinned().__enter__()  # with a request left on generation 0
        reloaded = await asyncio.wait_for(catalog.reload(shards.load, shards.discard), 5)
        assert reloaded.number == 1 and alive.generations.current.number == 1
        assert set(catalog.live()) == {"alive"} and catalog.retirable() == 1
        alive.task.cancel()

    asyncio.run(scenario())


def test_reloads_run_one_at_a_time_and_a_restarted_catalog_learns_the_newest_from_a_follower() -> None:
    async def scenario() -> None:
        shards = Shards()
        catalog = CatalogState(generation(0))
        follower = Follower("ingress", catalog)
        await asyncio.sleep(0.01)
        done = await asyncio.gather(*(catalog.reload(shards.load, shards.discard) for _ in range(3)))
        assert [g.number for g in done] == [1, 2, 3] and shards.loaded == [1, 2, 3]
        assert follower.generations.current.number == 3
        follower.task.cancel()
        restarted = CatalogState(generation(0))  # nothing recovered from the shards
        follower.catalog = restarted
        follower.task = asyncio.ensure_future(follower.follow())
        await asyncio.sleep(0.01)
        assert restarted.current.number == 3  # not back to the start-up codes
        assert (await restarted.reload(shards.load, shards.discard)).number == 4
        follower.task.cancel()

    asyncio.run(scenario())


def test_counters_end_at_zero_after_concurrent_requests_and_reloads() -> None:
    async def scenario() -> tuple[Generations, set[int], CatalogState]:
        shards = Shards()
        catalog = CatalogState(generation(0))
        follower = Follower("ingress", catalog)
        local = follower.generations
        seen: set[int] = set()

        async def request(arrive: float, hold: float) -> None:
            await asyncio.sleep(arrive)
            with local.pinned() as held:
                seen.add(held.number)
                await asyncio.sleep(hold)

        async def reloads() -> None:
            for _ in range(3):
                await asyncio.sleep(0.01)
                await catalog.reload(shards.load, shards.discard)

        await asyncio.gather(reloads(), *(request(0.0005 * i, 0.001 * (i % 7)) for i in range(200)))
        await asyncio.sleep(0.05)
        follower.task.cancel()
        return local, seen, catalog

    local, seen, catalog = asyncio.run(scenario())
    assert local.current.number == 3
    assert all(local.in_flight(number) == 0 for number in range(4))
    assert {0, 3} <= seen <= {0, 1, 2, 3}
    assert catalog.retirable() == 3
