"""relay.budget.ByteBudget: the process-wide in-flight byte budget. Pure asyncio, no servers."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest

from relay.budget import ByteBudget, row_bytes
from relay.events import OutboxRow


async def settle() -> None:
    """Lets every ready task run."""
    for _ in range(5):
        await asyncio.sleep(0)


def started(budget: ByteBudget, n: int, log: list[int] | None = None) -> asyncio.Task[None]:
    async def take() -> None:
        await budget.acquire(n)
        if log is not None:
            log.append(n)

    return asyncio.create_task(take())


async def test_acquire_within_the_budget_does_not_wait() -> None:
    budget = ByteBudget(100)
    await budget.acquire(60)
    await budget.acquire(40)
    assert budget.in_use == 100
    budget.release(100)
    assert budget.in_use == 0


async def test_acquire_waits_until_enough_is_released() -> None:
    budget = ByteBudget(100)
    await budget.acquire(80)
    waiter = started(budget, 30)
    await settle()
    assert not waiter.done() and budget.waiting == 1
    budget.release(40)  # 40 held: 30 fits now
    await settle()
    assert waiter.done() and budget.in_use == 70


async def test_waiters_are_served_first_come_first_served() -> None:
    budget = ByteBudget(100)
    await budget.acquire(100)
    order: list[int] = []
    big = started(budget, 90, order)
    await settle()
    small = started(budget, 10, order)
    await settle()
    budget.release(10)  # 10 free: the small one would fit, but the big one is first in line
    await settle()
    assert order == [] and not small.done()
    budget.release(90)  # everything free: big (90), then small (10) fits too
    await settle()
    assert order == [90, 10]
    assert big.done() and small.done() and budget.in_use == 100


async def test_try_acquire_does_not_jump_the_line() -> None:
    budget = ByteBudget(100)
    await budget.acquire(95)
    waiter = started(budget, 50)
    await settle()
    assert not budget.try_acquire(5)  # it fits, but someone is waiting
    budget.release(95)
    await settle()
    assert waiter.done()
    assert budget.try_acquire(50)
    assert not budget.try_acquire(1)
    assert budget.in_use == 100


async def test_a_request_larger_than_the_budget_is_granted_when_nothing_else_is_held() -> None:
    budget = ByteBudget(100)
    await budget.acquire(500)  # nothing held: granted at once, no deadlock
    assert budget.in_use == 500
    budget.release(500)

    await budget.acquire(1)
    oversized = started(budget, 500)
    await settle()
    assert not oversized.done()
    budget.release(1)
    await settle()
    assert oversized.done() and budget.in_use == 500
    later = started(budget, 1)
    await settle()
    assert not later.done(), "nothing else while the oversized request holds more than everything"
    budget.release(500)
    await settle()
    assert later.done() and budget.in_use == 1


async def test_a_cancelled_waiter_leaves_the_line_and_lets_the_next_one_in() -> None:
    budget = ByteBudget(100)
    await budget.acquire(50)
    blocked = started(budget, 80)  # waits for 80
    await settle()
    behind = started(budget, 40)  # 40 would fit, but waits behind 80
    await settle()
    assert not behind.done()
    blocked.cancel()
    await settle()
    assert blocked.cancelled()
    assert behind.done(), "the head of the line left: the next request fits and is granted"
    assert budget.in_use == 90 and budget.waiting == 0


async def test_cancelled_right_after_the_grant_gives_the_bytes_back() -> None:
    budget = ByteBudget(100)
    await budget.acquire(100)
    waiter = started(budget, 60)
    await settle()
    budget.release(100)  # grants the waiter's future...
    waiter.cancel()  # ...but the task is cancelled before it runs again
    await settle()
    assert waiter.cancelled()
    assert budget.in_use == 0, "a grant the caller never saw must not leak"


async def test_acquire_with_a_timeout_holds_nothing_after_timing_out() -> None:
    budget = ByteBudget(10)
    await budget.acquire(10)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(budget.acquire(5), timeout=0.01)
    assert budget.waiting == 0 and budget.in_use == 10
    budget.release(10)
    assert budget.try_acquire(10)


async def test_many_concurrent_users_never_exceed_the_budget() -> None:
    budget = ByteBudget(1000)
    peak = 0

    async def user(n: int) -> None:
        nonlocal peak
        for _ in range(20):
            await budget.acquire(n)
            peak = max(peak, budget.in_use)
            await asyncio.sleep(0)
            budget.release(n)

    await asyncio.gather(*(user(100 + 37 * i) for i in range(12)))
    assert 0 < peak <= 1000
    assert budget.in_use == 0 and budget.waiting == 0


def test_bad_amounts_are_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        ByteBudget(0)
    budget = ByteBudget(10)
    with pytest.raises(ValueError, match="negative"):
        budget.try_acquire(-1)
    assert budget.try_acquire(4)
    with pytest.raises(ValueError, match="only 4 are held"):
        budget.release(5)
    assert budget.try_acquire(0) and budget.in_use == 4


def test_row_bytes_counts_payload_key_and_headers() -> None:
    row = OutboxRow(
        id=1,
        message_id=uuid.uuid4(),
        topic="orders",
        key="clé",
        payload=b"x" * 1000,
        headers={"content-type": "json"},
        created_at=datetime.now(UTC),
        attempts=0,
    )
    assert row_bytes(row) == 1000 + len("clé".encode()) + len("content-type") + len("json")


def test_rows_with_the_same_headers_text_share_one_decoded_copy_and_its_size() -> None:
    record = {
        "id": 1,
        "message_id": uuid.uuid4(),
        "topic": "orders",
        "key": None,
        "payload": b"x",
        "headers": '{"content-type": "application/json", "tenant": "été"}',
        "created_at": datetime.now(UTC),
        "attempts": 0,
    }
    first, second = OutboxRow.from_record(record), OutboxRow.from_record({**record, "id": 2})
    assert first.headers is second.headers
    assert first.headers == {"content-type": "application/json", "tenant": "été"}
    as_plain_dict = OutboxRow(**{**record, "headers": dict(first.headers)})  # type: ignore[arg-type]
    assert row_bytes(first) == row_bytes(as_plain_dict) == 1 + len("content-typeapplication/jsontenant") + len(
        "été".encode()
    )
