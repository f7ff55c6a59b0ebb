"""A real control-plane server for integration tests: loopback, both tokens, no shutdown grace."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from control.server import ControlServer, ControlSettings
from tests.conftest import settings_for

ADMIN_TOKEN = "admin-token-for-tests-0123456789"
READ_TOKEN = "read-token-for-tests-0123456789"


async def start_server(database_url: str, schema: str, **overrides: Any) -> ControlServer:
    overrides.setdefault("addr", "127.0.0.1:0")
    settings = ControlSettings(admin_token=ADMIN_TOKEN, read_token=READ_TOKEN, shutdown_grace=0, **overrides)
    server = ControlServer(settings, settings_for(database_url, schema))
    await server.start()
    return server


async def serving(database_url: str, schema: str) -> AsyncIterator[ControlServer]:
    """The body of a `server` fixture."""
    server = await start_server(database_url, schema)
    try:
        yield server
    finally:
        await server.stop(0)


async def lock_waiters(conn: asyncpg.Connection, schema: str) -> int:
    """How many other sessions wait for a lock (a table's or a row's) in a statement on `schema`."""
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND pid <> pg_backend_pid() AND strpos(query, '\"' || $1 || '\"') > 0",
            schema,
        )
    )
