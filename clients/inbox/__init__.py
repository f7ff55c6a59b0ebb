"""Effectively-once processing of the relay's messages: a Postgres inbox (table ``inbox``, migration
0006) that records each message a consumer processed, so that a redelivery is skipped.

    inbox = AsyncInbox("billing")                      # one per consumer (group) name

    async def on_order(conn, message):                 # runs in the inbox's transaction
        await conn.execute("INSERT INTO invoices ...")

    result = await inbox.process(conn, message, on_order)   # conn: not inside a transaction

``process`` first claims the message in one atomic statement, committed on its own: a new message is
claimed; a processed one is a DUPLICATE (skipped); one locked by another worker is LOCKED (skipped,
"locked by another worker (<holder>)" logged) unless that lock is older than the stale threshold,
when it is taken over (the previous holder logged at WARNING); one given up is GAVE_UP. It then runs
the handler in a transaction that also marks the row processed, fenced by the claim: the business
change and the mark commit together, or neither does (a worker whose claim was taken over meanwhile
has its transaction rolled back). A handler that raises is rolled back, its error and attempt
recorded, the claim released (FAILED, retried on redelivery), or after ``max_attempts`` the row is
left 'failed' (GAVE_UP). The handler must not commit or roll back the connection itself.

Connections: AsyncInbox takes an asyncpg Connection (pool connections too), a psycopg 3
AsyncConnection or a SQLAlchemy AsyncConnection; Inbox (synchronous) a psycopg 3 Connection or a
SQLAlchemy Connection. None of those libraries is imported here unless you use it.

Settings left out come from the environment: OUTBOX_INBOX_LOCK_STALE_THRESHOLD (seconds, default
300; longer than your slowest handler), OUTBOX_INBOX_MAX_ATTEMPTS (default 5), worker id POD_NAME,
else hostname:pid. Processed rows are kept for OUTBOX_INBOX_RETENTION (default 7 days), then deleted
by ``outbox-relay inbox-cleanup`` (or the relay leader); a redelivery after that is processed again.

Metrics, through OpenTelemetry when installed (meter ``outbox_relay.inbox``, attribute ``consumer``):
see docs/observability.md.
"""

from clients.inbox.aio import AsyncInbox
from clients.inbox.model import (
    InboxError,
    InboxMessage,
    InboxOutcome,
    InboxResult,
    InboxValidationError,
)
from clients.inbox.sync import Inbox

__all__ = [
    "AsyncInbox",
    "Inbox",
    "InboxError",
    "InboxMessage",
    "InboxOutcome",
    "InboxResult",
    "InboxValidationError",
]
