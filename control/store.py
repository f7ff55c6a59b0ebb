"""The control plane's only access to PostgreSQL: every statement comes from control/queries.sql.

Every method takes a `Deadline`; each statement gets what is left of it as its asyncpg timeout, so a
caller's gRPC deadline bounds the database work done on its behalf.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn
from uuid import UUID

import asyncpg

from control.errors import FailedPrecondition, NotFound
from control.limits import SharedResult, call_cap
from control.model import (
    Audit,
    AuditEntry,
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
    TopicBacklog,
)
from relay.shared.sqlblocks import bind_schema, load_blocks

_NO_FILTER = DeadLetterFilter()
_RUNNING = "running"
_DONE = "done"
_REPLAY_BUCKET = "replay"
PURGE_BATCH_SIZE = 1000


class Deadline:
    """An absolute point in time derived from a gRPC call's remaining time (None: no deadline).

    Inside a call limited by control.limits.CallLimits it never lies beyond the server's cap
    (OUTBOX_CONTROL_MAX_DEADLINE), so a call without a deadline, or with a longer one, gets the cap."""

    def __init__(self, timeout: float | None) -> None:
        at = None if timeout is None else time.monotonic() + timeout
        cap = call_cap()
        self._at = cap if at is None else at if cap is None else min(at, cap)

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
    """Large replays run as several transactions of `batch_size` rows, at most `rate` rows per second
    for all replays together: the rate is a token bucket in the database (rate_buckets, holding at
    most one chunk), shared by every request and every control-plane replica."""

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
        purge_batch_size: int | None = None,
        status_cache_ttl: float = 2.0,
        count_limit: int = 1_000_000,
    ) -> None:
        self._pool = pool
        # GetStatus's costly figures (backlog per topic, dead-letter count), shared by concurrent
        # calls and reused for status_cache_ttl seconds; each count reads at most count_limit rows.
        self._figures: SharedResult[_Figures] = SharedResult(status_cache_ttl)
        self._count_limit = count_limit
        self._sql = bind_schema(load_blocks(__package__, "queries.sql"), schema)
        self._pacing = pacing or ReplayPacing()
        self._instance_timeout = instance_timeout
        self._purge_batch_size = purge_batch_size or PURGE_BATCH_SIZE

    # --- reads ---------------------------------------------------------------------------------

    async def status(self, deadline: Deadline) -> Status:
        # The backlog and dead-letter figures read up to count_limit rows each, so concurrent calls
        # share one reading of them, reused for status_cache_ttl seconds (dropped after any mutation
        # made through this server). The rest is small and read per call, in one snapshot.
        figures = await self._figures.get(self._read_figures, deadline.left())
        async with (
            self._pool.acquire(timeout=deadline.left()) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            instances = await conn.fetch(
                self._sql["control_status_instances"], self._instance_timeout, timeout=deadline.left()
            )
            pauses = await conn.fetch(self._sql["control_pauses"], False, timeout=deadline.left())
            version = await conn.fetchval(self._sql["control_schema_version"], timeout=deadline.left())
            now = await conn.fetchval(self._sql["control_now"], timeout=deadline.left())
        return Status(
            instances=[_instance(r) for r in instances],
            # Ages against this call's clock: a shared reading does not make them look younger.
            backlog=[
                TopicBacklog(topic, pending, max(now - oldest, timedelta(0)) if oldest else timedelta(0))
                for topic, pending, oldest in figures.backlog
            ],
            dead_letter_count=figures.dead_letter_count,
            pauses=[_pause(r) for r in pauses],
            schema_version=str(version or ""),
            server_time=now,
        )

    def invalidate_status(self) -> None:
        """Forget the shared backlog and dead-letter figures (after a change made through this server)."""
        self._figures.invalidate()

    async def _read_figures(self) -> _Figures:
        # Not tied to any one caller's deadline: the callers sharing it wait as long as each may.
        # statement_timeout (OUTBOX_CONTROL_STATEMENT_TIMEOUT) bounds it; so does the call cap.
        deadline = Deadline(None)
        async with (
            self._pool.acquire(timeout=deadline.left()) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            backlog = await conn.fetch(
                self._sql["control_status_backlog"], self._count_limit, timeout=deadline.left()
            )
            dead = await conn.fetchval(
                self._sql["control_status_dead_letters"], self._count_limit, timeout=deadline.left()
            )
        return _Figures([(r["topic"], int(r["pending"]), r["oldest_created_at"]) for r in backlog], int(dead))

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
            AuditEntry(r["id"], r["at"], r["actor"], r["action"], r["arguments"], r["result"], r["client_identity"])
            for r in rows
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
        """Fenced against a relay publishing the event right now. A relay claims rows with FOR UPDATE
        SKIP LOCKED only for its claim statement, then publishes and settles under its partition
        lease, so neither a row lock alone nor taking the lease over would do: a publish already
        under way would still reach the broker, and the event would be both delivered and archived.
        Instead, under a row lock (no claim can take the event until this transaction ends), the
        event moves only if no claim of it can be outstanding: it waits for a retry (every claim
        ends with the settle or record_failures that scheduled it), or its partition's lease is free
        or expired (nobody may publish under it). Otherwise FAILED_PRECONDITION: park it while it
        waits for its next attempt (what ListStuck shows), or once the lease is free. (A relay whose
        lease expired under an unanswered publish may still see it delivered, as with any handover.)"""
        async with self._pool.acquire(timeout=deadline.left()) as conn, conn.transaction():
            locked = await conn.fetchrow(
                self._sql["control_dead_letter_now_lock"], outbox_id, message_id, timeout=deadline.left()
            )
            if locked is None:
                await self._explain_missing_event(conn, outbox_id, message_id, deadline)
            which = f"outbox_id {outbox_id}" if outbox_id is not None else f"message_id {message_id}"
            fence = await conn.fetchrow(
                self._sql["control_dead_letter_now_fence"], locked["id"], timeout=deadline.left()
            )
            if fence["published"]:
                raise FailedPrecondition(f"the event with {which} is already published")
            if fence["leased"] and not fence["waiting"]:
                raise FailedPrecondition(
                    f"the event with {which} may be being published right now: {fence['lease']} is held by "
                    f"{fence['holder']} (token {fence['token']}) until {_iso(fence['expires_at'])} and the "
                    "event is not waiting for a retry; park it while it waits for its next attempt "
                    "(see ListStuck / `outboxctl stuck`) or once the lease is free"
                )
            row = await conn.fetchrow(
                self._sql["control_dead_letter_now"], locked["id"], None, reason, audit.actor,
                timeout=deadline.left(),
            )
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
        """Deletes in batches of at most `purge_batch_size` rows, one transaction each, until a batch
        comes back short (or the deadline passes: the batches done stay done). The audit row commits
        with the first batch (status 'running') and is updated with each one ('done' at the end).
        Dead letters archived after the purge started are left alone."""
        args = _selection_args(selection)
        requested = len(selection.ids) if selection.ids is not None else None

        def outcome(count: int) -> PurgeResult:
            return PurgeResult(count, requested - count if requested is not None else 0, dry_run)

        if dry_run:
            count = int(await self._fetchval("control_purge_count", *args, deadline=deadline))
            return outcome(count)
        upper_id = int(await self._fetchval("control_dead_letter_max_id", deadline=deadline))
        purged, cursor, audit_id = 0, 0, None
        while True:
            async with self._pool.acquire(timeout=deadline.left()) as conn, conn.transaction():
                batch = await conn.fetchrow(
                    self._sql["control_purge_batch"], *args, cursor, upper_id, self._purge_batch_size,
                    timeout=deadline.left(),
                )
                purged += int(batch["purged"])
                cursor = batch["last_id"] if batch["last_id"] is not None else cursor
                finished = batch["picked"] < self._purge_batch_size
                result = outcome(purged)
                progress = {"status": _DONE if finished else _RUNNING, **result.as_json()}
                if audit_id is None:
                    audit_id = await self._audit(conn, audit, progress, deadline)
                else:
                    await self._audit_update(conn, audit_id, progress, deadline)
            if finished:
                return result

    # --- replay --------------------------------------------------------------------------------

    async def replay(self, request: ReplayRequest, audit: Audit, deadline: Deadline) -> ReplayResult:
        """Replays in chunks of at most `pacing.chunk` rows, one transaction each, paced to `pacing.rate`.

        A large replay is therefore several transactions: if the call dies half-way, the chunks done stay
        done, and repeating the request (same request_id) resumes where it stopped, because rows already
        replayed under this request_id count as replayed and are not replayed again. Each replay_log row
        (dead letter, request_id, replayed_by) commits with the outbox row it made. The call's audit row
        commits with its first chunk (status 'running'), is updated with the counts in every later one,
        and says 'done' with the last, which also stores the result.

        Before each chunk the call takes its rows from the shared token bucket (rate_buckets), and
        waits while the bucket is in debt: the rate holds across requests and replicas.
        """
        run = _ReplayRun(request, self._pacing.chunk)
        # A repeat of a finished request takes nothing from the rate (nor waits for it).
        paced = not request.dry_run and not await self._replay_done(request.request_id, deadline)
        while True:
            taken = await self._take_replay_rate(run.next_size(), deadline) if paced else 0
            used = 0
            try:
                # A connection per chunk: a long, paced replay must not hold one while it waits.
                async with self._pool.acquire(timeout=deadline.left()) as conn, conn.transaction():
                    stored = await self._enter_replay(conn, run, audit, deadline)
                    if stored is not None:
                        return stored
                    used = await self._replay_chunk(conn, run, audit, deadline)
                    if not request.dry_run and run.finished:
                        await self._finish_replay(conn, run, audit, deadline)
                    elif not request.dry_run:
                        await self._audit_update(conn, run.audit_id, run.progress(_RUNNING), deadline)
                if run.finished:
                    return run.result
            finally:
                if taken > used:
                    await self._give_back_replay_rate(taken - used)

    async def _replay_done(self, request_id: str, deadline: Deadline) -> bool:
        rows = await self._fetch("control_replay_request_get", request_id, deadline=deadline)
        return bool(rows) and json.loads(rows[0]["result"]).get("state") == _DONE

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
                result = ReplayResult.from_json(stored, dry_run=request.dry_run)
                if run.audit_id is not None:
                    # This call replayed chunks, and a concurrent identical call finished the request.
                    await self._audit_update(conn, run.audit_id, {**run.progress(_DONE), **result.counts()}, deadline)
                return result
            # A concurrent identical call or an interrupted earlier one: share its bound on the selection.
            run.upper_id = int(stored["upper_id"])
            run.audit_ids = [int(i) for i in stored.get("audit_ids", [])]
            if not request.dry_run and run.audit_id is None:
                # This call joins the request: its own audit row, listed so the finisher can tell.
                run.resumed = True
                run.audit_id = await self._audit(conn, audit, run.progress(_RUNNING), deadline)
                run.audit_ids.append(run.audit_id)
                stored["audit_ids"] = run.audit_ids
                await conn.execute(
                    self._sql["control_replay_request_finish"], request.request_id, json.dumps(stored),
                    timeout=deadline.left(),
                )
            return None
        if run.upper_id is None:
            run.upper_id = int(await conn.fetchval(self._sql["control_dead_letter_max_id"], timeout=deadline.left()))
        if not request.dry_run:
            # Audited from the start: if the call is cut off, its chunks done are on record.
            run.audit_id = await self._audit(conn, audit, run.progress(_RUNNING), deadline)
            run.audit_ids = [run.audit_id]
            claim = json.dumps({"state": _RUNNING, "upper_id": run.upper_id, "audit_ids": run.audit_ids})
            await conn.execute(
                self._sql["control_replay_request_claim"], request.request_id, request.fingerprint(), claim,
                audit.actor, timeout=deadline.left(),
            )
        return None

    async def _replay_chunk(
        self, conn: asyncpg.Connection, run: _ReplayRun, audit: Audit, deadline: Deadline
    ) -> int:
        """Replays (or, dry, predicts) the next chunk; returns how many of its rows were replayed."""
        ids, cursor, limit = run.next_chunk()
        request = run.request
        args = (
            *(request.selection.filter or _NO_FILTER).sql_args(), request.request_id, ids,
            cursor, run.upper_id, limit, request.force,
        )
        if request.dry_run:
            rows = await conn.fetch(self._sql["control_replay_chunk_dry"], *args, timeout=deadline.left())
        else:
            rows = await conn.fetch(self._sql["control_replay_chunk"], *args, audit.actor, timeout=deadline.left())
        return run.record(ids, [(r["id"], r["replayed"]) for r in rows])

    async def _finish_replay(
        self, conn: asyncpg.Connection, run: _ReplayRun, audit: Audit, deadline: Deadline
    ) -> None:
        stored = json.dumps({"state": _DONE, **run.result.as_json()})
        await conn.execute(
            self._sql["control_replay_request_finish"], run.request.request_id, stored, timeout=deadline.left()
        )
        assert run.audit_id is not None
        await self._audit_update(conn, run.audit_id, run.progress(_DONE), deadline)
        # Earlier calls of this request still 'running' were cut off (or are about to find it done).
        await conn.execute(
            self._sql["control_audit_interrupted"], run.audit_ids, run.audit_id, timeout=deadline.left()
        )

    async def _take_replay_rate(self, rows: int, deadline: Deadline) -> int:
        """Takes `rows` tokens from the shared replay bucket, then waits until they are covered."""
        pacing = self._pacing
        async with self._pool.acquire(timeout=deadline.left()) as conn:
            tokens = float(await conn.fetchval(
                self._sql["control_rate_take"], _REPLAY_BUCKET, float(pacing.rate), float(pacing.chunk),
                float(rows), timeout=deadline.left(),
            ))
        wait = -tokens / pacing.rate
        if wait > 0:
            left = deadline.left()
            if left is not None and wait >= left:
                await self._give_back_replay_rate(rows)
                raise TimeoutError("deadline exceeded waiting for the shared replay rate")
            await asyncio.sleep(wait)
        return rows

    async def _give_back_replay_rate(self, rows: int) -> None:
        """Best effort, after the caller's deadline too: tokens not given back only slow replays a bit."""
        with contextlib.suppress(Exception):
            async with self._pool.acquire(timeout=5) as conn:
                await conn.execute(
                    self._sql["control_rate_give_back"], _REPLAY_BUCKET, float(rows), float(self._pacing.chunk),
                    timeout=5,
                )

    # --- helpers -------------------------------------------------------------------------------

    async def _fetch(self, block: str, *args: Any, deadline: Deadline) -> list[asyncpg.Record]:
        async with self._pool.acquire(timeout=deadline.left()) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(self._sql[block], *args, timeout=deadline.left())
            return rows

    async def _fetchval(self, block: str, *args: Any, deadline: Deadline) -> Any:
        async with self._pool.acquire(timeout=deadline.left()) as conn:
            return await conn.fetchval(self._sql[block], *args, timeout=deadline.left())

    async def _audit(
        self, conn: asyncpg.Connection, audit: Audit, result: dict[str, Any], deadline: Deadline
    ) -> int:
        """Writes the audit row; returns its id (for calls that update their outcome as they go)."""
        audit_id: int = await conn.fetchval(
            self._sql["control_audit_insert"],
            audit.actor,
            audit.action,
            json.dumps(audit.arguments, default=str),
            json.dumps(result, default=str),
            audit.client_identity,
            timeout=deadline.left(),
        )
        return audit_id

    async def _audit_update(
        self, conn: asyncpg.Connection, audit_id: int | None, result: dict[str, Any], deadline: Deadline
    ) -> None:
        if audit_id is not None:
            await conn.execute(
                self._sql["control_audit_update"], audit_id, json.dumps(result, default=str), timeout=deadline.left()
            )


@dataclass(frozen=True)
class _Figures:
    backlog: list[tuple[str, int, datetime | None]]  # topic, pending_count (at most the count limit), oldest
    dead_letter_count: int


class _ReplayRun:
    """The progress of one replay call across its chunk transactions."""

    def __init__(self, request: ReplayRequest, chunk: int) -> None:
        self.request = request
        self.result = ReplayResult(dry_run=request.dry_run)
        self.upper_id: int | None = None
        self.finished = False
        self.audit_id: int | None = None  # this call's audit row, once it claimed or joined the request
        self.audit_ids: list[int] = []  # every call's audit row for this request_id, this one included
        self.resumed = False  # this call joined a request another call had started
        self._chunk = chunk
        self._ids = list(request.selection.ids) if request.selection.ids is not None else None
        self._cursor = 0

    def next_size(self) -> int:
        """At most how many rows the next chunk replays (what it takes from the rate bucket)."""
        return self._chunk if self._ids is None else max(1, len(self._ids[: self._chunk]))

    def progress(self, status: str) -> dict[str, Any]:
        """The call's audit result so far; counts include rows earlier calls of the request replayed."""
        return {"status": status, **self.result.counts(), **({"resumed": True} if self.resumed else {})}

    def next_chunk(self) -> tuple[list[int] | None, int, int]:
        """(ids of this chunk or None for a filter, id cursor, row limit)."""
        if self._ids is None:
            return None, self._cursor, self._chunk
        return self._ids[: self._chunk], 0, self._chunk

    def record(self, ids: list[int] | None, outcomes: Sequence[tuple[int, bool]]) -> int:
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
        return len(replayed)


def _selection_args(selection: Selection) -> tuple[Any, ...]:
    """The filter ($1..$5, as {fragment:dead_letter_filter} expects it), then the ids ($6)."""
    return (*(selection.filter or _NO_FILTER).sql_args(), selection.ids)


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
