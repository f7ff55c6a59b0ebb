"""The control plane's only access to PostgreSQL: every statement comes from relay/sql/control.sql.

Every method takes a `Deadline`; each statement gets what is left of it as its asyncpg timeout, so a
caller's gRPC deadline bounds the database work done on its behalf.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn
from uuid import UUID

import asyncpg

from control.errors import FailedPrecondition, NotFound
from control.model import (
    Audit,
    AuditEntry,
    Backlog,
    DeadLetter,
    DeadLetterFilter,
    DeadLetterSummary,
    Instance,
    Lock,
    Page,
    Pause,
    PurgeResult,
    ReplayRecord,
    ReplayRequest,
    ReplayResult,
    Selection,
    Status,
    StuckEvent,
)
from relay.sql import queries

_NO_FILTER = DeadLetterFilter()
_RUNNING = "running"
_DONE = "done"


class Deadline:
    """An absolute point in time derived from a gRPC call's remaining time (None: no deadline)."""

    def __init__(self, timeout: float | None) -> None:
        self._at = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        """Seconds left for the next statement; TimeoutError once the deadline has passed."""
        if self._at is None:
            return None
        remaining = self._at - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline exceeded")
        return remaining


@dataclass(frozen=True)
class ReplayPacing:
    """Large replays run as several transactions of `batch_size` rows, at most `rate` rows per second."""

    rate: int = 5000
    batch_size: int = 1000

    @property
    def chunk(self) -> int:
        return max(1, min(self.batch_size, self.rate))


class ControlStore:
    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        *,
        pacing: ReplayPacing | None = None,
        instance_timeout: float = 30.0,
    ) -> None:
        self._pool = pool
        self._sql = queries(schema)
        self._pacing = pacing or ReplayPacing()
        self._instance_timeout = instance_timeout

    # --- reads ---------------------------------------------------------------------------------

    async def status(self, deadline: Deadline) -> Status:
        # One snapshot, so that counts and instances describe the same moment.
        async with (
            self._pool.acquire(timeout=deadline.left()) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            instances = await conn.fetch(
                self._sql["control_status_instances"], self._instance_timeout, timeout=deadline.left()
            )
            backlog = await conn.fetch(self._sql["control_status_backlog"], timeout=deadline.left())
            dead = await conn.fetchval(self._sql["control_status_dead_letters"], timeout=deadline.left())
            pauses = await conn.fetch(self._sql["control_pauses"], False, timeout=deadline.left())
            version = await conn.fetchval(self._sql["control_schema_version"], timeout=deadline.left())
            now = await conn.fetchval(self._sql["control_now"], timeout=deadline.left())
        return Status(
            instances=[_instance(r) for r in instances],
            backlog=[Backlog(r["topic"], r["pending"], r["oldest_age"] or timedelta(0)) for r in backlog],
            dead_letters=int(dead),
            pauses=[_pause(r) for r in pauses],
            schema_version=str(version or ""),
            now=now,
        )

    async def locks(self, deadline: Deadline) -> list[Lock]:
        rows = await self._fetch("control_locks", deadline=deadline)
        return [_lock(r) for r in rows]

    async def pauses(self, include_expired: bool, deadline: Deadline) -> list[Pause]:
        rows = await self._fetch("control_pauses", include_expired, deadline=deadline)
        return [_pause(r) for r in rows]

    async def stuck(self, topic: str | None, after_id: int, limit: int, deadline: Deadline) -> Page[StuckEvent]:
        rows = await self._fetch("control_stuck_page", topic, after_id, limit + 1, deadline=deadline)
        return _page([_stuck(r) for r in rows], limit)

    async def dead_letters(
        self, where: DeadLetterFilter, after_id: int, limit: int, deadline: Deadline
    ) -> Page[DeadLetterSummary]:
        rows = await self._fetch(
            "control_dead_letter_page", *where.sql_args(), after_id, limit + 1, deadline=deadline
        )
        return _page([_summary(r) for r in rows], limit)

    async def dead_letter(self, dead_letter_id: int, deadline: Deadline) -> DeadLetter:
        async with (
            self._pool.acquire(timeout=deadline.left()) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            row = await conn.fetchrow(self._sql["control_dead_letter_get"], dead_letter_id, timeout=deadline.left())
            if row is None:
                raise NotFound(f"dead letter {dead_letter_id} does not exist")
            replays = await conn.fetch(
                self._sql["control_dead_letter_replays"], dead_letter_id, timeout=deadline.left()
            )
        return DeadLetter(
            summary=_summary(row),
            payload=bytes(row["payload"]),
            headers=json.loads(row["headers"]),
            replays=[ReplayRecord(**dict(r)) for r in replays],
        )

    async def audit_entries(
        self, action: str | None, before_id: int | None, limit: int, deadline: Deadline
    ) -> Page[AuditEntry]:
        rows = await self._fetch("control_audit_page", action, before_id, limit + 1, deadline=deadline)
        entries = [
            AuditEntry(r["id"], r["at"], r["actor"], r["action"], r["arguments"], r["result"]) for r in rows
        ]
        return _page(entries, limit)

    # --- mutations: each writes its audit row in the transaction of its change -----------------

    async def release_lock(
        self, name: str, holder: str | None, token: int | None, audit: Audit, deadline: Deadline
    ) -> Lock:
        async with self._pool.acquire(timeout=deadline.left()) as conn, conn.transaction():
            current = await conn.fetchrow(self._sql["control_lock_for_update"], name, timeout=deadline.left())
            if current is None:
                raise NotFound(f"lease {name!r} does not exist")
            row = await conn.fetchrow(self._sql["control_lock_release"], name, holder, token, timeout=deadline.left())
            if row is None:
                raise FailedPrecondition(
                    f"lease {name!r} changed hands: now held by {current['holder'] or 'nobody'!s} "
                    f"with token {current['token']}"
                )
            result = {"released": True, "previous_holder": current["holder"], "token": current["token"]}
            await self._audit(conn, audit, result, deadline)
        return _lock(row)

    async def pause(
        self,
        pattern: str,
        reason: str,
        expires_at: datetime | None,
        ttl: timedelta | None,
        audit: Audit,
        deadline: Deadline,
    ) -> Pause:
        ttl_seconds = ttl.total_seconds() if ttl is not None else None
        async with self._pool.acquire(timeout=deadline.left()) as conn, conn.transaction():
            row = await conn.fetchrow(
                self._sql["control_pause_upsert"], pattern, reason, audit.actor, expires_at, ttl_seconds,
                timeout=deadline.left(),
            )
            pause = _pause(row)
            result = {"pause_id": pause.id, "expires_at": _iso(pause.expires_at)}
            await self._audit(conn, audit, result, deadline)
        return pause

    async def resume(self, pattern: str, audit: Audit, deadline: Deadline) -> Pause | None:
        async with self._pool.acquire(timeout=deadline.left()) as conn, conn.transaction():
            row = await conn.fetchrow(self._sql["control_pause_delete"], pattern, timeout=deadline.left())
            await self._audit(conn, audit, {"resumed": row is not None}, deadline)
        return _pause(row) if row is not None else None

    async def dead_letter_now(
        self, outbox_id: int | None, message_id: UUID | None, reason: str, audit: Audit, deadline: Deadline
    ) -> DeadLetterSummary:
        async with self._pool.acquire(timeout=deadline.left()) as conn, conn.transaction():
            row = await conn.fetchrow(
                self._sql["control_dead_letter_now"], outbox_id, message_id, reason, audit.actor,
                timeout=deadline.left(),
            )
            if row is None:
                await self._explain_missing_event(conn, outbox_id, message_id, deadline)
            summary = _summary(row)
            await self._audit(conn, audit, {"dead_letter_id": summary.id}, deadline)
        return summary

    async def _explain_missing_event(
        self, conn: asyncpg.Connection, outbox_id: int | None, message_id: UUID | None, deadline: Deadline
    ) -> NoReturn:
        published = await conn.fetchval(
            self._sql["control_outbox_published"], outbox_id, message_id, timeout=deadline.left()
        )
        which = f"outbox_id {outbox_id}" if outbox_id is not None else f"message_id {message_id}"
        if published:
            raise FailedPrecondition(f"the event with {which} is already published")
        raise NotFound(f"no unpublished event with {which} in the outbox")

    async def purge(self, selection: Selection, dry_run: bool, audit: Audit, deadline: Deadline) -> PurgeResult:
        args = _selection_args(selection)
        requested = len(selection.ids) if selection.ids is not None else None
        async with self._pool.acquire(timeout=deadline.left()) as conn, conn.transaction():
            block = "control_purge_count" if dry_run else "control_purge"
            count = int(await conn.fetchval(self._sql[block], *args, timeout=deadline.left()))
            result = PurgeResult(count, requested - count if requested is not None else 0, dry_run)
            if not dry_run:
                await self._audit(conn, audit, result.as_json(), deadline)
        return result

    # --- replay --------------------------------------------------------------------------------

    async def replay(self, request: ReplayRequest, audit: Audit, deadline: Deadline) -> ReplayResult:
        """Replays in chunks of at most `pacing.chunk` rows, one transaction each, paced to `pacing.rate`.

        A large replay is therefore several transactions: if the call dies half-way, the chunks done stay
        done, and repeating the request (same request_id) resumes where it stopped, because rows already
        replayed under this request_id count as replayed and are not replayed again. Each replay_log row
        (dead letter, request_id, replayed_by) commits with the outbox row it made; the audit row and the
        stored result commit with the last chunk.
        """
        run = _ReplayRun(request, self._pacing.chunk)
        started = time.monotonic()
        while True:
            # A connection per chunk: a long, paced replay must not hold one while it sleeps.
            async with self._pool.acquire(timeout=deadline.left()) as conn, conn.transaction():
                stored = await self._enter_replay(conn, run, audit, deadline)
                if stored is not None:
                    return stored
                await self._replay_chunk(conn, run, audit, deadline)
                if run.finished:
                    if not request.dry_run:
                        await self._finish_replay(conn, run, audit, deadline)
                    return run.result
            if not request.dry_run:
                await self._pace(run.result.replayed_count + run.result.skipped_count, started)

    async def _enter_replay(
        self, conn: asyncpg.Connection, run: _ReplayRun, audit: Audit, deadline: Deadline
    ) -> ReplayResult | None:
        """Under the request's advisory lock: the stored result if the request already completed,
        else None after claiming the request_id (first transaction of a real run)."""
        request = run.request
        await conn.execute(self._sql["control_replay_lock"], request.request_id, timeout=deadline.left())
        row = await conn.fetchrow(self._sql["control_replay_request_get"], request.request_id, timeout=deadline.left())
        if row is not None:
            if row["request_hash"] != request.fingerprint():
                raise FailedPrecondition(
                    f"request_id {request.request_id!r} was already used for a different replay request"
                )
            stored: dict[str, Any] = json.loads(row["result"])
            if stored.get("state") == _DONE:
                return ReplayResult.from_json(stored, dry_run=request.dry_run)
            # A concurrent identical call or an interrupted earlier one: share its bound on the selection.
            run.upper_id = int(stored["upper_id"])
            return None
        if run.upper_id is None:
            run.upper_id = int(await conn.fetchval(self._sql["control_dead_letter_max_id"], timeout=deadline.left()))
        if not request.dry_run:
            claim = json.dumps({"state": _RUNNING, "upper_id": run.upper_id})
            await conn.execute(
                self._sql["control_replay_request_claim"], request.request_id, request.fingerprint(), claim,
                audit.actor, timeout=deadline.left(),
            )
        return None

    async def _replay_chunk(
        self, conn: asyncpg.Connection, run: _ReplayRun, audit: Audit, deadline: Deadline
    ) -> None:
        ids, cursor, limit = run.next_chunk()
        request = run.request
        args = (
            request.request_id, ids, *(request.selection.filter or _NO_FILTER).sql_args(),
            cursor, run.upper_id, limit, request.force,
        )
        if request.dry_run:
            rows = await conn.fetch(self._sql["control_replay_chunk_dry"], *args, timeout=deadline.left())
        else:
            rows = await conn.fetch(self._sql["control_replay_chunk"], *args, audit.actor, timeout=deadline.left())
        run.record(ids, [(r["id"], r["replayed"]) for r in rows])

    async def _finish_replay(
        self, conn: asyncpg.Connection, run: _ReplayRun, audit: Audit, deadline: Deadline
    ) -> None:
        stored = json.dumps({"state": _DONE, **run.result.as_json()})
        await conn.execute(
            self._sql["control_replay_request_finish"], run.request.request_id, stored, timeout=deadline.left()
        )
        await self._audit(conn, audit, run.result.counts(), deadline)

    async def _pace(self, rows_done: int, started: float) -> None:
        ahead = rows_done / self._pacing.rate - (time.monotonic() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)

    # --- helpers -------------------------------------------------------------------------------

    async def _fetch(self, block: str, *args: Any, deadline: Deadline) -> list[asyncpg.Record]:
        async with self._pool.acquire(timeout=deadline.left()) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(self._sql[block], *args, timeout=deadline.left())
            return rows

    async def _audit(
        self, conn: asyncpg.Connection, audit: Audit, result: dict[str, Any], deadline: Deadline
    ) -> None:
        await conn.execute(
            self._sql["control_audit_insert"],
            audit.actor,
            audit.action,
            json.dumps(audit.arguments, default=str),
            json.dumps(result, default=str),
            timeout=deadline.left(),
        )


class _ReplayRun:
    """The progress of one replay call across its chunk transactions."""

    def __init__(self, request: ReplayRequest, chunk: int) -> None:
        self.request = request
        self.result = ReplayResult(dry_run=request.dry_run)
        self.upper_id: int | None = None
        self.finished = False
        self._chunk = chunk
        self._ids = list(request.selection.ids) if request.selection.ids is not None else None
        self._cursor = 0

    def next_chunk(self) -> tuple[list[int] | None, int, int]:
        """(ids of this chunk or None for a filter, id cursor, row limit)."""
        if self._ids is None:
            return None, self._cursor, self._chunk
        return self._ids[: self._chunk], 0, self._chunk

    def record(self, ids: list[int] | None, outcomes: Sequence[tuple[int, bool]]) -> None:
        replayed = [i for i, done in outcomes if done]
        skipped = [i for i, done in outcomes if not done]
        if ids is None:
            not_found: list[int] = []
            self.finished = len(outcomes) < self._chunk
            self._cursor = outcomes[-1][0] if outcomes else self._cursor
        else:
            seen = {i for i, _ in outcomes}
            not_found = [i for i in ids if i not in seen]
            assert self._ids is not None
            self._ids = self._ids[len(ids) :]
            self.finished = not self._ids
        self.result.add(replayed, skipped, not_found)


def _selection_args(selection: Selection) -> tuple[Any, ...]:
    return (selection.ids, *(selection.filter or _NO_FILTER).sql_args())


def _page(items: list[Any], limit: int) -> Page[Any]:
    return Page(items[:limit], len(items) > limit)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _instance(r: asyncpg.Record) -> Instance:
    return Instance(
        r["instance_id"], r["hostname"], r["pid"], r["version"], r["started_at"], r["heartbeat_at"],
        list(r["partitions"] or []), r["leader"],
    )


def _pause(r: asyncpg.Record) -> Pause:
    return Pause(r["id"], r["topic_pattern"], r["reason"], r["paused_by"], r["created_at"], r["expires_at"])


def _lock(r: asyncpg.Record) -> Lock:
    return Lock(
        r["name"], r["holder"], r["token"], r["acquired_at"], r["renewed_at"], r["expires_at"], r["expired"]
    )


def _stuck(r: asyncpg.Record) -> StuckEvent:
    return StuckEvent(**dict(r))


def _summary(r: asyncpg.Record) -> DeadLetterSummary:
    fields = DeadLetterSummary.__dataclass_fields__
    return DeadLetterSummary(**{name: r[name] for name in fields})
