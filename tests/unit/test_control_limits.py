"""control.limits.SharedResult and the deadline cap, without a server."""

from __future__ import annotations

import asyncio
import time

import pytest

from control import limits
from control.limits import SharedResult
from control.store import Deadline


async def test_concurrent_callers_share_one_load_and_reuse_it_within_the_ttl() -> None:
    loads = 0

    async def load() -> int:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.05)
        return loads

    shared: SharedResult[int] = SharedResult(ttl=60)
    assert await asyncio.gather(*(shared.get(load, 5) for _ in range(50))) == [1] * 50
    assert await shared.get(load, 5) == 1 and loads == 1
    shared.invalidate()
    assert await shared.get(load, 5) == 2


async def test_a_failed_load_reaches_every_waiter_and_is_not_kept() -> None:
    attempts = 0

    async def load() -> int:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.01)
        if attempts == 1:
            raise TimeoutError("slow database")
        return 7

    shared: SharedResult[int] = SharedResult(ttl=60)
    results = await asyncio.gather(*(shared.get(load, 5) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, TimeoutError) for r in results)
    assert await shared.get(load, 5) == 7


async def test_a_waiter_gives_up_at_its_own_deadline_without_cancelling_the_load() -> None:
    done = asyncio.Event()

    async def load() -> int:
        await asyncio.sleep(0.2)
        done.set()
        return 1

    shared: SharedResult[int] = SharedResult(ttl=60)
    with pytest.raises(TimeoutError):
        await shared.get(load, 0.01)
    assert await shared.get(load, 5) == 1 and done.is_set()


async def test_a_slow_load_is_reused_for_ten_times_as_long_as_it_took() -> None:
    loads = 0

    async def load() -> int:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.05)
        return loads

    shared: SharedResult[int] = SharedResult(ttl=0.01)
    await shared.get(load, 5)
    await asyncio.sleep(0.1)  # past the ttl, within 10 x 0.05 s
    assert await shared.get(load, 5) == 1


def test_the_deadline_never_passes_the_server_cap() -> None:
    assert Deadline(None).left() is None
    token = limits._call_cap.set(time.monotonic() + 2)
    try:
        uncapped = Deadline(None).left()
        assert uncapped is not None and 1 < uncapped <= 2
        longer = Deadline(3600).left()
        assert longer is not None and longer <= 2
        shorter = Deadline(0.5).left()
        assert shorter is not None and shorter <= 0.5
    finally:
        limits._call_cap.reset(token)
