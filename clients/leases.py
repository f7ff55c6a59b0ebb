"""Leases for your own singleton jobs, in the relay's `distributed_locks` table (issue 15).

    async with lease(pool, "reconcile-invoices", ttl=30) as held:      # asyncpg pool or connection
        await reconcile(fence=held.token)

    with lease_sync(database_url, "reconcile-invoices", ttl=30) as held:   # psycopg 3
        for batch in batches():
            held.check()                   # raises LeaseLost once the lease is gone
            reconcile(batch)

Entering acquires the lease (`LeaseUnavailable` if someone else holds it, or with ``wait=True``
retries until it is free); while the body runs the lease is renewed every ``ttl / 3`` seconds,
fenced by its token; leaving releases it. ``held.token`` is the fencing token: it grows every time
the lease changes hands, so a write guarded by ``WHERE EXISTS (SELECT 1 FROM distributed_locks
WHERE name = … AND holder = … AND token = …)`` is refused once someone else took over (see
docs/leases.md).

When the lease is lost (a renewal finds it taken or released, e.g. by ``outboxctl release-lock``,
or no renewal succeeded for a whole ``ttl``), ``held.lost`` is set and:

- async: the task running the ``async with`` is cancelled and the block raises `LeaseLost`;
- sync: the body cannot be interrupted, so it should check ``held.lost`` / ``held.check()``; the
  block raises `LeaseLost` when it ends.

Connections. Async: an asyncpg ``Pool`` (recommended: renewals take their own connection) or a
``Connection`` that the lease may use on its own (not inside a transaction, and not used by the
body concurrently: asyncpg runs one statement at a time per connection). Sync: a psycopg 3
``Connection`` (only its connection parameters are used, password included), a conninfo string, or
a callable returning a new psycopg connection; the lease opens one autocommit connection of its own
for acquire, renewals (from a background thread) and release, so your connection's transactions
are never touched.

The names ``leader`` and ``partition:*`` belong to the relay and raise ValueError. Nothing of the
relay is imported here; asyncpg, psycopg and OpenTelemetry are imported only when used. Metrics
(OpenTelemetry meter ``outbox_relay.leases``, attribute ``lease``):
``outbox_user_lease_acquisitions_total``, ``outbox_user_lease_failures_total`` (a ``lease()`` that
could not acquire: unavailable, timed out or a database error) and ``outbox_user_lease_losses_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

__all__ = [
    "HeldLease",
    "LeaseError",
    "LeaseLost",
    "LeaseUnavailable",
    "lease",
    "lease_sync",
]

MAX_NAME_LENGTH = 200
MIN_TTL = 0.5
MAX_TTL = 86_400.0
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # as relay.shared.identifiers.validate_schema_name
_RESERVED = re.compile(r"leader|partition:.*", re.DOTALL)

# The same statements as relay/sql/queries.sql lease_acquire / lease_renew / lease_release, for one
# lease; every parameter appears once and in order, so the psycopg form is a plain substitution.
_ACQUIRE = """INSERT INTO {s}.distributed_locks AS l (name, holder, token, acquired_at, renewed_at, expires_at)
VALUES ($1::text, $2::text, 1, now(), now(), now() + make_interval(secs => $3::float8))
ON CONFLICT (name) DO UPDATE
SET holder = excluded.holder, token = l.token + 1, acquired_at = now(), renewed_at = now(),
    expires_at = excluded.expires_at
WHERE l.holder IS NULL OR l.expires_at <= now()
RETURNING l.token"""
_RENEW = """UPDATE {s}.distributed_locks l
SET expires_at = now() + make_interval(secs => $1::float8), renewed_at = now()
WHERE l.name = $2::text AND l.token = $3::bigint AND l.holder = $4::text AND l.expires_at > now()
RETURNING l.token"""
_RELEASE = """UPDATE {s}.distributed_locks l
SET holder = NULL, expires_at = now()
WHERE l.name = $1::text AND l.token = $2::bigint AND l.holder = $3::text"""
_CURRENT = """SELECT holder, greatest(extract(epoch FROM expires_at - now()), 0)::float8
FROM {s}.distributed_locks WHERE name = $1::text AND holder IS NOT NULL AND expires_at > now()"""


def _psycopg(statement: str) -> str:
    return re.sub(r"\$\d+", "%s", statement)


class LeaseError(Exception):
    """Base of the lease errors."""


class LeaseUnavailable(LeaseError):
    """Someone else holds the lease (or it could not be acquired within ``wait_timeout``)."""

    def __init__(self, name: str, holder: str | None, expires_in: float | None) -> None:
        self.name, self.holder, self.expires_in = name, holder, expires_in
        if holder is None:
            message = f"lease {name!r} is unavailable"
        else:
            message = f"lease {name!r} is held by {holder!r} (expires in {expires_in or 0:.1f} s unless renewed)"
        super().__init__(message)


class LeaseLost(LeaseError):
    """The lease was lost while held: taken over, released by an operator, or not renewed in time."""

    def __init__(self, name: str, token: int, reason: str) -> None:
        self.name, self.token, self.reason = name, token, reason
        super().__init__(f"lease {name!r} (token {token}) was lost: {reason}")


@dataclass
class HeldLease:
    """A lease while held. ``token`` is the fencing token; ``lost`` is set once the lease is gone."""

    name: str
    holder: str
    token: int
    ttl: float
    schema: str
    lost: threading.Event = field(default_factory=threading.Event)
    lost_reason: str | None = None

    def check(self) -> None:
        """Raises `LeaseLost` if the lease is gone."""
        if self.lost.is_set():
            raise LeaseLost(self.name, self.token, self.lost_reason or "lost")

    def _lose(self, reason: str) -> bool:
        if self.lost.is_set():
            return False
        self.lost_reason = reason
        self.lost.set()
        _count("losses", self.name)
        return True


# --- shared checks and metrics -------------------------------------------------------------------


def _check(name: str, ttl: float, schema: str, holder: str | None) -> tuple[str, str]:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH or "\x00" in name:
        raise ValueError(f"lease name must be 1..{MAX_NAME_LENGTH} characters without NUL: {name!r}")
    if name != name.strip():
        raise ValueError(f"lease name must not start or end with whitespace: {name!r}")
    if _RESERVED.fullmatch(name):
        raise ValueError(f"lease name {name!r} is reserved for the relay (leader, partition:*)")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not MIN_TTL <= ttl <= MAX_TTL:
        raise ValueError(f"ttl must be a number of seconds in [{MIN_TTL}, {MAX_TTL}]: {ttl!r}")
    if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"schema must be a lower-case SQL identifier: {schema!r}")
    if holder is None:
        holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    elif not isinstance(holder, str) or not holder or len(holder) > MAX_NAME_LENGTH or "\x00" in holder:
        raise ValueError(f"holder must be 1..{MAX_NAME_LENGTH} characters without NUL: {holder!r}")
    return name, holder


_counters: dict[str, Any] = {}
_counters_lock = threading.Lock()


def _count(kind: str, name: str) -> None:
    """Adds one to outbox_user_lease_<kind>_total{lease=name}; nothing if OpenTelemetry is missing."""
    try:
        with _counters_lock:
            counter = _counters.get(kind)
            if counter is None:
                from opentelemetry import metrics

                counter = metrics.get_meter("outbox_relay.leases").create_counter(
                    f"outbox_user_lease_{kind}_total", description=f"User lease {kind}, per lease name."
                )
                _counters[kind] = counter
        counter.add(1, {"lease": name})
    except Exception:  # pragma: no cover - metrics must never break a lease (no OpenTelemetry, bad SDK)
        pass


def _retry_interval(ttl: float, retry_interval: float | None) -> float:
    return retry_interval if retry_interval is not None else min(max(ttl / 10, 0.1), 1.0)


# --- asyncio (asyncpg) ---------------------------------------------------------------------------


def lease(
    conn_or_pool: Any,
    name: str,
    *,
    ttl: float = 30.0,
    schema: str = "outbox",
    holder: str | None = None,
    wait: bool = False,
    wait_timeout: float | None = None,
    retry_interval: float | None = None,
) -> AsyncLease:
    """``async with lease(pool, name, ttl=30) as held:`` (see the module's documentation)."""
    name, holder = _check(name, ttl, schema, holder)
    return AsyncLease(conn_or_pool, name, float(ttl), schema, holder, wait, wait_timeout,
                      _retry_interval(ttl, retry_interval))


class AsyncLease:
    def __init__(self, db: Any, name: str, ttl: float, schema: str, holder: str, wait: bool,
                 wait_timeout: float | None, retry_interval: float) -> None:
        self._db, self._name, self._ttl, self._holder = db, name, ttl, holder
        self._schema, self._wait, self._wait_timeout, self._retry = schema, wait, wait_timeout, retry_interval
        self._sql = {k: v.format(s=f'"{schema}"') for k, v in
                     {"acquire": _ACQUIRE, "renew": _RENEW, "release": _RELEASE, "current": _CURRENT}.items()}
        self.held: HeldLease | None = None
        self._task: asyncio.Task[Any] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._exiting = False
        self._cancelled_body = False

    async def __aenter__(self) -> HeldLease:
        if self.held is not None:
            raise RuntimeError("a lease() object can be entered once")
        in_transaction = getattr(self._db, "is_in_transaction", None)
        if in_transaction is not None and in_transaction():
            raise ValueError("lease() needs a connection outside a transaction (or a pool)")
        self._task = asyncio.current_task()
        deadline = None if self._wait_timeout is None else time.monotonic() + self._wait_timeout
        try:
            while True:
                started = time.monotonic()
                token = await self._db.fetchval(self._sql["acquire"], self._name, self._holder, self._ttl)
                if token is not None:
                    break
                if not self._wait or (deadline is not None and time.monotonic() >= deadline):
                    row = await self._db.fetchrow(self._sql["current"], self._name)
                    raise LeaseUnavailable(self._name, row[0] if row else None, row[1] if row else None)
                delay = self._retry if deadline is None else min(self._retry, max(deadline - time.monotonic(), 0))
                await asyncio.sleep(delay)
        except BaseException:
            _count("failures", self._name)
            raise
        _count("acquisitions", self._name)
        self.held = HeldLease(self._name, self._holder, int(token), self._ttl, self._schema)
        self._renewer = asyncio.create_task(self._renew(started), name=f"lease-renewal:{self._name}")
        return self.held

    async def _renew(self, trusted_from: float) -> None:
        assert self.held is not None
        held = self.held
        interval = self._ttl / 3
        next_at = trusted_from + interval
        while True:
            await asyncio.sleep(max(next_at - time.monotonic(), 0))
            started = time.monotonic()
            reason = None
            try:
                renewed = await self._db.fetchval(self._sql["renew"], self._ttl, held.name, held.token,
                                                  held.holder, timeout=interval)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a database error: retry until the lease could have expired
                if time.monotonic() + self._retry >= trusted_from + self._ttl:
                    reason = f"not renewed within the ttl ({type(e).__name__}: {e})"
                else:
                    next_at = time.monotonic() + self._retry
                    continue
            else:
                if renewed is None:
                    reason = "taken over or released"
                else:
                    trusted_from, next_at = started, started + interval
                    continue
            if held._lose(reason) and not self._exiting and self._task is not None and not self._task.done():
                self._cancelled_body = True
                self._task.cancel(f"lease {held.name!r} lost: {reason}")
            return

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        self._exiting = True  # from here on the renewer never cancels this task
        held = self.held
        assert held is not None and self._renewer is not None and self._task is not None
        self._renewer.cancel()
        await asyncio.gather(self._renewer, return_exceptions=True)
        ours = False
        if self._cancelled_body:
            ours = self._task.uncancel() == 0  # nobody else cancelled it: the cancellation was ours
        if not held.lost.is_set():
            with contextlib.suppress(Exception):  # if not released, the lease expires within the ttl
                await self._db.execute(self._sql["release"], held.name, held.token, held.holder)
            return False
        lost = LeaseLost(held.name, held.token, held.lost_reason or "lost")
        if exc is None or (ours and isinstance(exc, asyncio.CancelledError)):
            raise lost from exc
        return False


# --- threads (psycopg 3) -------------------------------------------------------------------------


def lease_sync(
    conn: Any,
    name: str,
    *,
    ttl: float = 30.0,
    schema: str = "outbox",
    holder: str | None = None,
    wait: bool = False,
    wait_timeout: float | None = None,
    retry_interval: float | None = None,
) -> SyncLease:
    """``with lease_sync(conn, name, ttl=30) as held:``; `conn` is a psycopg 3 ``Connection`` (its
    connection parameters are reused), a conninfo string or a callable returning a new connection."""
    name, holder = _check(name, ttl, schema, holder)
    return SyncLease(_connection_factory(conn), name, float(ttl), schema, holder, wait, wait_timeout,
                     _retry_interval(ttl, retry_interval))


def _connection_factory(conn: Any) -> Callable[[], Any]:
    if callable(conn):
        return conn
    import psycopg
    from psycopg.conninfo import make_conninfo

    if isinstance(conn, str):
        conninfo = conn
    elif isinstance(conn, psycopg.Connection):
        extra = {"password": conn.info.password} if conn.info.password else {}
        conninfo = make_conninfo(conn.info.dsn, **extra)
    else:
        raise TypeError(f"lease_sync() needs a psycopg Connection, a conninfo string or a factory, not {type(conn)}")
    return lambda: psycopg.connect(conninfo, autocommit=True)


class SyncLease:
    def __init__(self, connect: Callable[[], Any], name: str, ttl: float, schema: str, holder: str, wait: bool,
                 wait_timeout: float | None, retry_interval: float) -> None:
        self._connect, self._name, self._ttl, self._holder = connect, name, ttl, holder
        self._schema, self._wait, self._wait_timeout, self._retry = schema, wait, wait_timeout, retry_interval
        self._sql = {k: _psycopg(v.format(s=f'"{schema}"')) for k, v in
                     {"acquire": _ACQUIRE, "renew": _RENEW, "release": _RELEASE, "current": _CURRENT}.items()}
        self.held: HeldLease | None = None
        self._conn: Any = None
        self._lock = threading.Lock()  # one statement at a time on the lease's connection
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _prepare(self, conn: Any) -> Any:
        """Autocommit, and no statement may hang past a renewal interval."""
        if not conn.autocommit:
            conn.autocommit = True
        conn.execute("SELECT set_config('statement_timeout', %s, false)", (f"{int(self._ttl / 3 * 1000)}ms",))
        return conn

    def _one(self, statement: str, *params: Any) -> Any:
        with self._lock:
            row = self._conn.execute(statement, params).fetchone()
        return None if row is None else row[0]

    def __enter__(self) -> HeldLease:
        if self.held is not None:
            raise RuntimeError("a lease_sync() object can be entered once")
        deadline = None if self._wait_timeout is None else time.monotonic() + self._wait_timeout
        try:
            self._conn = self._connect()
            self._prepare(self._conn)
            while True:
                started = time.monotonic()
                token = self._one(self._sql["acquire"], self._name, self._holder, self._ttl)
                if token is not None:
                    break
                if not self._wait or (deadline is not None and time.monotonic() >= deadline):
                    with self._lock:
                        row = self._conn.execute(self._sql["current"], (self._name,)).fetchone()
                    raise LeaseUnavailable(self._name, row[0] if row else None, row[1] if row else None)
                time.sleep(self._retry if deadline is None else min(self._retry, max(deadline - time.monotonic(), 0)))
        except BaseException:
            _count("failures", self._name)
            if self._conn is not None:
                self._conn.close()
            raise
        _count("acquisitions", self._name)
        self.held = HeldLease(self._name, self._holder, int(token), self._ttl, self._schema)
        self._thread = threading.Thread(target=self._renew, args=(started,), daemon=True,
                                        name=f"lease-renewal:{self._name}")
        self._thread.start()
        return self.held

    def _renew(self, trusted_from: float) -> None:
        assert self.held is not None
        held = self.held
        interval = self._ttl / 3
        next_at = trusted_from + interval
        while not self._stop.wait(max(next_at - time.monotonic(), 0)):
            started = time.monotonic()
            try:
                renewed = self._one(self._sql["renew"], self._ttl, held.name, held.token, held.holder)
            except Exception as e:
                if time.monotonic() + self._retry >= trusted_from + self._ttl:
                    held._lose(f"not renewed within the ttl ({type(e).__name__}: {e})")
                    return
                next_at = time.monotonic() + self._retry
                try:  # a broken connection: the next attempt uses a new one
                    if self._conn.closed or self._conn.broken:
                        self._conn = self._prepare(self._connect())
                except Exception:
                    pass
                continue
            if renewed is None:
                held._lose("taken over or released")
                return
            trusted_from, next_at = started, started + interval

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        held = self.held
        assert held is not None and self._thread is not None
        self._stop.set()
        self._thread.join()
        try:
            if not held.lost.is_set():
                try:
                    with self._lock:
                        self._conn.execute(self._sql["release"], (held.name, held.token, held.holder))
                except Exception:  # the lease expires on its own within the ttl
                    pass
        finally:
            with contextlib.suppress(Exception):
                self._conn.close()
        if held.lost.is_set() and exc is None:
            raise LeaseLost(held.name, held.token, held.lost_reason or "lost")
        return False
