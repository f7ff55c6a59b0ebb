"""The inbox's SQL (queries.sql, next to this file) for each supported driver, and the driver adapters:
one statement run, in a transaction the adapter opens, for every connection type the inbox accepts.

Only modules the application already imported are consulted: a connection of a class implies its
module is loaded, so no optional library is ever imported here (as clients/writer.py)."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from relay.shared.sqlblocks import bind_schema, load_blocks

Row = tuple[Any, ...]

_PLACEHOLDER = re.compile(r"\$(\d+)")


@cache
def statements(schema: str, style: str) -> dict[str, str]:
    """Every block of queries.sql for `schema`, with the placeholders of `style`:
    'asyncpg' ($1), 'psycopg' (%(p1)s) or 'sqlalchemy' (:p1)."""
    bound = {
        name: "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
        for name, sql in bind_schema(load_blocks("clients.inbox", "queries.sql"), schema).items()
    }
    if style == "asyncpg":
        return bound
    if style == "psycopg":
        return {name: _PLACEHOLDER.sub(r"%(p\1)s", sql.replace("%", "%%")) for name, sql in bound.items()}
    if style == "sqlalchemy":
        return {name: _PLACEHOLDER.sub(r":p\1", sql) for name, sql in bound.items()}
    raise ValueError(f"unknown placeholder style {style!r}")


def _named(params: Sequence[Any]) -> dict[str, Any]:
    return {f"p{index}": value for index, value in enumerate(params, start=1)}


# --- async adapters ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AsyncDriver:
    name: str
    style: str

    def in_transaction(self, conn: Any) -> bool:
        raise NotImplementedError

    def transaction(self, conn: Any) -> contextlib.AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def fetch(self, conn: Any, sql: str, params: Sequence[Any]) -> list[Row]:
        raise NotImplementedError


class _Asyncpg(AsyncDriver):
    def in_transaction(self, conn: Any) -> bool:
        return bool(conn.is_in_transaction())

    def transaction(self, conn: Any) -> contextlib.AbstractAsyncContextManager[Any]:
        return conn.transaction()

    async def fetch(self, conn: Any, sql: str, params: Sequence[Any]) -> list[Row]:
        return [tuple(record) for record in await conn.fetch(sql, *params)]


class _PsycopgAsync(AsyncDriver):
    def in_transaction(self, conn: Any) -> bool:
        from psycopg.pq import TransactionStatus

        return conn.info.transaction_status != TransactionStatus.IDLE

    def transaction(self, conn: Any) -> contextlib.AbstractAsyncContextManager[Any]:
        return conn.transaction()

    async def fetch(self, conn: Any, sql: str, params: Sequence[Any]) -> list[Row]:
        from psycopg.rows import tuple_row

        # tuple_row: the application may have set a dict row factory on its connection.
        async with conn.cursor(row_factory=tuple_row) as cursor:
            await cursor.execute(sql, _named(params))
            return list(await cursor.fetchall())


class _SqlalchemyAsync(AsyncDriver):
    def in_transaction(self, conn: Any) -> bool:
        return bool(conn.in_transaction())

    @contextlib.asynccontextmanager
    async def _begin(self, conn: Any) -> AsyncIterator[Any]:
        async with conn.begin() as transaction:
            yield transaction

    def transaction(self, conn: Any) -> contextlib.AbstractAsyncContextManager[Any]:
        return self._begin(conn)

    async def fetch(self, conn: Any, sql: str, params: Sequence[Any]) -> list[Row]:
        from sqlalchemy import text

        result = await conn.execute(text(sql), _named(params))
        return [tuple(row) for row in result.all()] if result.returns_rows else []


# --- sync adapters -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncDriver:
    name: str
    style: str

    def in_transaction(self, conn: Any) -> bool:
        raise NotImplementedError

    def transaction(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def fetch(self, conn: Any, sql: str, params: Sequence[Any]) -> list[Row]:
        raise NotImplementedError


class _Psycopg(SyncDriver):
    def in_transaction(self, conn: Any) -> bool:
        from psycopg.pq import TransactionStatus

        return conn.info.transaction_status != TransactionStatus.IDLE

    def transaction(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        return conn.transaction()

    def fetch(self, conn: Any, sql: str, params: Sequence[Any]) -> list[Row]:
        from psycopg.rows import tuple_row

        with conn.cursor(row_factory=tuple_row) as cursor:
            cursor.execute(sql, _named(params))
            return list(cursor.fetchall())


class _Sqlalchemy(SyncDriver):
    def in_transaction(self, conn: Any) -> bool:
        return bool(conn.in_transaction())

    @contextlib.contextmanager
    def _begin(self, conn: Any) -> Iterator[Any]:
        with conn.begin() as transaction:
            yield transaction

    def transaction(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        return self._begin(conn)

    def fetch(self, conn: Any, sql: str, params: Sequence[Any]) -> list[Row]:
        from sqlalchemy import text

        result = conn.execute(text(sql), _named(params))
        return [tuple(row) for row in result.all()] if result.returns_rows else []


# (module, class, driver). asyncpg pool connections are proxies, not Connection subclasses.
_ASYNC: tuple[tuple[str, str, AsyncDriver], ...] = (
    ("asyncpg", "Connection", _Asyncpg("asyncpg", "asyncpg")),
    ("asyncpg.pool", "PoolConnectionProxy", _Asyncpg("asyncpg", "asyncpg")),
    ("psycopg", "AsyncConnection", _PsycopgAsync("psycopg", "psycopg")),
    ("sqlalchemy.ext.asyncio", "AsyncConnection", _SqlalchemyAsync("sqlalchemy", "sqlalchemy")),
)
_SYNC: tuple[tuple[str, str, SyncDriver], ...] = (
    ("psycopg", "Connection", _Psycopg("psycopg", "psycopg")),
    ("sqlalchemy.engine", "Connection", _Sqlalchemy("sqlalchemy", "sqlalchemy")),
)


def _match(conn: object, drivers: Sequence[tuple[str, str, Any]]) -> Any:
    for module_name, class_name, driver in drivers:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and isinstance(conn, cls):
            return driver
    return None


def _kind(conn: object) -> str:
    return f"{type(conn).__module__}.{type(conn).__qualname__}"


def _names(drivers: Sequence[tuple[str, str, Any]]) -> str:
    return ", ".join(f"{module}.{cls}" for module, cls, _ in drivers if module != "asyncpg.pool")


def async_driver(conn: object) -> AsyncDriver:
    driver = _match(conn, _ASYNC)
    if driver is not None:
        return driver
    if _match(conn, _SYNC) is not None:
        raise TypeError(f"{_kind(conn)} is a synchronous connection: use Inbox, not AsyncInbox")
    raise TypeError(f"unsupported connection type {_kind(conn)} for AsyncInbox; pass one of: {_names(_ASYNC)}")


def sync_driver(conn: object) -> SyncDriver:
    driver = _match(conn, _SYNC)
    if driver is not None:
        return driver
    if _match(conn, _ASYNC) is not None:
        raise TypeError(f"{_kind(conn)} is an asynchronous connection: use AsyncInbox, not Inbox")
    raise TypeError(f"unsupported connection type {_kind(conn)} for Inbox; pass one of: {_names(_SYNC)}")
