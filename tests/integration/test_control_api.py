"""The gRPC control plane against real PostgreSQL: a grpc.aio server on 127.0.0.1:0 and real channels.

State is set up with plain SQL (outbox, dead_letter_archive, distributed_locks, relay_instances), so these
tests do not need a running relay.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from control._generated.outbox.control.v1 import control_pb2 as pb
from control._generated.outbox.control.v1 import control_pb2_grpc as pb_grpc
from control.server import ControlServer
from devtools.fleet import wait_until
from relay.schema_version import head_revision
from tests.integration.control_server import ADMIN_TOKEN, lock_waiters, serving, start_server

CALL_TIMEOUT = 20.0
STATE_TABLES = (
    "outbox", "dead_letter_archive", "replay_log", "replay_requests", "pauses", "audit_log", "distributed_locks",
)


class Client:
    """The generated stub with the admin token and a deadline on every call."""

    def __init__(self, channel: grpc.aio.Channel, token: str = ADMIN_TOKEN) -> None:
        self._stub = pb_grpc.ControlServiceStub(channel)
        self._metadata = (("authorization", f"Bearer {token}"),)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._stub, name)

        def call(request: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", CALL_TIMEOUT)
            return method(request, metadata=self._metadata, **kwargs)

        return call


@pytest.fixture
async def server(database_url: str, schema: str) -> AsyncIterator[ControlServer]:
    async for running in serving(database_url, schema):
        yield running


@pytest.fixture
async def client(server: ControlServer) -> AsyncIterator[Client]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Client(channel)


# --- state set-up through SQL ------------------------------------------------------------------


async def add_event(
    pg: asyncpg.Connection,
    schema: str,
    topic: str = "orders",
    key: str | None = "k1",
    payload: bytes = b"{}",
    *,
    headers: dict[str, Any] | None = None,
    attempts: int = 0,
    retry_in: float | None = None,
    last_error: str | None = None,
    published: bool = False,
) -> tuple[int, uuid.UUID]:
    row = await pg.fetchrow(
        f"""INSERT INTO "{schema}".outbox
                (topic, key, payload, headers, attempts, next_attempt_at, last_error, first_attempt_at,
                 last_attempt_at, published_at)
            VALUES ($1, $2, $3, $4::text::jsonb, $5, now() + make_interval(secs => $6::float8), $7,
                    CASE WHEN $5 > 0 THEN now() - interval '1 minute' END,
                    CASE WHEN $5 > 0 THEN now() END,
                    CASE WHEN $8 THEN now() END)
            RETURNING id, message_id""",
        topic, key, payload, json.dumps(headers or {}), attempts, retry_in, last_error, published,
    )
    return row["id"], row["message_id"]


async def add_dead_letter(
    pg: asyncpg.Connection,
    schema: str,
    topic: str = "orders",
    key: str | None = "k1",
    payload: bytes = b'{"n": 1}',
    *,
    reason: str = "max_attempts",
    headers: dict[str, Any] | None = None,
    archived_at: datetime | None = None,
) -> int:
    dead_letter_id: int = await pg.fetchval(
        f"""INSERT INTO "{schema}".dead_letter_archive
                (outbox_id, message_id, topic, key, payload, headers, created_at, attempts, reason, last_error,
                 archived_at, archived_by)
            VALUES (0, gen_random_uuid(), $1, $2, $3, $4::text::jsonb, now() - interval '1 hour', 10, $5,
                    'broker said no', coalesce($6, now()), 'relay-a')
            RETURNING id""",
        topic, key, payload, json.dumps(headers or {"trace": "t-1"}), reason, archived_at,
    )
    return dead_letter_id


async def add_lock(
    pg: asyncpg.Connection, schema: str, name: str, holder: str | None, token: int, expires_in: float
) -> None:
    await pg.execute(
        f"""INSERT INTO "{schema}".distributed_locks (name, holder, token, acquired_at, renewed_at, expires_at)
            VALUES ($1, $2, $3, now(), now(), now() + make_interval(secs => $4::float8))""",
        name, holder, token, expires_in,
    )


async def add_instance(
    pg: asyncpg.Connection, schema: str, instance_id: str, *, heartbeat_ago: float = 0, stopped: bool = False,
    partitions: list[int] | None = None,
) -> None:
    await pg.execute(
        f"""INSERT INTO "{schema}".relay_instances
                (instance_id, hostname, pid, version, heartbeat_at, stopped_at, partitions)
            VALUES ($1, 'host-' || $1, 42, '0.1.0', now() - make_interval(secs => $2::float8),
                    CASE WHEN $3 THEN now() END, $4::int[])""",
        instance_id, heartbeat_ago, stopped, partitions or [],
    )


async def snapshot(pg: asyncpg.Connection, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table the control plane may change, to prove a call changed nothing."""
    return {
        table: [tuple(r) for r in await pg.fetch(f'SELECT * FROM "{schema}".{table} ORDER BY 1')]
        for table in STATE_TABLES
    }


async def audit_rows(pg: asyncpg.Connection, schema: str) -> list[asyncpg.Record]:
    return await pg.fetch(
        f'SELECT actor, action, arguments::text AS arguments, result::text AS result FROM "{schema}".audit_log '
        "ORDER BY id"
    )


async def replays_of(pg: asyncpg.Connection, schema: str, dead_letter_ids: list[int]) -> dict[int, int]:
    """How many outbox rows each dead letter produced (through the x-replayed-from header)."""
    rows = await pg.fetch(
        f"""SELECT d.id, count(o.id) AS n
            FROM "{schema}".dead_letter_archive d
            LEFT JOIN "{schema}".outbox o ON o.headers->>'x-replayed-from' = d.message_id::text
            WHERE d.id = ANY($1::bigint[])
            GROUP BY d.id""",
        dead_letter_ids,
    )
    return {r["id"]: r["n"] for r in rows}


def ts(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def expect_status(call: Any, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    details = caught.value.details() or ""
    for fragment in fragments:
        assert fragment in details, details
    return details


# --- GetStatus, locks, pauses --------------------------------------------------------------------


async def test_get_status(client: Client, pg: asyncpg.Connection, schema: str) -> None:
    await add_instance(pg, schema, "relay-a", partitions=[0, 1])
    await add_instance(pg, schema, "relay-b", heartbeat_ago=3600)
    await add_instance(pg, schema, "relay-c", stopped=True)
    await add_lock(pg, schema, "leader", "relay-a", 1, 30)
    await add_event(pg, schema, "orders")
    await add_event(pg, schema, "orders", key="k2")
    await add_event(pg, schema, "payments")
    await add_event(pg, schema, "payments", published=True)
    await add_dead_letter(pg, schema)
    await client.Pause(pb.PauseRequest(topic_pattern="payments", reason="incident"))

    status = await client.GetStatus(pb.GetStatusRequest())

    assert [i.instance_id for i in status.instances] == ["relay-a"]
    instance = status.instances[0]
    assert (instance.hostname, list(instance.partitions), instance.leader) == ("host-relay-a", [0, 1], True)
    assert instance.heartbeat_at.ToDatetime(tzinfo=UTC) > datetime.now(UTC) - timedelta(minutes=1)
    assert {b.topic: b.pending_count for b in status.backlog} == {"orders": 2, "payments": 1}
    assert all(b.oldest_pending_age.ToTimedelta() >= timedelta(0) for b in status.backlog)
    assert status.dead_letter_count == 1
    assert [p.topic_pattern for p in status.pauses] == ["payments"]
    assert status.schema_version == head_revision()
    assert status.HasField("server_time")


async def test_list_and_release_locks(client: Client, pg: asyncpg.Connection, schema: str) -> None:
    await add_lock(pg, schema, "partition:10", "relay-a", 3, 30)
    await add_lock(pg, schema, "partition:2", "relay-b", 7, -5)
    await add_lock(pg, schema, "leader", "relay-a", 1, 30)

    listed = await client.ListLocks(pb.ListLocksRequest())
    assert [lock.name for lock in listed.locks] == ["leader", "partition:2", "partition:10"]
    by_name = {lock.name: lock for lock in listed.locks}
    assert (by_name["partition:10"].holder, by_name["partition:10"].token) == ("relay-a", 3)
    assert by_name["partition:2"].expired and not by_name["partition:10"].expired

    before = await snapshot(pg, schema)
    await expect_status(
        client.ReleaseLock(pb.ReleaseLockRequest(name="partition:10", expected_holder="relay-b")),
        grpc.StatusCode.FAILED_PRECONDITION, "relay-a", "3",
    )
    await expect_status(
        client.ReleaseLock(pb.ReleaseLockRequest(name="partition:10", expected_holder="relay-a", expected_token=2)),
        grpc.StatusCode.FAILED_PRECONDITION, "relay-a",
    )
    await expect_status(
        client.ReleaseLock(pb.ReleaseLockRequest(name="partition:99", expected_token=1)), grpc.StatusCode.NOT_FOUND
    )
    assert await snapshot(pg, schema) == before

    released = await client.ReleaseLock(
        pb.ReleaseLockRequest(name="partition:10", expected_holder="relay-a", expected_token=3, operator="alice")
    )
    assert released.lock.holder == "" and released.lock.expired and released.lock.token == 3
    row = await pg.fetchrow(f'SELECT holder, expires_at <= now() AS free FROM "{schema}".distributed_locks '
                            "WHERE name = 'partition:10'")
    assert row["holder"] is None and row["free"]
    [audit] = await audit_rows(pg, schema)
    assert (audit["actor"], audit["action"]) == ("admin:alice", "ReleaseLock")
    assert json.loads(audit["result"])["previous_holder"] == "relay-a"

    # The lease is now held by nobody, so the old holder no longer matches.
    await expect_status(
        client.ReleaseLock(pb.ReleaseLockRequest(name="partition:10", expected_holder="relay-a")),
        grpc.StatusCode.FAILED_PRECONDITION, "nobody",
    )
    released = await client.ReleaseLock(pb.ReleaseLockRequest(name="partition:2", expected_token=7))
    assert released.lock.holder == ""


async def test_pause_resume_and_list(client: Client, pg: asyncpg.Connection, schema: str) -> None:
    paused = await client.Pause(
        pb.PauseRequest(topic_pattern="orders.*", reason="broker migration", ttl=Duration(seconds=600),
                        operator="bob")
    )
    assert paused.pause.topic_pattern == "orders.*" and paused.pause.paused_by == "admin:bob"
    lifetime = paused.pause.expires_at.ToDatetime() - paused.pause.created_at.ToDatetime()
    assert timedelta(seconds=599) < lifetime <= timedelta(seconds=601)

    until = datetime.now(UTC) + timedelta(hours=1)
    everything = await client.Pause(pb.PauseRequest(all_topics=True, reason="freeze", expires_at=ts(until)))
    assert everything.pause.topic_pattern == "*"
    assert abs(everything.pause.expires_at.ToDatetime(tzinfo=UTC) - until) < timedelta(seconds=1)

    again = await client.Pause(pb.PauseRequest(topic_pattern="orders.*", reason="longer"))
    assert again.pause.id == paused.pause.id and again.pause.reason == "longer"
    assert not again.pause.HasField("expires_at")
    await pg.execute(
        f"""INSERT INTO "{schema}".pauses (topic_pattern, reason, paused_by, expires_at)
            VALUES ('old', '', 'x', now() - interval '1 minute')"""
    )

    listed = await client.ListPauses(pb.ListPausesRequest())
    assert [p.topic_pattern for p in listed.pauses] == ["*", "orders.*"]
    with_expired = await client.ListPauses(pb.ListPausesRequest(include_expired=True))
    assert [p.topic_pattern for p in with_expired.pauses] == ["*", "old", "orders.*"]

    resumed = await client.Resume(pb.ResumeRequest(topic_pattern="orders.*"))
    assert resumed.resumed and resumed.pause.reason == "longer"
    assert not (await client.Resume(pb.ResumeRequest(topic_pattern="orders.*"))).resumed
    assert (await client.Resume(pb.ResumeRequest(all_topics=True))).resumed
    patterns = await pg.fetch(f'SELECT topic_pattern FROM "{schema}".pauses')
    assert [r["topic_pattern"] for r in patterns] == ["old"]

    audit = await audit_rows(pg, schema)
    assert [a["action"] for a in audit] == ["Pause", "Pause", "Pause", "Resume", "Resume", "Resume"]
    assert audit[0]["actor"] == "admin:bob" and audit[1]["actor"] == "admin"
    assert json.loads(audit[4]["result"]) == {"resumed": False}


# --- stuck events and DeadLetterNow --------------------------------------------------------------


async def test_list_stuck_filters_and_pages(client: Client, pg: asyncpg.Connection, schema: str) -> None:
    stuck = [
        (await add_event(pg, schema, "orders", attempts=n + 1, retry_in=60, last_error=f"err {n}"))[0]
        for n in range(5)
    ]
    await add_event(pg, schema, "orders")
    await add_event(pg, schema, "orders", attempts=3, published=True)
    other, _ = await add_event(pg, schema, "payments", attempts=1, retry_in=5)

    first = await client.ListStuck(pb.ListStuckRequest(topic="orders", page_size=2))
    assert [e.id for e in first.events] == stuck[:2] and first.next_page_token
    event = first.events[0]
    assert (event.attempts, event.last_error, event.key) == (1, "err 0", "k1")
    assert event.HasField("next_attempt_at") and event.HasField("first_attempt_at")
    second = await client.ListStuck(pb.ListStuckRequest(topic="orders", page_size=2, page_token=first.next_page_token))
    third = await client.ListStuck(pb.ListStuckRequest(topic="orders", page_size=2, page_token=second.next_page_token))
    assert [e.id for e in second.events] == stuck[2:4]
    assert [e.id for e in third.events] == stuck[4:] and not third.next_page_token

    everything = await client.ListStuck(pb.ListStuckRequest())
    assert [e.id for e in everything.events] == [*stuck, other]


async def test_dead_letter_now(client: Client, pg: asyncpg.Connection, schema: str) -> None:
    by_id, _ = await add_event(pg, schema, "orders", payload=b"one", attempts=2, retry_in=60, last_error="timeout")
    _, message_id = await add_event(pg, schema, "orders", payload=b"two")
    published, _ = await add_event(pg, schema, "orders", published=True)

    moved = await client.DeadLetterNow(pb.DeadLetterNowRequest(outbox_id=by_id, reason="poison", operator="carol"))
    assert moved.dead_letter.outbox_id == by_id and moved.dead_letter.reason == "operator"
    assert moved.dead_letter.archived_by == "admin:carol" and moved.dead_letter.attempts == 2
    assert moved.dead_letter.last_error == "poison\nlast publish error: timeout"
    assert moved.dead_letter.payload_size == 3
    second = await client.DeadLetterNow(pb.DeadLetterNowRequest(message_id=str(message_id), reason="bad schema"))
    assert second.dead_letter.message_id == str(message_id)

    remaining = await pg.fetch(f'SELECT id FROM "{schema}".outbox')
    assert [r["id"] for r in remaining] == [published]
    archived = await pg.fetch(f'SELECT outbox_id, payload, reason FROM "{schema}".dead_letter_archive ORDER BY id')
    assert [(r["payload"], r["reason"]) for r in archived] == [(b"one", "operator"), (b"two", "operator")]

    before = await snapshot(pg, schema)
    await expect_status(
        client.DeadLetterNow(pb.DeadLetterNowRequest(outbox_id=published, reason="x")),
        grpc.StatusCode.FAILED_PRECONDITION, "already published",
    )
    await expect_status(
        client.DeadLetterNow(pb.DeadLetterNowRequest(outbox_id=by_id, reason="again")), grpc.StatusCode.NOT_FOUND
    )
    await expect_status(
        client.DeadLetterNow(pb.DeadLetterNowRequest(message_id=str(uuid.uuid4()), reason="x")),
        grpc.StatusCode.NOT_FOUND,
    )
    assert await snapshot(pg, schema) == before
    assert [a["action"] for a in await audit_rows(pg, schema)] == ["DeadLetterNow", "DeadLetterNow"]


async def test_deadline_bounds_database_work(
    client: Client, pg: asyncpg.Connection, database_url: str, schema: str
) -> None:
    event, _ = await add_event(pg, schema)
    blocker = await asyncpg.connect(database_url)
    try:
        async with blocker.transaction():
            await blocker.execute(f'SELECT 1 FROM "{schema}".outbox WHERE id = $1 FOR UPDATE', event)
            started = time.monotonic()
            await expect_status(
                client.DeadLetterNow(pb.DeadLetterNowRequest(outbox_id=event, reason="x"), timeout=0.5),
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
            assert time.monotonic() - started < 5
            # The server gives up too: its statement is cancelled, so nobody waits for the row lock.
            await wait_until(lambda: _none_waiting(pg, schema), 10, 0.05, "the server's statement cancelled")
        # The lock is gone, and the event stays put: nothing was waiting to delete it.
        assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".outbox WHERE id = $1', event) == 1
        assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".audit_log') == 0
    finally:
        await blocker.close()


async def _none_waiting(pg: asyncpg.Connection, schema: str) -> bool:
    return await lock_waiters(pg, schema) == 0


# --- dead letters: list, get, purge ------------------------------------------------------------


async def test_list_dead_letters_filters_and_pages(client: Client, pg: asyncpg.Connection, schema: str) -> None:
    now = datetime.now(UTC)
    old = await add_dead_letter(pg, schema, "orders", "a", archived_at=now - timedelta(days=2))
    mid = await add_dead_letter(pg, schema, "orders", "b", reason="too_large", archived_at=now - timedelta(hours=1))
    new = await add_dead_letter(pg, schema, "payments", "a", archived_at=now)
    keyless = await add_dead_letter(pg, schema, "orders", None, archived_at=now)

    async def ids(**filter_fields: Any) -> list[int]:
        reply = await client.ListDeadLetters(pb.ListDeadLettersRequest(filter=pb.DeadLetterFilter(**filter_fields)))
        return [d.id for d in reply.dead_letters]

    assert await ids() == [old, mid, new, keyless]
    assert await ids(topic="orders") == [old, mid, keyless]
    assert await ids(key="a") == [old, new]
    assert await ids(reason="too_large") == [mid]
    assert await ids(archived_after=ts(now - timedelta(days=1))) == [mid, new, keyless]
    assert await ids(archived_before=ts(now - timedelta(days=1))) == [old]
    assert await ids(archived_after=ts(now - timedelta(days=3)), archived_before=ts(now - timedelta(minutes=1)),
                     topic="orders") == [old, mid]

    seen: list[int] = []
    token = ""
    while True:
        page = await client.ListDeadLetters(pb.ListDeadLettersRequest(page_size=3, page_token=token))
        seen += [d.id for d in page.dead_letters]
        token = page.next_page_token
        if not token:
            break
    assert seen == [old, mid, new, keyless]
    summary = (await client.ListDeadLetters(pb.ListDeadLettersRequest(page_size=1))).dead_letters[0]
    assert (summary.topic, summary.key, summary.attempts, summary.payload_size) == ("orders", "a", 10, 8)
    assert not summary.HasField("first_attempt_at")


async def test_get_dead_letter(client: Client, pg: asyncpg.Connection, schema: str) -> None:
    dead = await add_dead_letter(pg, schema, payload=b"\x00\xffbinary", headers={"trace": "t-9", "n": 5})
    found = (await client.GetDeadLetter(pb.GetDeadLetterRequest(id=dead))).dead_letter
    assert found.summary.id == dead and found.payload == b"\x00\xffbinary"
    assert dict(found.headers) == {"trace": "t-9", "n": "5"}
    assert not found.replays

    await client.ReplayDeadLetters(pb.ReplayDeadLettersRequest(request_id="r-1", ids=[dead], operator="dan"))
    found = (await client.GetDeadLetter(pb.GetDeadLetterRequest(id=dead))).dead_letter
    assert found.summary.replay_count == 1
    [replay] = found.replays
    assert (replay.request_id, replay.forced, replay.replayed_by) == ("r-1", False, "admin:dan")

    await expect_status(client.GetDeadLetter(pb.GetDeadLetterRequest(id=dead + 100)), grpc.StatusCode.NOT_FOUND)


async def test_purge_dead_letters(client: Client, pg: asyncpg.Connection, schema: str) -> None:
    keep = await add_dead_letter(pg, schema, "orders")
    by_id = await add_dead_letter(pg, schema, "orders")
    by_filter = [await add_dead_letter(pg, schema, "payments") for _ in range(3)]

    before = await snapshot(pg, schema)
    dry = await client.PurgeDeadLetters(
        pb.PurgeDeadLettersRequest(filter=pb.DeadLetterFilter(topic="payments"), dry_run=True)
    )
    assert (dry.purged_count, dry.dry_run) == (3, True)
    assert await snapshot(pg, schema) == before

    purged = await client.PurgeDeadLetters(pb.PurgeDeadLettersRequest(ids=[by_id, 9999], operator="erin"))
    assert (purged.purged_count, purged.not_found_count) == (1, 1)
    purged = await client.PurgeDeadLetters(pb.PurgeDeadLettersRequest(filter=pb.DeadLetterFilter(topic="payments")))
    assert purged.purged_count == 3
    left = await pg.fetch(f'SELECT id FROM "{schema}".dead_letter_archive')
    assert [r["id"] for r in left] == [keep]
    assert by_filter
    audit = await audit_rows(pg, schema)
    assert [(a["actor"], a["action"]) for a in audit] == [
        ("admin:erin", "PurgeDeadLetters"), ("admin", "PurgeDeadLetters"),
    ]
    assert json.loads(audit[0]["arguments"]) == {"ids": [by_id, 9999]}


# --- replay --------------------------------------------------------------------------------------


async def test_replay_inserts_new_events_once(client: Client, pg: asyncpg.Connection, schema: str) -> None:
    first = await add_dead_letter(pg, schema, "orders", "k1", b"p1", headers={"trace": "t-1"})
    second = await add_dead_letter(pg, schema, "orders", "k1", b"p2")
    originals = {
        r["id"]: r["message_id"]
        for r in await pg.fetch(f'SELECT id, message_id FROM "{schema}".dead_letter_archive')
    }

    request = pb.ReplayDeadLettersRequest(request_id="replay-1", ids=[second, first, 424242], operator="fay")
    result = await client.ReplayDeadLetters(request)
    assert (result.replayed_count, result.skipped_already_replayed_count, result.not_found_count) == (2, 0, 1)
    assert list(result.replayed_ids) == [first, second] and list(result.not_found_ids) == [424242]

    rows = await pg.fetch(f'SELECT id, message_id, topic, key, payload, headers::text AS headers FROM "{schema}".outbox '
                          "ORDER BY id")
    assert [(r["topic"], r["key"], r["payload"]) for r in rows] == [("orders", "k1", b"p1"), ("orders", "k1", b"p2")]
    headers = json.loads(rows[0]["headers"])
    assert headers == {"trace": "t-1", "x-replayed-from": str(originals[first]), "x-replay-request": "replay-1"}
    assert {r["message_id"] for r in rows}.isdisjoint(originals.values())
    logged = await pg.fetch(f'SELECT dead_letter_id, new_message_id FROM "{schema}".replay_log ORDER BY id')
    assert [(r["dead_letter_id"], r["new_message_id"]) for r in logged] == [
        (first, rows[0]["message_id"]), (second, rows[1]["message_id"]),
    ]

    # The same request again: the stored result, nothing new.
    state = await snapshot(pg, schema)
    assert await client.ReplayDeadLetters(request) == result
    assert await snapshot(pg, schema) == state

    # Another request over the same dead letters: already replayed.
    other = await client.ReplayDeadLetters(pb.ReplayDeadLettersRequest(request_id="replay-2", ids=[first, second]))
    assert (other.replayed_count, other.skipped_already_replayed_count) == (0, 2)
    assert list(other.skipped_already_replayed_ids) == [first, second]
    assert await replays_of(pg, schema, [first, second]) == {first: 1, second: 1}

    # force replays again, once per request.
    forced = pb.ReplayDeadLettersRequest(request_id="replay-3", ids=[first], force=True)
    assert (await client.ReplayDeadLetters(forced)).replayed_count == 1
    assert (await client.ReplayDeadLetters(forced)).replayed_count == 1
    assert await replays_of(pg, schema, [first, second]) == {first: 2, second: 1}

    audit = await audit_rows(pg, schema)
    assert [a["action"] for a in audit] == ["ReplayDeadLetters"] * 3
    assert audit[0]["actor"] == "admin:fay"
    assert json.loads(audit[0]["result"]) == {
        "status": "done", "replayed_count": 2, "skipped_already_replayed_count": 0, "not_found_count": 1,
    }
    assert "p1" not in audit[0]["arguments"]


async def test_replay_request_id_reused_for_another_request(
    client: Client, pg: asyncpg.Connection, schema: str
) -> None:
    first = await add_dead_letter(pg, schema)
    second = await add_dead_letter(pg, schema)
    await client.ReplayDeadLetters(pb.ReplayDeadLettersRequest(request_id="same", ids=[first]))
    state = await snapshot(pg, schema)
    for different in (
        pb.ReplayDeadLettersRequest(request_id="same", ids=[second]),
        pb.ReplayDeadLettersRequest(request_id="same", ids=[first], force=True),
        pb.ReplayDeadLettersRequest(request_id="same", filter=pb.DeadLetterFilter(topic="orders")),
    ):
        await expect_status(client.ReplayDeadLetters(different), grpc.StatusCode.FAILED_PRECONDITION, "same")
    assert await snapshot(pg, schema) == state


async def test_replay_dry_run_changes_nothing(client: Client, pg: asyncpg.Connection, schema: str) -> None:
    done = await add_dead_letter(pg, schema)
    fresh = await add_dead_letter(pg, schema)
    await client.ReplayDeadLetters(pb.ReplayDeadLettersRequest(request_id="earlier", ids=[done]))
    state = await snapshot(pg, schema)

    dry = await client.ReplayDeadLetters(
        pb.ReplayDeadLettersRequest(request_id="dry", ids=[done, fresh, 777], dry_run=True)
    )
    assert dry.dry_run
    assert (list(dry.replayed_ids), list(dry.skipped_already_replayed_ids), list(dry.not_found_ids)) == (
        [fresh], [done], [777],
    )
    forced = await client.ReplayDeadLetters(
        pb.ReplayDeadLettersRequest(request_id="dry", filter=pb.DeadLetterFilter(topic="orders"), force=True,
                                    dry_run=True)
    )
    assert list(forced.replayed_ids) == [done, fresh]
    assert await snapshot(pg, schema) == state

    # A dry run leaves the request_id free, and predicted what the real run does.
    real = await client.ReplayDeadLetters(pb.ReplayDeadLettersRequest(request_id="dry", ids=[done, fresh, 777]))
    assert (list(real.replayed_ids), list(real.skipped_already_replayed_ids), real.dry_run) == ([fresh], [done], False)


async def test_concurrent_identical_replays_replay_once(
    client: Client, pg: asyncpg.Connection, schema: str
) -> None:
    dead = [await add_dead_letter(pg, schema, key=f"k{n % 3}") for n in range(20)]
    request = pb.ReplayDeadLettersRequest(request_id="storm", filter=pb.DeadLetterFilter(topic="orders"))

    results = await asyncio.gather(*(client.ReplayDeadLetters(request) for _ in range(8)))

    assert all(r == results[0] for r in results)
    assert results[0].replayed_count == 20
    assert set((await replays_of(pg, schema, dead)).values()) == {1}
    assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".replay_requests') == 1
    assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".audit_log') == 1


async def test_concurrent_different_replays_replay_once(
    client: Client, pg: asyncpg.Connection, schema: str
) -> None:
    for round_ in range(3):
        dead = [await add_dead_letter(pg, schema, topic=f"round-{round_}") for _ in range(30)]

        results = await asyncio.gather(*(
            client.ReplayDeadLetters(pb.ReplayDeadLettersRequest(request_id=f"r{round_}-{n}", ids=dead))
            for n in range(6)
        ))

        assert sum(r.replayed_count for r in results) == 30
        assert all(r.replayed_count + r.skipped_already_replayed_count == 30 for r in results)
        assert set((await replays_of(pg, schema, dead)).values()) == {1}
    assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".outbox') == 90


async def test_large_replay_is_chunked_paced_and_ordered(
    database_url: str, pg: asyncpg.Connection, schema: str
) -> None:
    dead = [await add_dead_letter(pg, schema, key=f"k{n % 2}", payload=str(n).encode()) for n in range(12)]
    await add_dead_letter(pg, schema, "payments")
    server = await start_server(database_url, schema, replay_batch_size=5, replay_rate=40)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            started = time.monotonic()
            result = await Client(channel).ReplayDeadLetters(
                pb.ReplayDeadLettersRequest(request_id="bulk", filter=pb.DeadLetterFilter(topic="orders"))
            )
            elapsed = time.monotonic() - started
    finally:
        await server.stop(0)

    assert list(result.replayed_ids) == dead
    # 12 rows at 40 rows/s: the last chunk may start after 10/40 s.
    assert elapsed >= 0.2
    rows = await pg.fetch(f'SELECT key, payload FROM "{schema}".outbox ORDER BY id')
    assert [r["payload"] for r in rows] == [str(n).encode() for n in range(12)]
    transactions = await pg.fetchval(
        f'SELECT count(DISTINCT xmin::text) FROM "{schema}".outbox'
    )
    assert transactions == 3


@pytest.mark.parametrize("force", [False, True])
async def test_concurrent_identical_chunked_replays_replay_once(
    database_url: str, pg: asyncpg.Connection, schema: str, force: bool
) -> None:
    dead = [await add_dead_letter(pg, schema, key=f"k{n % 3}") for n in range(11)]
    server = await start_server(database_url, schema, replay_batch_size=3, pool_size=8)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            request = pb.ReplayDeadLettersRequest(
                request_id="chunked", filter=pb.DeadLetterFilter(topic="orders"), force=force
            )
            results = await asyncio.gather(*(Client(channel).ReplayDeadLetters(request) for _ in range(5)))
            # Archived after the request started: not part of it, even for a late identical call.
            await add_dead_letter(pg, schema)
            late = await Client(channel).ReplayDeadLetters(request)
    finally:
        await server.stop(0)

    assert all(r == results[0] for r in [*results, late])
    assert list(results[0].replayed_ids) == dead
    assert set((await replays_of(pg, schema, dead)).values()) == {1}
    assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".outbox') == len(dead)


async def test_interrupted_replay_resumes(client: Client, pg: asyncpg.Connection, schema: str) -> None:
    dead = [await add_dead_letter(pg, schema) for _ in range(4)]
    # What an interrupted multi-chunk run leaves behind: the claim, and the first chunk replayed.
    await pg.execute(
        f"""INSERT INTO "{schema}".replay_requests (request_id, request_hash, result, requested_by)
            VALUES ('resume', $1, $2::text::jsonb, 'admin')""",
        _fingerprint_of(dead, force=True), json.dumps({"state": "running", "upper_id": dead[-1]}),
    )
    await pg.execute(
        f"""INSERT INTO "{schema}".replay_log
                (dead_letter_id, request_id, original_message_id, new_message_id, forced, replayed_by)
            SELECT id, 'resume', message_id, gen_random_uuid(), true, 'admin'
            FROM "{schema}".dead_letter_archive WHERE id = $1""",
        dead[0],
    )

    result = await client.ReplayDeadLetters(pb.ReplayDeadLettersRequest(request_id="resume", ids=dead, force=True))

    assert list(result.replayed_ids) == dead
    assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".replay_log') == 4
    assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".outbox') == 3


def _fingerprint_of(ids: list[int], *, force: bool) -> str:
    from control.model import ReplayRequest, Selection

    return ReplayRequest("resume", Selection(ids=sorted(ids)), force, dry_run=False).fingerprint()


# --- audit -----------------------------------------------------------------------------------


async def test_list_audit_pages_newest_first(client: Client, pg: asyncpg.Connection, schema: str) -> None:
    for n in range(5):
        await client.Pause(pb.PauseRequest(topic_pattern=f"t{n}", reason="r"))
    await client.Resume(pb.ResumeRequest(topic_pattern="t0", operator="gus"))

    first = await client.ListAudit(pb.ListAuditRequest(page_size=4))
    second = await client.ListAudit(pb.ListAuditRequest(page_size=4, page_token=first.next_page_token))
    entries = [*first.entries, *second.entries]
    assert not second.next_page_token
    assert [e.action for e in entries] == ["Resume"] + ["Pause"] * 5
    assert [e.id for e in entries] == sorted((e.id for e in entries), reverse=True)
    assert entries[0].actor == "admin:gus"
    assert json.loads(entries[0].arguments_json) == {"topic_pattern": "t0"}
    assert json.loads(entries[0].result_json) == {"resumed": True}
    assert json.loads(entries[-1].arguments_json)["topic_pattern"] == "t0"

    only = await client.ListAudit(pb.ListAuditRequest(action="Resume"))
    assert [e.action for e in only.entries] == ["Resume"]


# --- invalid input -------------------------------------------------------------------------------

_LONG = "x" * 1001
_FUTURE = ts(datetime.now(UTC) + timedelta(days=1))
_PAST = ts(datetime.now(UTC) - timedelta(days=1))

INVALID: list[tuple[str, Any, str]] = [
    ("ReleaseLock", pb.ReleaseLockRequest(expected_holder="a"), "name"),
    ("ReleaseLock", pb.ReleaseLockRequest(name="partition:0"), "expected_holder"),
    ("ReleaseLock", pb.ReleaseLockRequest(name="partition:0", expected_holder=""), "expected_holder"),
    ("ReleaseLock", pb.ReleaseLockRequest(name="partition:0", expected_token=-1), "expected_token"),
    ("ReleaseLock", pb.ReleaseLockRequest(name="p" * 300, expected_token=1), "name"),
    ("ReleaseLock", pb.ReleaseLockRequest(name="partition:0", expected_token=1, operator="o" * 200), "operator"),
    ("Pause", pb.PauseRequest(reason="r"), "topic_pattern"),
    ("Pause", pb.PauseRequest(topic_pattern=""), "topic_pattern"),
    ("Pause", pb.PauseRequest(topic_pattern="t" * 250), "topic_pattern"),
    ("Pause", pb.PauseRequest(topic_pattern=" orders"), "topic_pattern"),
    ("Pause", pb.PauseRequest(topic_pattern="orders\x00"), "topic_pattern"),
    ("Pause", pb.PauseRequest(topic_pattern="orders.[ab]"), "topic_pattern"),
    ("Pause", pb.PauseRequest(topic_pattern="orders]"), "topic_pattern"),
    ("Pause", pb.PauseRequest(all_topics=False), "all_topics"),
    ("Pause", pb.PauseRequest(topic_pattern="orders", reason=_LONG), "reason"),
    ("Pause", pb.PauseRequest(topic_pattern="orders", expires_at=_PAST), "expires_at"),
    ("Pause", pb.PauseRequest(topic_pattern="orders", expires_at=Timestamp(seconds=10**12)), "expires_at"),
    ("Pause", pb.PauseRequest(topic_pattern="orders", expires_at=Timestamp(seconds=1, nanos=-5)), "expires_at"),
    ("Pause", pb.PauseRequest(topic_pattern="orders", ttl=Duration(seconds=-5)), "ttl"),
    ("Pause", pb.PauseRequest(topic_pattern="orders", ttl=Duration(seconds=5, nanos=-1)), "ttl"),
    ("Resume", pb.ResumeRequest(), "topic_pattern"),
    ("Resume", pb.ResumeRequest(all_topics=False), "all_topics"),
    ("ListStuck", pb.ListStuckRequest(page_size=-1), "page_size"),
    ("ListStuck", pb.ListStuckRequest(page_size=1001), "page_size"),
    ("ListStuck", pb.ListStuckRequest(page_token="not-a-token!"), "page_token"),
    ("ListStuck", pb.ListStuckRequest(topic="t" * 250), "topic"),
    ("DeadLetterNow", pb.DeadLetterNowRequest(reason="r"), "outbox_id"),
    ("DeadLetterNow", pb.DeadLetterNowRequest(outbox_id=0, reason="r"), "outbox_id"),
    ("DeadLetterNow", pb.DeadLetterNowRequest(outbox_id=1), "reason"),
    ("DeadLetterNow", pb.DeadLetterNowRequest(outbox_id=1, reason=_LONG), "reason"),
    ("DeadLetterNow", pb.DeadLetterNowRequest(message_id="nope", reason="r"), "message_id"),
    ("ListDeadLetters", pb.ListDeadLettersRequest(page_size=5000), "page_size"),
    ("ListDeadLetters", pb.ListDeadLettersRequest(filter=pb.DeadLetterFilter(key="k\x001")), "filter.key"),
    ("ListDeadLetters", pb.ListDeadLettersRequest(page_token="Zm9vOjE"), "page_token"),
    ("ListDeadLetters", pb.ListDeadLettersRequest(
        filter=pb.DeadLetterFilter(archived_after=_FUTURE, archived_before=_PAST)), "filter.archived_before"),
    ("ListDeadLetters", pb.ListDeadLettersRequest(
        filter=pb.DeadLetterFilter(archived_after=Timestamp(seconds=-10**12))), "filter.archived_after"),
    ("GetDeadLetter", pb.GetDeadLetterRequest(), "id"),
    ("GetDeadLetter", pb.GetDeadLetterRequest(id=-3), "id"),
    ("ReplayDeadLetters", pb.ReplayDeadLettersRequest(ids=[1]), "request_id"),
    ("ReplayDeadLetters", pb.ReplayDeadLettersRequest(request_id="r" * 129, ids=[1]), "request_id"),
    ("ReplayDeadLetters", pb.ReplayDeadLettersRequest(request_id="r"), "ids"),
    ("ReplayDeadLetters", pb.ReplayDeadLettersRequest(
        request_id="r", ids=[1], filter=pb.DeadLetterFilter(topic="orders")), "ids"),
    ("ReplayDeadLetters", pb.ReplayDeadLettersRequest(request_id="r", filter=pb.DeadLetterFilter()), "filter"),
    ("ReplayDeadLetters", pb.ReplayDeadLettersRequest(request_id="r", ids=[1, 0]), "ids[1]"),
    ("ReplayDeadLetters", pb.ReplayDeadLettersRequest(request_id="r", ids=range(1, 10_002)), "ids"),
    ("ReplayDeadLetters", pb.ReplayDeadLettersRequest(
        request_id="r", filter=pb.DeadLetterFilter(topic="t" * 250)), "filter.topic"),
    ("PurgeDeadLetters", pb.PurgeDeadLettersRequest(), "ids"),
    ("PurgeDeadLetters", pb.PurgeDeadLettersRequest(ids=[1], all_dead_letters=True), "all_dead_letters"),
    ("PurgeDeadLetters", pb.PurgeDeadLettersRequest(
        filter=pb.DeadLetterFilter(topic="orders"), all_dead_letters=True), "all_dead_letters"),
    ("PurgeDeadLetters", pb.PurgeDeadLettersRequest(filter=pb.DeadLetterFilter(key="\x00")), "filter.key"),
    ("PurgeDeadLetters", pb.PurgeDeadLettersRequest(filter=pb.DeadLetterFilter()), "filter"),
    ("PurgeDeadLetters", pb.PurgeDeadLettersRequest(
        filter=pb.DeadLetterFilter(archived_after=_FUTURE, archived_before=_PAST)), "filter.archived_before"),
    ("ListAudit", pb.ListAuditRequest(page_size=-1), "page_size"),
    ("ListAudit", pb.ListAuditRequest(page_token="c3R1Y2s6MQ"), "page_token"),
]


async def test_invalid_requests_are_rejected_and_change_nothing(
    client: Client, pg: asyncpg.Connection, schema: str
) -> None:
    await add_lock(pg, schema, "partition:0", "relay-a", 1, 30)
    await add_event(pg, schema, attempts=1, retry_in=60)
    await add_dead_letter(pg, schema)
    before = await snapshot(pg, schema)

    for rpc, request, field in INVALID:
        details = await expect_status(getattr(client, rpc)(request), grpc.StatusCode.INVALID_ARGUMENT)
        assert details.startswith(f"{field}:"), (rpc, request, details)

    assert await snapshot(pg, schema) == before


async def test_every_rpc_has_an_invalid_input_case() -> None:
    mutations_and_paged = {
        "ReleaseLock", "Pause", "Resume", "ListStuck", "DeadLetterNow", "ListDeadLetters", "GetDeadLetter",
        "ReplayDeadLetters", "PurgeDeadLetters", "ListAudit",
    }
    assert {rpc for rpc, _, _ in INVALID} == mutations_and_paged
    # The other RPCs take no input that could be invalid.
    service = pb.DESCRIPTOR.services_by_name["ControlService"]
    without_fields = {m.name for m in service.methods if not m.input_type.fields}
    assert without_fields | mutations_and_paged | {"ListPauses"} == {m.name for m in service.methods}


# --- issue 13: audited and shared replays, fenced DeadLetterNow, bounded purges, identity, NUL ---


async def _audit_results(pg: asyncpg.Connection, schema: str, action: str) -> list[dict[str, Any]]:
    rows = await pg.fetch(
        f'SELECT result::text AS result FROM "{schema}".audit_log WHERE action = $1 ORDER BY id', action
    )
    return [json.loads(r["result"]) for r in rows]


async def test_a_cut_off_replay_is_audited_and_rerunning_it_replays_only_the_rest(
    database_url: str, pg: asyncpg.Connection, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from control.store import ControlStore

    dead = [await add_dead_letter(pg, schema, key=f"k{n % 2}") for n in range(7)]
    real_chunk = ControlStore._replay_chunk
    chunks = 0

    async def dies_after_two_chunks(self: Any, *args: Any) -> int:
        nonlocal chunks
        chunks += 1
        if chunks == 3:
            raise ConnectionResetError("the database went away")
        return await real_chunk(self, *args)

    monkeypatch.setattr(ControlStore, "_replay_chunk", dies_after_two_chunks)
    server = await start_server(database_url, schema, replay_batch_size=2)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            request = pb.ReplayDeadLettersRequest(
                request_id="cut", filter=pb.DeadLetterFilter(topic="orders"), force=True, operator="hal"
            )
            await expect_status(Client(channel).ReplayDeadLetters(request), grpc.StatusCode.UNAVAILABLE)

            # The two chunks that committed are on record, with the call still 'running'.
            assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".outbox') == 4
            [cut] = await _audit_results(pg, schema, "ReplayDeadLetters")
            assert cut == {
                "status": "running", "replayed_count": 4, "skipped_already_replayed_count": 0, "not_found_count": 0,
            }

            monkeypatch.setattr(ControlStore, "_replay_chunk", real_chunk)
            result = await Client(channel).ReplayDeadLetters(request)
    finally:
        await server.stop(0)

    # The same request_id, forced: the four done are not replayed again, the rest once.
    assert list(result.replayed_ids) == dead
    assert await replays_of(pg, schema, dead) == dict.fromkeys(dead, 1)
    assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".outbox') == 7
    first, second = await _audit_results(pg, schema, "ReplayDeadLetters")
    assert first["status"] == "interrupted" and first["replayed_count"] == 4
    assert second == {
        "status": "done", "replayed_count": 7, "skipped_already_replayed_count": 0, "not_found_count": 0,
        "resumed": True,
    }


async def test_the_replay_rate_is_shared_by_requests_and_replicas(
    database_url: str, pg: asyncpg.Connection, schema: str
) -> None:
    for topic in ("a", "b"):
        for _ in range(60):
            await add_dead_letter(pg, schema, topic)
    # Two control-plane replicas over one schema, each allowed 100 rows/s in chunks of 10.
    replicas = [await start_server(database_url, schema, replay_batch_size=10, replay_rate=100) for _ in range(2)]
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{replicas[0].port}") as one,
            grpc.aio.insecure_channel(f"127.0.0.1:{replicas[1].port}") as two,
        ):
            started = time.monotonic()
            results = await asyncio.gather(
                Client(one).ReplayDeadLetters(
                    pb.ReplayDeadLettersRequest(request_id="a", filter=pb.DeadLetterFilter(topic="a"))
                ),
                Client(two).ReplayDeadLetters(
                    pb.ReplayDeadLettersRequest(request_id="b", filter=pb.DeadLetterFilter(topic="b"))
                ),
            )
            elapsed = time.monotonic() - started
    finally:
        for replica in replicas:
            await replica.stop(0)

    assert [r.replayed_count for r in results] == [60, 60]
    # 120 rows at 100 rows/s together, the first chunk of 10 free: at least 1.1 s. Paced per call,
    # the two would have finished in about 0.5 s.
    assert elapsed >= 1.0, elapsed
    assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".rate_buckets WHERE name = $1', "replay") == 1


async def test_dead_letter_now_is_fenced_by_the_partition_lease(
    client: Client, pg: asyncpg.Connection, schema: str
) -> None:
    event, _ = await add_event(pg, schema, "orders", key="k1")
    waiting, _ = await add_event(pg, schema, "orders", key="k1", attempts=1, retry_in=60, last_error="nope")
    partition = await pg.fetchval(f'SELECT partition FROM "{schema}".outbox WHERE id = $1', event)
    lease = f"partition:{partition}"
    # A (fake) relay holds the event's partition: it may be publishing the event right now.
    await add_lock(pg, schema, lease, "relay-x", 4, 60)
    before = await snapshot(pg, schema)

    await expect_status(
        client.DeadLetterNow(pb.DeadLetterNowRequest(outbox_id=event, reason="poison")),
        grpc.StatusCode.FAILED_PRECONDITION, lease, "relay-x", "not waiting for a retry",
    )
    assert await snapshot(pg, schema) == before

    # An event waiting for a retry cannot be in flight: no claim of it is outstanding.
    moved = await client.DeadLetterNow(pb.DeadLetterNowRequest(outbox_id=waiting, reason="poison"))
    assert moved.dead_letter.outbox_id == waiting

    # Once the lease is free (expired or released), nobody may publish under it.
    await pg.execute(
        f'UPDATE "{schema}".distributed_locks SET expires_at = now() - interval \'1 second\' WHERE name = $1', lease
    )
    moved = await client.DeadLetterNow(pb.DeadLetterNowRequest(outbox_id=event, reason="poison"))
    assert moved.dead_letter.outbox_id == event
    assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".outbox') == 0


async def test_purge_runs_in_bounded_batches_and_everything_must_be_asked_for(
    database_url: str, pg: asyncpg.Connection, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("control.store.PURGE_BATCH_SIZE", 3)
    # Rows deleted by each statement, recorded by a statement-level trigger.
    await pg.execute(f"""
        CREATE TABLE "{schema}".purge_statements (id serial, n bigint);
        CREATE FUNCTION "{schema}".count_purged() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO "{schema}".purge_statements (n) SELECT count(*) FROM gone; RETURN NULL; END $$;
        CREATE TRIGGER count_purged AFTER DELETE ON "{schema}".dead_letter_archive
        REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION "{schema}".count_purged();
    """)
    old = datetime.now(UTC) - timedelta(days=30)
    for _ in range(10):
        await add_dead_letter(pg, schema, "orders", archived_at=old)
    others = [await add_dead_letter(pg, schema, "payments") for _ in range(2)]

    server = await start_server(database_url, schema)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            client = Client(channel)
            # A --since far in the past matches all ten: deleted three at a time, not in one statement.
            since = pb.DeadLetterFilter(archived_after=ts(datetime.now(UTC) - timedelta(days=3650)),
                                        archived_before=ts(datetime.now(UTC) - timedelta(days=1)))
            purged = await client.PurgeDeadLetters(pb.PurgeDeadLettersRequest(filter=since, operator="ida"))
            assert purged.purged_count == 10
            statements = await pg.fetch(f'SELECT n FROM "{schema}".purge_statements ORDER BY id')
            assert [r["n"] for r in statements] == [3, 3, 3, 1]
            [audit] = await _audit_results(pg, schema, "PurgeDeadLetters")
            assert audit == {"status": "done", "purged_count": 10, "not_found_count": 0}

            # An empty filter is not "everything": that needs all_dead_letters.
            await expect_status(
                client.PurgeDeadLetters(pb.PurgeDeadLettersRequest(filter=pb.DeadLetterFilter())),
                grpc.StatusCode.INVALID_ARGUMENT, "all_dead_letters",
            )
            assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".dead_letter_archive') == len(others)
            dry = await client.PurgeDeadLetters(pb.PurgeDeadLettersRequest(all_dead_letters=True, dry_run=True))
            assert (dry.purged_count, dry.dry_run) == (2, True)
            everything = await client.PurgeDeadLetters(pb.PurgeDeadLettersRequest(all_dead_letters=True))
            assert everything.purged_count == 2
    finally:
        await server.stop(0)
    assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".dead_letter_archive') == 0
    arguments = await pg.fetch(
        f"""SELECT arguments::text AS a FROM "{schema}".audit_log WHERE action = 'PurgeDeadLetters' ORDER BY id"""
    )
    assert json.loads(arguments[-1]["a"]) == {"all_dead_letters": True}


async def test_audit_rows_record_the_verified_identity(
    client: Client, pg: asyncpg.Connection, schema: str
) -> None:
    await client.Pause(pb.PauseRequest(topic_pattern="orders.*", reason="r", operator="someone-else"))
    row = await pg.fetchrow(f'SELECT actor, client_identity FROM "{schema}".audit_log')
    # The operator is what the caller says; the identity is what the server checked (the admin token).
    assert (row["actor"], row["client_identity"]) == ("admin:someone-else", "token:admin")
    [entry] = (await client.ListAudit(pb.ListAuditRequest())).entries
    assert (entry.actor, entry.client_identity) == ("admin:someone-else", "token:admin")


@pytest.mark.parametrize(
    ("rpc", "request_", "field"),
    [
        ("ListDeadLetters", pb.ListDeadLettersRequest(filter=pb.DeadLetterFilter(key="a\x00b")), "filter.key"),
        ("ListDeadLetters", pb.ListDeadLettersRequest(filter=pb.DeadLetterFilter(topic="a\x00")), "filter.topic"),
        ("ListDeadLetters", pb.ListDeadLettersRequest(filter=pb.DeadLetterFilter(reason="\x00")), "filter.reason"),
        ("ReplayDeadLetters", pb.ReplayDeadLettersRequest(
            request_id="r", filter=pb.DeadLetterFilter(key="\x00")), "filter.key"),
        ("PurgeDeadLetters", pb.PurgeDeadLettersRequest(filter=pb.DeadLetterFilter(key="k\x00")), "filter.key"),
        ("Pause", pb.PauseRequest(topic_pattern="orders.\x00*"), "topic_pattern"),
        ("Pause", pb.PauseRequest(topic_pattern="orders", operator="op\x00"), "operator"),
        ("ListStuck", pb.ListStuckRequest(topic="a\x00"), "topic"),
    ],
)
async def test_a_nul_in_any_filter_string_is_invalid_argument(
    client: Client, pg: asyncpg.Connection, schema: str, rpc: str, request_: Any, field: str
) -> None:
    await add_dead_letter(pg, schema)
    details = await expect_status(getattr(client, rpc)(request_), grpc.StatusCode.INVALID_ARGUMENT, "NUL")
    assert details.startswith(f"{field}:"), details
