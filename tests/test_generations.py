"""Index generations alone: a pinned request keeps its generation, a swap drains the previous one."""

from __future__ import annotations

import asyncio

import numpy as np
import pyarrow as pa
import pytest

from contracts.codes import CodesDir
from serve.generations import Generation, Generations, ShardSlice
from serve.index import CodeBook


def generation(number: int, count: int = 4) -> Generation:
    """A generation over a codes dir that exists only in memory (nothing here reads it)."""
    codes = CodesDir(f"mem://codes-{number}", {"bits": 16, "count": count}, ())
    ids = pa.array([f"item-{i}" for i in range(count)], pa.string())
    book = CodeBook(ids, np.zeros((count, 2), dtype=np.uint8))
    return Generation(number, codes, (ShardSlice(number, codes, 0, count),), book)


class Shards:
    """What the ingress's shards see: loads and retire calls, in order."""

    def __init__(self) -> None:
        self.retired_all_but: list[int] = []
        self.loaded: list[int] = []

    async def load(self, number: int) -> Generation:
        await asyncio.sleep(0)  # a real load waits on the shards
        self.loaded.append(number)
        return generation(number)

    async def retire_all_but(self, keep: Generation) -> None:
        self.retired_all_but.append(keep.number)


async def started(generations: Generations, shards: Shards) -> Generations:
    await generations.swap(shards.load, shards.retire_all_but)
    return generations


def test_the_first_swap_serves_generation_zero_and_retires_nothing() -> None:
    shards = Shards()
    generations = asyncio.run(started(Generations(), shards))
    assert generations.current.number == 0
    assert generations.current.count == 4
    assert shards.loaded == [0] and shards.retired_all_but == []


def test_pinning_before_any_generation_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no index generation"):
        with Generations().pinned():
            pass


def test_a_pin_during_a_swap_keeps_the_old_generation_until_released() -> None:
    async def scenario() -> None:
        shards = Shards()
        generations = await started(Generations(drain_poll_s=0.001), shards)
        with generations.pinned() as held:
            swap = asyncio.ensure_future(generations.swap(shards.load, shards.retire_all_but))
            await asyncio.sleep(0.05)
            # The new generation serves later requests at once...
            assert generations.current.number == 1
            with generations.pinned() as later:
                assert later.number == 1
            # ...while the request that pinned the old one still has it, loaded.
            assert held.number == 0
            assert generations.in_flight(0) == 1
            assert not swap.done()
            assert shards.retired_all_but == []
        assert (await asyncio.wait_for(swap, 5)).number == 1
        assert shards.retired_all_but == [1]  # generation 0 dropped only after the drain

    asyncio.run(scenario())


def test_the_swap_waits_for_every_request_of_the_previous_generation() -> None:
    async def scenario() -> list[str]:
        shards = Shards()
        generations = await started(Generations(drain_poll_s=0.001), shards)
        events: list[str] = []

        async def request(name: str, seconds: float) -> None:
            with generations.pinned():
                await asyncio.sleep(seconds)
            events.append(name)

        async def reload() -> None:
            await generations.swap(shards.load, shards.retire_all_but)
            events.append("swapped")

        requests = [asyncio.ensure_future(request(f"request-{i}", 0.02 * (i + 1))) for i in range(3)]
        await asyncio.sleep(0)  # every request pins generation 0 before the reload starts
        await asyncio.gather(reload(), *requests)
        return events

    assert asyncio.run(scenario()) == ["request-0", "request-1", "request-2", "swapped"]


def test_a_failed_load_leaves_the_current_generation_serving() -> None:
    async def scenario() -> None:
        shards = Shards()
        generations = await started(Generations(), shards)

        async def broken(number: int) -> Generation:
            raise ValueError(f"generation {number} cannot be read")

        with pytest.raises(ValueError, match="generation 1 cannot be read"):
            await generations.swap(broken, shards.retire_all_but)
        assert generations.current.number == 0
        assert shards.retired_all_but == [0]  # whatever the failed load left on the shards goes
        with generations.pinned() as held:
            assert held.number == 0
        assert (await generations.swap(shards.load, shards.retire_all_but)).number == 1

    asyncio.run(scenario())


def test_counters_end_at_zero_after_concurrent_requests_and_swaps() -> None:
    async def scenario() -> tuple[Generations, set[int]]:
        shards = Shards()
        generations = await started(Generations(drain_poll_s=0.001), shards)
        seen: set[int] = set()

        async def request(arrive: float, hold: float) -> None:
            await asyncio.sleep(arrive)
            with generations.pinned() as held:
                seen.add(held.number)
                await asyncio.sleep(hold)

        async def reloads() -> None:
            for _ in range(3):
                await asyncio.sleep(0.01)
                await generations.swap(shards.load, shards.retire_all_but)

        # Arrivals spread over about 0.1 s, across the three swaps.
        await asyncio.gather(reloads(), *(request(0.0005 * i, 0.001 * (i % 7)) for i in range(200)))
        await asyncio.gather(*(request(0, 0.002) for _ in range(20)))
        return generations, seen

    generations, seen = asyncio.run(scenario())
    assert generations.current.number == 3
    assert all(generations.in_flight(number) == 0 for number in range(4))
    assert {0, 3} <= seen <= {0, 1, 2, 3}
