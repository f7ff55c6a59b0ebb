"""Open-loop pacing of writers (stdlib only: the peer runners import it from their own venv)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable


async def paced(rate: int, seconds: float, tasks: int, send: Callable[[int], Awaitable[None]]) -> int:
    """Open loop: event n is due at start + n / rate; `tasks` workers send events when due (at once
    when behind). Returns how many were sent."""
    total = int(rate * seconds)
    counter = itertools.count()
    sent = 0
    start = time.monotonic() + 0.05

    async def worker() -> None:
        nonlocal sent
        while (n := next(counter)) < total:
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await send(n)
            sent += 1

    await asyncio.gather(*(worker() for _ in range(tasks)))
    return sent
