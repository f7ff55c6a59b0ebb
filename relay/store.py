"""The relay's only door to PostgreSQL: every statement comes from relay/sql by name."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from relay import __version__
from relay.events import OutboxRow
from relay.faults import TRANSIENT_DB_ERRORS, is_transient_db_error
from relay.shared.dburl import plain_postgres_url
from relay.sql import queries

log = logging.getLogger(__name__)

# The fault model (relay.faults) decides what is transient; re-exported for the relay path.
__all__ = ["TRANSIENT_DB_ERRORS", "DeadLettered", "Fence", "RelayStore", "is_transient_db_error"]


@dataclass(frozen=True, slots=True)
class Fence:
    """The lease a write is conditional on: it succeeds only while this lease is still ours."""

    lease_name: str
    holder: str
    token: int

    @property
    def args(self) -> tuple[str, str, int]:
        return self.lease_name, self.holder, self.token


@dataclass(frozen=True, slots=True)
class DeadLettered:
    archive_id: int
    outbox_id: int
    reason: str


class RelayStore:
    def __init__(
        self, database_url: str, schema: str, *, pool_size: int = 20, statement_cache_size: int = 100
    ):
        self._url = plain_postgres_url(database_url)
        self.schema = schema
        self._q = queries(schema)
        self._pool_size = pool_size
        # 0 disables named prepared statements, for PgBouncer in transaction mode before 1.21.
        self._statement_cache_size = statement_cache_size
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        if self._pool is None:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=1,
                max_size=self._pool_size,
                statement_cache_size=self._statement_cache_size,
                command_timeout=30,
                # The planner should prefer the partial pending index over a primary-key scan, which
                # it does not under the default random_page_cost once the backlog is large.
                server_settings={"application_name": "outbox-relay", "random_page_cost": "1.1"},
                # Pooled connections keep no session state (no SET, LISTEN, session advisory locks or
                # cursors), so asyncpg's reset round trip on every release is pure cost.
                reset=_no_reset,
            )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("RelayStore used before open()")
        return self._pool

    async def connect_listener(self) -> asyncpg.Connection:
        """A dedicated session for LISTEN (never a pooled one)."""
        return await asyncpg.connect(
            self._url, statement_cache_size=0, server_settings={"application_name": "outbox-relay-listener"}
        )

    async def connect_liveness(self) -> asyncpg.Connection:
        """A dedicated session holding this instance's liveness lock (never a pooled one)."""
        return await asyncpg.connect(
            self._url,
            statement_cache_size=0,
            command_timeout=10,
            server_settings={"application_name": "outbox-relay-liveness"},
        )

    # -- liveness (fast takeover, relay.liveness): on the dedicated session -------------------

    async def take_liveness_lock(self, conn: asyncpg.Connection, key: str) -> bool:
        """Whether this session now holds the liveness lock named `key` (False: another one does)."""
        return bool(await conn.fetchval(self._q["liveness_lock"], key))

    async def liveness_peers(self, conn: asyncpg.Connection, prefix: str, me: str) -> dict[str, bool]:
        """Every other holder of an unexpired lease → whether its liveness lock is held now."""
        return {r["holder"]: r["alive"] for r in await conn.fetch(self._q["liveness_peers"], prefix, me)}

    async def expire_dead_holder(self, conn: asyncpg.Connection, prefix: str, holder: str) -> list[str]:
        """Expires `holder`'s leases and marks it stopped, if its liveness lock is still free."""
        return [r["name"] for r in await conn.fetch(self._q["liveness_expire_dead"], prefix, holder)]

    # -- the relay path: claim, settle, fail ------------------------------------------------

    async def claim_batch(
        self,
        partition: int,
        limit: int,
        paused_like: Sequence[str],
        fence: Fence,
        *,
        max_bytes: int,
        skip_topics: Sequence[str] = (),
    ) -> list[OutboxRow]:
        """At most `limit` rows, in id order, whose payload, key and header bytes add up to at most
        `max_bytes` (always at least one row when any is claimable); none of `skip_topics`."""
        records = await self.pool.fetch(
            self._q["claim_batch"],
            partition,
            *fence.args,
            limit,
            list(paused_like),
            max_bytes,
            list(skip_topics),
        )
        return [OutboxRow.from_record(r) for r in records]

    async def settle_and_claim(
        self,
        settle_ids: Sequence[int],
        partition: int,
        limit: int,
        paused_like: Sequence[str],
        fence: Fence,
        *,
        retain: bool,
        max_bytes: int,
        skip_topics: Sequence[str] = (),
    ) -> tuple[int, list[OutboxRow]]:
        """`settle(settle_ids)` and `claim_batch(...)` in one statement: how many of `settle_ids`
        were settled (fewer means the lease was lost) and the rows claimed."""
        records = await self.pool.fetch(
            self._q["settle_retain_and_claim" if retain else "settle_delete_and_claim"],
            partition,
            *fence.args,
            limit,
            list(paused_like),
            max_bytes,
            list(skip_topics),
            list(settle_ids),
        )
        settled = int(records[0]["settled"])
        return settled, [OutboxRow.from_record(r) for r in records if r["id"] is not None]

    async def next_retry_delay(self, partition: int) -> float | None:
        value = await self.pool.fetchval(self._q["next_retry_delay"], partition)
        return None if value is None else float(value)

    async def settle(self, ids: Sequence[int], fence: Fence, *, retain: bool) -> int:
        """Marks published rows done; returns how many were settled (fewer means the lease was lost)."""
        if not ids:
            return 0
        statement = self._q["settle_retain" if retain else "settle_delete"]
        status = await self.pool.execute(statement, list(ids), *fence.args)
        return _affected(status)

    async def record_failures(
        self, ids: Sequence[int], delays: Sequence[float], errors: Sequence[str], fence: Fence
    ) -> int:
        if not ids:
            return 0
        status = await self.pool.execute(
            self._q["record_failures"], list(ids), *fence.args, list(delays), [e[:2000] for e in errors]
        )
        return _affected(status)

    async def dead_letter(
        self, ids: Sequence[int], reasons: Sequence[str], errors: Sequence[str], fence: Fence
    ) -> list[DeadLettered]:
        if not ids:
            return []
        records = await self.pool.fetch(
            self._q["dead_letter"], list(ids), *fence.args, list(reasons), [e[:2000] for e in errors]
        )
        return [DeadLettered(r["id"], r["outbox_id"], r["reason"]) for r in records]

    # -- leases -----------------------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> int | None:
        """The new fencing token, or None when someone else holds the lease."""
        token = await self.pool.fetchval(self._q["lease_acquire"], name, holder, ttl)
        return None if token is None else int(token)

    async def renew_leases(
        self, names: Sequence[str], tokens: Sequence[int], holder: str, ttl: float
    ) -> set[str]:
        if not names:
            return set()
        records = await self.pool.fetch(self._q["lease_renew"], list(names), list(tokens), holder, ttl)
        return {r["name"] for r in records}

    async def release_leases(self, names: Sequence[str], tokens: Sequence[int], holder: str) -> None:
        if names:
            await self.pool.execute(self._q["lease_release"], list(names), list(tokens), holder)

    async def claimable_partitions(self, partitions: int) -> list[int]:
        return [r["partition"] for r in await self.pool.fetch(self._q["lease_claimable"], partitions)]

    # -- instances, pauses, settings ---------------------------------------------------------

    async def heartbeat(
        self,
        instance_id: str,
        partitions: Sequence[int],
        liveness: float,
        unhealthy_reason: str | None = None,
    ) -> dict[str, str | None]:
        """Refreshes this instance and its health (`unhealthy_reason`, None when healthy), in one
        round trip; returns the live instances, this one included, sorted by id, each with why it is
        unhealthy (None: healthy)."""
        records = await self.pool.fetch(
            self._q["instance_heartbeat"],
            instance_id,
            socket.gethostname(),
            os.getpid(),
            __version__,
            sorted(partitions),
            liveness,
            None if unhealthy_reason is None else unhealthy_reason[:500],
        )
        return {r["instance_id"]: r["unhealthy_reason"] for r in records}

    async def mark_stopped(self, instance_id: str) -> None:
        await self.pool.execute(self._q["instance_stopped"], instance_id)

    async def active_pause_patterns(self) -> list[str]:
        return [r["topic_pattern"] for r in await self.pool.fetch(self._q["pauses_active"])]

    async def partition_count(self) -> int:
        return int(await self.pool.fetchval(self._q["partition_count"]))

    async def schema_revision(self) -> str | None:
        try:
            value = await self.pool.fetchval(self._q["schema_revision"])
        except asyncpg.UndefinedTableError:
            return None
        return None if value is None else str(value)

    # -- maintenance (leader only) -------------------------------------------------------------

    async def cleanup_published(self, retention: float, batch: int) -> int:
        return _affected(await self.pool.execute(self._q["cleanup_published"], retention, batch))

    async def cleanup_inbox(self, retention: float, batch: int) -> int:
        return _affected(await self.pool.execute(self._q["inbox_cleanup"], retention, batch))

    async def inbox_cleanup_counts(self, retention: float) -> tuple[int, int, int, int]:
        """(processed past the retention, processed within it, processing, failed) inbox rows."""
        row = await self.pool.fetchrow(self._q["inbox_cleanup_counts"], retention)
        return (int(row[0]), int(row[1]), int(row[2]), int(row[3]))

    async def inbox_stale_locks(self, threshold: float) -> list[tuple[str, int]]:
        records = await self.pool.fetch(self._q["inbox_stale_locks"], threshold)
        return [(r["consumer"], int(r["stale"])) for r in records]
    async def cleanup_expired(self, table: str, retention: int, batch: int) -> int:
        """One retention batch (`retention_<table>` in queries.sql): rows deleted, at most `batch`."""
        return _affected(await self.pool.execute(self._q[f"retention_{table}"], float(retention), batch))

    async def cleanup_housekeeping(self) -> None:
        await self.pool.execute(self._q["cleanup_expired_pauses"])
        await self.pool.execute(self._q["cleanup_instances"])

    async def backlog_by_topic(self) -> list[tuple[str, int, float]]:
        records = await self.pool.fetch(self._q["backlog_by_topic"])
        return [(r["topic"], r["pending"], r["oldest_age"]) for r in records]

    async def dead_letter_count(self) -> int:
        return int(await self.pool.fetchval(self._q["dead_letter_count"]))


async def _no_reset(_conn: asyncpg.Connection) -> None:
    return None


def _affected(status: str) -> int:
    """'DELETE 12' / 'UPDATE 3' -> 12 / 3."""
    return int(status.rsplit(" ", 1)[-1])
