"""The process-wide byte budget for events held in memory (OUTBOX_INFLIGHT_MAX_BYTES).

Each partition worker takes a claim's worth (OUTBOX_CLAIM_MAX_BYTES) before it claims, gives back
what the claimed rows do not use, and the rest once the batch is settled or dropped. Workers wait in
line (FIFO) while the budget is used up, so however many partitions an instance holds, the events it
holds at once stay within the budget."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from relay.events import OutboxRow, headers_size


def row_bytes(row: OutboxRow) -> int:
    """What a claimed row counts against the budget: payload, key and header bytes (about what the
    claim query sums: octet_length of payload, key and headers)."""
    size = len(row.payload)
    if row.key is not None:
        size += len(row.key.encode())
    return size + headers_size(row.headers)


class ByteBudget:
    """An asyncio byte semaphore with first-come, first-served waiting.

    A request larger than the whole budget is granted once nothing else is held, so it can neither
    deadlock nor be refused. While one request waits, later ones wait behind it even if they would
    fit (fairness: a large claim is not starved by small ones)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a byte budget needs a capacity of at least 1, not {capacity}")
        self.capacity = capacity
        self._in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def in_use(self) -> int:
        """Bytes granted and not yet released (may exceed the capacity by one oversized request)."""
        return self._in_use

    @property
    def waiting(self) -> int:
        """Requests waiting in line."""
        return sum(1 for _, future in self._waiters if not future.done())

    def _fits(self, n: int) -> bool:
        return self._in_use == 0 or self._in_use + n <= self.capacity

    def try_acquire(self, n: int) -> bool:
        """Takes n bytes at once if they fit and nobody is waiting; False otherwise (no waiting)."""
        _check(n)
        if n == 0 or (not self._waiters and self._fits(n)):
            self._in_use += n
            return True
        return False

    async def acquire(self, n: int) -> None:
        """Takes n bytes, waiting in line while they do not fit. Cancelling the wait leaves the line
        (or gives back bytes granted just before the cancellation): nothing is held after it."""
        if self.try_acquire(n):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(n)  # granted, but the caller will never know
            else:
                # Leaving the head of the line may let the next ones in.
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._grant()
            raise

    def release(self, n: int) -> None:
        _check(n)
        if n > self._in_use:
            raise ValueError(f"releasing {n} bytes but only {self._in_use} are held")
        self._in_use -= n
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            n, future = self._waiters[0]
            if future.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if not self._fits(n):
                return
            self._waiters.popleft()
            self._in_use += n
            future.set_result(None)


def _check(n: int) -> None:
    if n < 0:
        raise ValueError(f"a byte count cannot be negative: {n}")
