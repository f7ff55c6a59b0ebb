"""AsyncInbox: the inbox for asyncio connections (asyncpg, psycopg AsyncConnection, SQLAlchemy
AsyncConnection)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from clients.inbox import core, metrics
from clients.inbox.model import (
    InboxError,
    InboxMessage,
    InboxResult,
    InboxSettings,
    check_message,
    error_text,
)
from clients.inbox.statements import AsyncDriver, async_driver, statements

AsyncHandler = Callable[[Any, InboxMessage], Awaitable[object]]


class AsyncInbox:
    """Processes each message once per consumer: see clients.inbox.

    Arguments left out come from the environment: OUTBOX_INBOX_LOCK_STALE_THRESHOLD (seconds,
    default 300), OUTBOX_INBOX_MAX_ATTEMPTS (default 5), and the worker id from POD_NAME, else
    hostname:pid."""

    def __init__(
        self,
        consumer: str,
        *,
        schema: str = "outbox",
        lock_stale_threshold: float | None = None,
        max_attempts: int | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.settings = InboxSettings.resolve(
            consumer,
            schema=schema,
            lock_stale_threshold=lock_stale_threshold,
            max_attempts=max_attempts,
            worker_id=worker_id,
        )
        self._left_behind = core.LeftBehind()

    @property
    def consumer(self) -> str:
        return self.settings.consumer

    @property
    def worker_id(self) -> str:
        return self.settings.worker_id

    async def process(self, conn: Any, message: InboxMessage, handler: AsyncHandler) -> InboxResult:
        """Claims `message` (committed on its own), then runs ``await handler(conn, message)`` in a
        transaction that also marks it processed, fenced by the claim; see InboxOutcome for the results.
        `conn` must not be inside a transaction. A handler exception is rolled back and recorded (FAILED
        or GAVE_UP); a database error propagates. A claim this instance could not give back (its
        connection broke) is released by this instance on the message's next delivery, counted as an
        attempt; had the process died instead, another worker takes it over once it is stale."""
        message = check_message(message)
        driver = self._driver(conn)
        sql = statements(self.settings.schema, driver.style)
        await self._release_left_behind(driver, conn, sql, message)
        claim = await self._claim(driver, conn, sql, message)
        if not claim.claimed:
            return core.skipped(self.settings, message, claim)
        core.took_over(self.settings, message, claim)
        fence = core.fence(self.settings, message, claim.attempts)
        try:
            async with driver.transaction(conn):
                outcome = handler(conn, message)
                if inspect.isawaitable(outcome):
                    await outcome
                if not await driver.fetch(conn, sql["mark_processed"], fence):
                    raise core.FenceLost
        except core.FenceLost:
            state = await self._state(driver, conn, sql, message)
            return core.fence_lost(self.settings, message, claim, state)
        except Exception as error:
            text = error_text(error)
            try:
                async with driver.transaction(conn):
                    released = await driver.fetch(
                        conn, sql["release"], (*fence, text, self.settings.max_attempts)
                    )
            except BaseException:
                self._left_behind.remember(message.message_id, claim.attempts)
                raise
            return core.failed(self.settings, message, claim, error, text, released)
        except BaseException as interruption:  # cancelled (shutdown): give the claim back, uncounted
            try:
                async with driver.transaction(conn):
                    reason = f"interrupted: {error_text(interruption)}"
                    await driver.fetch(conn, sql["release"], (*fence, reason, core.NO_LIMIT))
            except BaseException:
                self._left_behind.remember(message.message_id, claim.attempts)
            raise
        return core.processed(self.settings, claim)

    async def _release_left_behind(
        self, driver: AsyncDriver, conn: Any, sql: dict[str, str], message: InboxMessage
    ) -> None:
        attempts = self._left_behind.take(message.message_id)
        if attempts is None:
            return
        fence = core.fence(self.settings, message, attempts)
        try:
            async with driver.transaction(conn):
                await driver.fetch(
                    conn, sql["release"], (*fence, core.LEFT_BEHIND_REASON, self.settings.max_attempts)
                )
        except BaseException:
            self._left_behind.remember(message.message_id, attempts)
            raise

    async def count_stale_locks(self, conn: Any) -> int:
        """Claims of this consumer older than the stale threshold, also reported by the gauge
        outbox_inbox_stale_locks; call it periodically (the consumer runner does)."""
        driver = self._driver(conn)
        sql = statements(self.settings.schema, driver.style)
        async with driver.transaction(conn):
            [(count,)] = await driver.fetch(
                conn, sql["count_stale_locks"], (self.settings.consumer, self.settings.lock_stale_threshold)
            )
        metrics.set_stale_locks(self.settings.consumer, self.settings.schema, int(count))
        return int(count)

    def _driver(self, conn: Any) -> AsyncDriver:
        driver = async_driver(conn)
        if driver.in_transaction(conn):
            raise InboxError(
                "the connection is inside a transaction: the inbox commits the claim on its own, then runs "
                "the handler in a transaction of its own; pass a connection with no transaction open"
            )
        return driver

    async def _claim(
        self, driver: AsyncDriver, conn: Any, sql: dict[str, str], message: InboxMessage
    ) -> core.Claim:
        params = core.claim_params(self.settings, message)
        claim = core.Claim(False)
        for _ in range(core.CLAIM_ROUNDS):
            async with driver.transaction(conn):
                [row] = await driver.fetch(conn, sql["claim"], params)
            claim = core.read_claim(row)
            if claim.claimed or claim.result is not None:
                return claim
            claim = await self._state(driver, conn, sql, message)
            if claim.result is not None:
                return claim
        return claim

    async def _state(self, driver: AsyncDriver, conn: Any, sql: dict[str, str], message: InboxMessage) -> core.Claim:
        async with driver.transaction(conn):
            rows = await driver.fetch(conn, sql["state"], (self.settings.consumer, message.message_id))
        return core.read_state(rows[0] if rows else None)
