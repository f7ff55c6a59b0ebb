"""Outbox Relay's side of the peer comparison (runs in the bench's own venv): its writer API
(`clients.aenqueue` on asyncpg, in the writer's transaction), the same commands and events as the
peers' runners. The harness migrates the schema (relay.migrate) and runs the relay itself as an
`outbox-relay run` process with its defaults (bench.stack.relays), so `setup` and `relay` are not
used here."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import asyncpg

from bench.peers.runner import Env, Send, event, main
from clients.writer import aenqueue

HEADERS = {"content-type": "application/json"}


class OutboxRelay:
    def __init__(self, env: Env) -> None:
        self.env = env

    async def setup(self) -> None:
        raise SystemExit("the harness migrates outbox-relay's schema itself (relay.migrate)")

    async def relay(self, ready: Callable[[], None], stop: asyncio.Event) -> None:
        raise SystemExit("the harness runs `outbox-relay run` itself (bench.stack.relays)")

    async def backlog(self, count: int, size: int) -> float:
        conn = await asyncpg.connect(self.env.dsn)
        try:
            async with conn.transaction():
                for n in range(count):
                    key, payload = event(n, size, timed=False)
                    await aenqueue(
                        conn, self.env.topic, payload, key=key, headers=HEADERS, schema=self.env.schema
                    )
            return time.time()  # the commit has returned
        finally:
            await conn.close()

    @contextlib.asynccontextmanager
    async def writer(self, tasks: int) -> AsyncIterator[Send]:
        pool = await asyncpg.create_pool(self.env.dsn, min_size=tasks, max_size=tasks)

        async def send(n: int) -> None:
            key, payload = event(n, 200, timed=True)
            async with pool.acquire() as conn, conn.transaction():
                await aenqueue(
                    conn, self.env.topic, payload, key=key, headers=HEADERS, schema=self.env.schema
                )

        try:
            yield send
        finally:
            await pool.close()


if __name__ == "__main__":
    main(OutboxRelay)
