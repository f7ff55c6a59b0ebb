"""Which errors a consumer waits out (the database, Kafka or Redis unavailable: retried, never a dead
letter, never a stopped consumer), as the relay's fault model (docs/operations.md)."""

from __future__ import annotations

import asyncio

TRANSIENT_SQLSTATE_CLASSES = ("08", "57", "40", "53", "28")
TRANSIENT_SQLSTATES = ("55P03", "25006", "25P03")


def is_transient_database_error(exc: BaseException) -> bool:
    """Connection loss, shutdowns, cancellations, serialization failures, too many connections, a
    rotated password: the database is unavailable for now, the message is not at fault."""
    if isinstance(exc, OSError | asyncio.TimeoutError):
        return True
    try:
        import asyncpg
    except ImportError:  # pragma: no cover - asyncpg is a dependency of the relay
        return False
    if isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.InterfaceError | asyncpg.InternalClientError):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and (
        sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES or sqlstate in TRANSIENT_SQLSTATES
    )


def error_kind(exc: BaseException) -> str:
    """A short label for logs and the outbox_consumer_errors metric."""
    return "database_unavailable" if is_transient_database_error(exc) else "unexpected"
