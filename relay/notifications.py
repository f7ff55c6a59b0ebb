"""LISTEN for the outbox insert trigger, so a committed row is claimed at once.
Polling stays the fallback: a lost notification only delays, never loses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg

from relay.retry import FailureBackoff
from relay.sql import notify_channel
from relay.store import TRANSIENT_DB_ERRORS, RelayStore
from relay.supervision import describe

log = logging.getLogger(__name__)


class InsertListener:
    """Keeps one dedicated session LISTENing; calls `wake(partition)` per notification and
    `wake_all()` after each (re)connect, since notifications sent while away are gone.

    Transient database errors (a lost connection, a cancelled probe) reconnect here with backoff,
    each reported to `on_db_error` (a metric); anything else propagates to the supervisor that
    runs `run` (relay.supervision), which logs it with its traceback and restarts it."""

    def __init__(
        self,
        store: RelayStore,
        wake: Callable[[int], None],
        wake_all: Callable[[], None],
        on_db_error: Callable[[BaseException], None] | None = None,
    ):
        self._store = store
        self._on_db_error = on_db_error
        self._wake = wake
        self._wake_all = wake_all
        self._channel = notify_channel(store.schema)
        self._lost = asyncio.Event()
        self.connected = False

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            self._wake(int(payload))
        except ValueError:
            self._wake_all()

    def _on_terminate(self, _conn: object) -> None:
        self._lost.set()

    async def run(self) -> None:
        backoff = FailureBackoff(0.2, 10.0)
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._store.connect_listener()
                conn.add_termination_listener(self._on_terminate)
                await conn.add_listener(self._channel, self._on_notify)
                self._lost.clear()
                self.connected = True
                if backoff.failing:
                    log.info("listening for outbox inserts again")
                backoff.succeeded()
                self._wake_all()
                await self._watch(conn)
            except TRANSIENT_DB_ERRORS as exc:
                if self._on_db_error is not None:
                    self._on_db_error(exc)
                delay = backoff.failed()
                log.warning("listen connection lost (%s); reconnecting in %.1fs", describe(exc), delay)
                await asyncio.sleep(delay)
            finally:
                self.connected = False
                if conn is not None and not conn.is_closed():
                    conn.terminate()

    async def _watch(self, conn: asyncpg.Connection) -> None:
        # A silent half-open TCP connection never terminates by itself: probe it.
        while not self._lost.is_set():
            try:
                async with asyncio.timeout(5.0):  # not wait_for: on 3.11 it can swallow a stop
                    await self._lost.wait()
            except TimeoutError:
                await conn.execute("SELECT 1", timeout=5.0)
        raise ConnectionResetError("listen connection terminated")
