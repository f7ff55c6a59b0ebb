"""clients.control (AsyncControlClient and ControlClient) against the real ControlServer on 127.0.0.1:0
and real PostgreSQL. State is set up with plain SQL, so no relay runs."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import FrozenInstanceError, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from clients import (
    AsyncControlClient,
    ControlClient,
    ControlError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from clients.control import (
    ControlConfig,
    DeadLetter,
    DeadLetterSummary,
    Lock,
    Page,
    Pause,
    ReplayResult,
    Status,
)
from control.server import ControlServer
from devtools.embedded import free_port
from tests.integration.control_server import ADMIN_TOKEN, READ_TOKEN, serving, start_server
from tests.pki import Pki, make_pki

OPERATOR = "tester"


# --- server and state ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own OUTBOX_CONTROL_* settings must not leak into the clients under test."""
    for name in ("ADDR", "TOKEN", "TOKEN_FILE", "TLS", "TLS_CA", "CLIENT_CERT", "CLIENT_KEY", "TLS_SERVER_NAME",
                 "TIMEOUT", "OPERATOR"):
        monkeypatch.delenv(f"OUTBOX_CONTROL_{name}", raising=False)


@pytest.fixture
async def server(database_url: str, schema: str) -> AsyncIterator[ControlServer]:
    async for running in serving(database_url, schema):
        yield running


@pytest.fixture
def addr(server: ControlServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
async def admin(addr: str) -> AsyncIterator[AsyncControlClient]:
    async with AsyncControlClient(addr, token=ADMIN_TOKEN, operator=OPERATOR) as client:
        yield client


@pytest.fixture
async def reader(addr: str) -> AsyncIterator[AsyncControlClient]:
    async with AsyncControlClient(addr, token=READ_TOKEN) as client:
        yield client


@dataclass(frozen=True)
class Seed:
    stuck_orders: tuple[int, uuid.UUID]
    stuck_payments: tuple[int, uuid.UUID]
    pending: tuple[int, uuid.UUID]
    pending_2: tuple[int, uuid.UUID]
    published: tuple[int, uuid.UUID]
    old_dead_letter: int  # orders/k1, archived 2 h ago, JSON payload
    binary_dead_letter: int  # orders/k2, payload not UTF-8
    poison_dead_letter: int  # payments/k1, reason 'poison'


async def add_event(
    pg: asyncpg.Connection, schema: str, topic: str, key: str | None, *, attempts: int = 0,
    last_error: str | None = None, published: bool = False,
) -> tuple[int, uuid.UUID]:
    row = await pg.fetchrow(
        f"""INSERT INTO "{schema}".outbox
                (topic, key, payload, attempts, next_attempt_at, last_error, first_attempt_at, last_attempt_at,
                 published_at, created_at)
            VALUES ($1, $2, '{{}}'::bytea, $3, CASE WHEN $3 > 0 THEN now() + interval '1 minute' END, $4,
                    CASE WHEN $3 > 0 THEN now() - interval '5 minutes' END,
                    CASE WHEN $3 > 0 THEN now() END, CASE WHEN $5 THEN now() END, now() - interval '10 minutes')
            RETURNING id, message_id""",
        topic, key, attempts, last_error, published,
    )
    return row["id"], row["message_id"]


async def add_dead_letter(
    pg: asyncpg.Connection, schema: str, topic: str, key: str | None, payload: bytes, *, reason: str,
    archived_ago: timedelta, headers: dict[str, Any] | None = None,
) -> int:
    dead_letter_id: int = await pg.fetchval(
        f"""INSERT INTO "{schema}".dead_letter_archive
                (outbox_id, message_id, topic, key, payload, headers, created_at, attempts, reason, last_error,
                 archived_at, archived_by)
            VALUES (1000, gen_random_uuid(), $1, $2, $3, $4::text::jsonb, now() - interval '3 hours', 10, $5,
                    'broker said no', now() - $6::interval, 'relay-a')
            RETURNING id""",
        topic, key, payload, json.dumps(headers or {}), reason, archived_ago,
    )
    return dead_letter_id


@pytest.fixture
async def seed(pg: asyncpg.Connection, schema: str) -> Seed:
    s = f'"{schema}"'
    await pg.execute(
        f"""INSERT INTO {s}.relay_instances (instance_id, hostname, pid, version, partitions)
            VALUES ('relay-a', 'host-a', 4242, '0.1.0', '{{0,1}}')"""
    )
    await pg.execute(
        f"""INSERT INTO {s}.distributed_locks (name, holder, token, acquired_at, renewed_at, expires_at) VALUES
            ('leader', 'relay-a', 7, now(), now(), now() + interval '30 seconds'),
            ('partition:0', 'relay-a', 3, now(), now(), now() + interval '30 seconds'),
            ('partition:1', NULL, 5, now() - interval '2 minutes', now() - interval '2 minutes',
             now() - interval '1 minute')"""
    )
    return Seed(
        stuck_orders=await add_event(pg, schema, "orders", "k1", attempts=3, last_error="broker down"),
        stuck_payments=await add_event(pg, schema, "payments", "p1", attempts=1, last_error="timeout"),
        pending=await add_event(pg, schema, "orders", "k2"),
        pending_2=await add_event(pg, schema, "orders", None),
        published=await add_event(pg, schema, "orders", "k3", published=True),
        old_dead_letter=await add_dead_letter(
            pg, schema, "orders", "k1", b'{"n": 1}', reason="max_attempts", archived_ago=timedelta(hours=2),
            headers={"trace": "t-1", "retries": 3},
        ),
        binary_dead_letter=await add_dead_letter(
            pg, schema, "orders", "k2", b"\xff\xfe\x00", reason="max_attempts", archived_ago=timedelta(minutes=1)
        ),
        poison_dead_letter=await add_dead_letter(
            pg, schema, "payments", "k1", b"poison", reason="poison", archived_ago=timedelta(seconds=1)
        ),
    )


async def outbox_count(pg: asyncpg.Connection, schema: str) -> int:
    count: int = await pg.fetchval(f'SELECT count(*) FROM "{schema}".outbox')
    return count



def assert_aware(*values: datetime | None) -> None:
    for value in values:
        assert value is not None and value.tzinfo is not None and value.utcoffset() == timedelta(0), value


# --- reads -------------------------------------------------------------------------------------


async def test_status(admin: AsyncControlClient, seed: Seed) -> None:
    status = await admin.status()
    assert isinstance(status, Status)
    [instance] = status.instances
    assert (instance.instance_id, instance.hostname, instance.pid, instance.version) == ("relay-a", "host-a", 4242, "0.1.0")
    assert instance.partitions == (0, 1) and instance.leader is True
    assert_aware(instance.started_at, instance.heartbeat_at, status.server_time)
    assert status.server_time is not None and abs(status.server_time - datetime.now(UTC)) < timedelta(minutes=1)
    backlog = {b.topic: b for b in status.backlog}
    assert {topic: b.pending_count for topic, b in backlog.items()} == {"orders": 3, "payments": 1}
    assert isinstance(backlog["orders"].oldest_pending_age, timedelta)
    assert timedelta(minutes=9) < backlog["orders"].oldest_pending_age < timedelta(hours=1)
    assert status.dead_letter_count == 3
    assert status.pauses == ()
    assert status.schema_version
    with pytest.raises(FrozenInstanceError):
        status.dead_letter_count = 0  # type: ignore[misc]


async def test_locks_and_pauses(reader: AsyncControlClient, seed: Seed) -> None:
    locks = {lock.name: lock for lock in await reader.locks()}
    assert set(locks) == {"leader", "partition:0", "partition:1"}
    assert (locks["leader"].holder, locks["leader"].token, locks["leader"].expired) == ("relay-a", 7, False)
    assert (locks["partition:1"].holder, locks["partition:1"].expired) == (None, True)
    assert_aware(locks["leader"].acquired_at, locks["leader"].renewed_at, locks["leader"].expires_at)
    assert await reader.pauses() == []
    assert await reader.pauses(include_expired=True) == []


async def test_stuck_pages(reader: AsyncControlClient, seed: Seed) -> None:
    first = await reader.stuck(page_size=1)
    assert isinstance(first, Page) and len(first.items) == 1 and first.next_page_token
    event = first.items[0]
    assert (event.id, event.message_id) == seed.stuck_orders
    assert (event.topic, event.key, event.attempts, event.last_error) == ("orders", "k1", 3, "broker down")
    assert_aware(event.next_attempt_at, event.first_attempt_at, event.last_attempt_at, event.created_at)
    second = await reader.stuck(page_size=1, page_token=first.next_page_token)
    assert [e.id for e in second.items] == [seed.stuck_payments[0]]
    assert second.next_page_token is None
    only = await reader.stuck("payments")
    assert [e.topic for e in only.items] == ["payments"] and only.next_page_token is None


async def test_dead_letters_filters_and_pages(reader: AsyncControlClient, seed: Seed) -> None:
    old, binary, poison = seed.old_dead_letter, seed.binary_dead_letter, seed.poison_dead_letter

    async def ids(**kwargs: Any) -> list[int]:
        page = await reader.dead_letters(**kwargs)
        return [d.id for d in page.items]

    assert await ids() == [old, binary, poison]
    assert await ids(topic="orders") == [old, binary]
    assert await ids(key="k1") == [old, poison]
    assert await ids(reason="poison") == [poison]
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    assert await ids(archived_after=hour_ago) == [binary, poison]
    assert await ids(archived_before=hour_ago) == [old]
    assert await ids(topic="orders", key="k2", reason="max_attempts") == [binary]

    first = await reader.dead_letters(page_size=2)
    assert [d.id for d in first.items] == [old, binary] and first.next_page_token
    rest = await reader.dead_letters(page_size=2, page_token=first.next_page_token)
    assert [d.id for d in rest.items] == [poison] and rest.next_page_token is None

    summary = first.items[0]
    assert isinstance(summary, DeadLetterSummary) and isinstance(summary.message_id, uuid.UUID)
    assert (summary.topic, summary.key, summary.reason, summary.attempts) == ("orders", "k1", "max_attempts", 10)
    assert (summary.payload_size, summary.replay_count, summary.archived_by) == (8, 0, "relay-a")
    assert summary.last_error == "broker said no"
    assert_aware(summary.archived_at, summary.created_at)


async def test_dead_letter(reader: AsyncControlClient, seed: Seed) -> None:
    found = await reader.dead_letter(seed.old_dead_letter)
    assert isinstance(found, DeadLetter)
    assert found.id == seed.old_dead_letter and found.payload == b'{"n": 1}' and found.payload_text == '{"n": 1}'
    assert dict(found.headers) == {"retries": "3", "trace": "t-1"}
    assert found.replays == ()
    binary = await reader.dead_letter(seed.binary_dead_letter)
    assert binary.payload == b"\xff\xfe\x00" and binary.payload_text is None
    assert "payload" not in repr(binary).replace("payload_size", "")


# --- mutations ---------------------------------------------------------------------------------


async def test_pause_and_resume(admin: AsyncControlClient, reader: AsyncControlClient) -> None:
    before = datetime.now(UTC)
    paused = await admin.pause("orders.*", reason="broker maintenance", ttl=timedelta(minutes=30))
    assert isinstance(paused, Pause)
    assert (paused.topic_pattern, paused.reason, paused.paused_by) == ("orders.*", "broker maintenance", "admin:tester")
    assert paused.expires_at is not None
    assert before + timedelta(minutes=29) < paused.expires_at < before + timedelta(minutes=31)

    everything = await admin.pause(reason="all stop", operator="alice")
    assert (everything.topic_pattern, everything.expires_at, everything.paused_by) == ("*", None, "admin:alice")

    again = await admin.pause("orders.*", reason="longer", ttl=7200.0)
    assert again.id == paused.id and again.reason == "longer"
    assert again.expires_at is not None and again.expires_at > paused.expires_at + timedelta(minutes=80)

    until = datetime.now(UTC) + timedelta(days=1)
    fixed = await admin.pause("audit.*", reason="fixed end", expires_at=until)
    assert fixed.expires_at is not None and abs(fixed.expires_at - until) < timedelta(seconds=1)

    assert [p.topic_pattern for p in await reader.pauses()] == ["*", "audit.*", "orders.*"]
    assert len((await reader.status()).pauses) == 3

    removed = await admin.resume("orders.*")
    assert removed is not None and removed.id == paused.id
    assert await admin.resume("orders.*") is None
    assert (await admin.resume()) is not None
    assert [p.topic_pattern for p in await reader.pauses()] == ["audit.*"]


async def test_release_lock(admin: AsyncControlClient, seed: Seed) -> None:
    released = await admin.release_lock("partition:0", expected_holder="relay-a")
    assert isinstance(released, Lock)
    assert (released.name, released.holder, released.token, released.expired) == ("partition:0", None, 3, True)
    released = await admin.release_lock("leader", expected_holder="relay-a", expected_token=7)
    assert released.holder is None


async def test_park_by_outbox_id_and_message_id(
    admin: AsyncControlClient, seed: Seed, pg: asyncpg.Connection, schema: str
) -> None:
    by_id = await admin.park(seed.stuck_orders[0], reason="poison pill")
    assert isinstance(by_id, DeadLetterSummary)
    assert (by_id.outbox_id, by_id.message_id, by_id.reason) == (*seed.stuck_orders, "operator")
    assert by_id.last_error is not None and by_id.last_error.startswith("poison pill")
    assert by_id.archived_by == "admin:tester"
    # seed.pending waits for no retry and its partition is leased by relay-a: it may be in flight.
    with pytest.raises(FailedPrecondition, match="may be being published right now"):
        await admin.park(seed.pending[1], reason="bad data")
    await admin.release_lock("partition:0", expected_holder="relay-a")
    by_uuid = await admin.park(seed.pending[1], reason="bad data")
    assert by_uuid.outbox_id == seed.pending[0]
    by_text = await admin.park(str(seed.pending_2[1]), reason="bad data")
    assert by_text.outbox_id == seed.pending_2[0]
    by_digits = await admin.park(str(seed.stuck_payments[0]), reason="bad data")
    assert by_digits.outbox_id == seed.stuck_payments[0]
    assert await outbox_count(pg, schema) == 1  # only the published event is left
    assert (await admin.status()).dead_letter_count == 7


async def test_replay(admin: AsyncControlClient, seed: Seed, pg: asyncpg.Connection, schema: str) -> None:
    old, binary, poison = seed.old_dead_letter, seed.binary_dead_letter, seed.poison_dead_letter
    before = await outbox_count(pg, schema)

    first = await admin.replay(ids=[binary, old])
    assert isinstance(first, ReplayResult)
    uuid.UUID(first.request_id)  # generated
    assert (first.replayed_count, first.replayed_ids, first.dry_run) == (2, (old, binary), False)
    assert await outbox_count(pg, schema) == before + 2

    # Same request_id: the first result, nothing replayed again (what a retry after a lost answer sees).
    repeat = await admin.replay(first.request_id, ids=[old, binary])
    assert (repeat.replayed_count, repeat.replayed_ids, repeat.request_id) == (2, (old, binary), first.request_id)
    assert await outbox_count(pg, schema) == before + 2

    dry = await admin.replay(ids=[old], dry_run=True)
    assert (dry.replayed_count, dry.skipped_already_replayed_ids, dry.dry_run) == (0, (old,), True)
    forced = await admin.replay("forced-1", ids=[old], force=True)
    assert (forced.request_id, forced.replayed_ids) == ("forced-1", (old,))

    by_filter = await admin.replay(topic="payments", dry_run=True)
    assert by_filter.replayed_ids == (poison,) and by_filter.not_found_count == 0
    mixed = await admin.replay(ids=[poison, 999_999])
    assert (mixed.replayed_ids, mixed.not_found_ids, mixed.not_found_count) == ((poison,), (999_999,), 1)
    assert await outbox_count(pg, schema) == before + 4

    history = await admin.dead_letter(old)
    assert [(r.request_id, r.forced) for r in history.replays] == [(first.request_id, False), ("forced-1", True)]
    assert all(isinstance(r.new_message_id, uuid.UUID) for r in history.replays)
    assert_aware(*(r.replayed_at for r in history.replays))
    assert history.summary.replay_count == 2


async def test_purge(admin: AsyncControlClient, seed: Seed) -> None:
    binary = seed.binary_dead_letter
    dry = await admin.purge(ids=[binary, 999_999], dry_run=True)
    assert (dry.purged_count, dry.not_found_count, dry.dry_run) == (1, 1, True)
    await admin.dead_letter(binary)
    done = await admin.purge(ids=[binary, 999_999])
    assert (done.purged_count, done.not_found_count, done.dry_run) == (1, 1, False)
    with pytest.raises(NotFound):
        await admin.dead_letter(binary)
    by_filter = await admin.purge(reason="poison")
    assert by_filter.purged_count == 1
    assert [d.id for d in (await admin.dead_letters()).items] == [seed.old_dead_letter]


async def test_audit(admin: AsyncControlClient, reader: AsyncControlClient, seed: Seed) -> None:
    assert (await reader.audit()).items == ()
    await admin.pause("a.*", reason="one")
    await admin.pause("b.*", reason="two")
    await admin.resume("a.*")
    await admin.purge(ids=[seed.poison_dead_letter])

    entries = (await reader.audit()).items
    assert [e.action for e in entries] == ["PurgeDeadLetters", "Resume", "Pause", "Pause"]
    assert all(e.actor == "admin:tester" for e in entries)
    assert_aware(*(e.at for e in entries))
    assert entries[0].arguments == {"ids": [seed.poison_dead_letter]}
    assert entries[0].result == {"status": "done", "purged_count": 1, "not_found_count": 0}
    assert all(e.client_identity == "token:admin" for e in entries)
    assert entries[1].result == {"resumed": True}

    pauses = await reader.audit(action="Pause")
    assert [e.arguments["topic_pattern"] for e in pauses.items] == ["b.*", "a.*"]
    first = await reader.audit(page_size=3)
    assert len(first.items) == 3 and first.next_page_token
    rest = await reader.audit(page_size=3, page_token=first.next_page_token)
    assert [e.action for e in rest.items] == ["Pause"] and rest.next_page_token is None


# --- the blocking client ---------------------------------------------------------------------------


async def test_sync_client_every_method(addr: str, seed: Seed) -> None:
    def scenario() -> None:
        with ControlClient(addr, token=ADMIN_TOKEN, operator="sync") as client:
            assert client.status().dead_letter_count == 3
            assert {lock.name for lock in client.locks()} == {"leader", "partition:0", "partition:1"}
            assert client.release_lock("partition:0", expected_token=3).holder is None
            assert client.pause("x.*", reason="r", ttl=60).topic_pattern == "x.*"
            assert [p.paused_by for p in client.pauses()] == ["admin:sync"]
            resumed = client.resume("x.*")
            assert resumed is not None and resumed.topic_pattern == "x.*"
            assert [e.id for e in client.stuck().items] == [seed.stuck_orders[0], seed.stuck_payments[0]]
            parked = client.park(seed.stuck_orders[1], reason="sync park")
            assert parked.outbox_id == seed.stuck_orders[0]
            page = client.dead_letters(topic="orders", page_size=10)
            assert [d.id for d in page.items] == [seed.old_dead_letter, seed.binary_dead_letter, parked.id]
            assert client.dead_letter(seed.old_dead_letter).payload == b'{"n": 1}'
            replayed = client.replay("sync-replay", ids=[seed.old_dead_letter])
            assert (replayed.request_id, replayed.replayed_ids) == ("sync-replay", (seed.old_dead_letter,))
            assert client.purge(ids=[parked.id]).purged_count == 1
            actions = [e.action for e in client.audit(page_size=10).items]
            assert actions == ["PurgeDeadLetters", "ReplayDeadLetters", "DeadLetterNow", "Resume", "Pause", "ReleaseLock"]
            with pytest.raises(FailedPrecondition, match="changed hands"):
                client.release_lock("leader", expected_holder="someone-else")
        with ControlClient(addr, token=READ_TOKEN) as read_only:
            assert read_only.status().dead_letter_count == 3
            with pytest.raises(PermissionDenied, match="admin token"):
                read_only.pause(reason="nope")

    # The server runs on this event loop; the blocking client runs in a worker thread.
    await asyncio.to_thread(scenario)


# --- error mapping -------------------------------------------------------------------------------


async def test_authentication_errors(addr: str, seed: Seed) -> None:
    async with AsyncControlClient(addr, token="wrong-" + ADMIN_TOKEN) as wrong:
        with pytest.raises(Unauthenticated, match="invalid bearer token") as caught:
            await wrong.status()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED and caught.value.method == "GetStatus"
    assert isinstance(caught.value, ControlError)

    async with AsyncControlClient(addr) as anonymous:
        with pytest.raises(Unauthenticated, match="authorization"):
            await anonymous.locks()

    async with AsyncControlClient(addr, token=READ_TOKEN) as reader:
        await reader.status()
        mutations: list[Callable[[], Any]] = [
            lambda: reader.pause(reason="r"),
            lambda: reader.resume(),
            lambda: reader.release_lock("leader", expected_token=7),
            lambda: reader.park(seed.pending[0], reason="r"),
            lambda: reader.replay(ids=[seed.old_dead_letter]),
            lambda: reader.purge(ids=[seed.old_dead_letter], dry_run=True),
        ]
        for mutation in mutations:
            with pytest.raises(PermissionDenied, match="needs the admin token") as denied:
                await mutation()
            assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED


async def test_server_side_invalid_argument(admin: AsyncControlClient, seed: Seed) -> None:
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: admin.pause(" padded ", reason="r"), "topic_pattern"),
        (lambda: admin.pause("x", reason="r" * 1001), "reason"),
        (lambda: admin.pause("x", reason="r", expires_at=datetime.now(UTC) - timedelta(minutes=1)), "expires_at"),
        (lambda: admin.dead_letters(page_token="not-a-token"), "page_token"),
        (lambda: admin.dead_letters(page_size=5000), "page_size"),
        (lambda: admin.audit(page_token="c3R1Y2s6MQ"), "page_token"),  # a token of the stuck list
        (lambda: admin.dead_letter(0), "id"),
        (lambda: admin.replay("r" * 129, ids=[1]), "request_id"),
        (lambda: admin.replay(ids=[-1]), "ids[0]"),
        (lambda: admin.park(seed.pending[0], reason=""), "reason"),
        (lambda: admin.release_lock("", expected_token=1), "name"),
        (
            lambda: admin.dead_letters(
                archived_after=datetime.now(UTC), archived_before=datetime.now(UTC) - timedelta(days=1)
            ),
            "filter.archived_before",
        ),
    ]
    for call, field in cases:
        with pytest.raises(InvalidArgument) as caught:
            await call()
        assert caught.value.message.startswith(field), caught.value.message
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_client_side_invalid_argument(admin: AsyncControlClient) -> None:
    cases: list[Callable[[], Any]] = [
        lambda: admin.replay(),
        lambda: admin.replay(ids=[1], topic="orders"),
        lambda: admin.replay(ids=[]),
        lambda: admin.purge(),
        lambda: admin.release_lock("leader"),
        lambda: admin.park("neither-an-id-nor-a-uuid", reason="r"),
        lambda: admin.park(0, reason="r"),
        lambda: admin.pause("x", reason="r", ttl=0),
        lambda: admin.pause("x", reason="r", ttl=60, expires_at=datetime.now(UTC)),
        lambda: admin.dead_letters(archived_after=datetime(2024, 1, 1)),  # naive: ambiguous
        lambda: admin.stuck(page_size=-1),
    ]
    for call in cases:
        with pytest.raises(InvalidArgument) as caught:
            await call()
        assert caught.value.code is None  # never sent


async def test_not_found_and_failed_precondition(admin: AsyncControlClient, seed: Seed) -> None:
    with pytest.raises(NotFound, match="dead letter 999999 does not exist") as missing:
        await admin.dead_letter(999_999)
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFound, match="partition:99"):
        await admin.release_lock("partition:99", expected_token=1)
    with pytest.raises(NotFound):
        await admin.park(999_999, reason="r")

    # A stale release: the lease changed hands since the operator looked (token 7 now, not 6).
    with pytest.raises(FailedPrecondition, match="changed hands") as stale:
        await admin.release_lock("leader", expected_holder="relay-a", expected_token=6)
    assert stale.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert next(lock for lock in await admin.locks() if lock.name == "leader").holder == "relay-a"
    with pytest.raises(FailedPrecondition, match="already published"):
        await admin.park(seed.published[0], reason="r")
    await admin.replay("reused", ids=[seed.old_dead_letter])
    with pytest.raises(FailedPrecondition, match="different replay request"):
        await admin.replay("reused", ids=[seed.poison_dead_letter])


# --- unavailable, retries, deadlines ---------------------------------------------------------------


async def test_unavailable_after_retries() -> None:
    addr = f"127.0.0.1:{free_port()}"
    async with AsyncControlClient(addr, token=ADMIN_TOKEN, timeout=5, retries=3) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            await client.status()
        elapsed = time.monotonic() - started
        assert "(4 attempts)" in caught.value.message and addr in caught.value.message
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert elapsed < 4  # backoff 0.05-0.1, 0.1-0.2, 0.2-0.4 s: well inside the deadline

        # Not idempotent: one attempt only.
        with pytest.raises(Unavailable) as once:
            await client.release_lock("leader", expected_token=1)
        assert "attempts" not in once.value.message
        with pytest.raises(Unavailable) as purge:
            await client.purge(ids=[1])
        assert "attempts" not in purge.value.message
        # Idempotent mutations are retried: replay (same request_id), pause, resume, dry-run purge.
        for call in (
            lambda: client.replay("r-1", ids=[1]),
            lambda: client.pause(reason="r"),
            lambda: client.resume(),
            lambda: client.purge(ids=[1], dry_run=True),
        ):
            with pytest.raises(Unavailable, match=r"\(4 attempts\)"):
                await call()

    # A short deadline ends the retries early, whatever `retries` says.
    async with AsyncControlClient(addr, token=ADMIN_TOKEN, timeout=0.5, retries=100) as hurried:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await hurried.locks()
        assert time.monotonic() - started < 1.5

    def blocking() -> None:
        with ControlClient(addr, token=ADMIN_TOKEN, timeout=5, retries=2) as client:
            with pytest.raises(Unavailable, match=r"\(3 attempts\)"):
                client.dead_letters()
            with pytest.raises(Unavailable) as once:
                client.park(1, reason="r")
            assert "attempts" not in once.value.message

    await asyncio.to_thread(blocking)


async def test_retry_reaches_a_server_that_comes_up(database_url: str, schema: str) -> None:
    port = free_port()
    async with AsyncControlClient(f"127.0.0.1:{port}", token=READ_TOKEN, timeout=15, retries=10) as client:
        call = asyncio.create_task(client.status())
        await asyncio.sleep(0.5)
        assert not call.done()  # still retrying
        server = await start_server(database_url, schema, addr=f"127.0.0.1:{port}")
        try:
            status = await asyncio.wait_for(call, 15)
            assert status.schema_version
        finally:
            await server.stop(0)


async def test_deadline_exceeded_is_unavailable() -> None:
    # A listener that accepts connections but never speaks HTTP/2: the call can only time out.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        async with AsyncControlClient(f"127.0.0.1:{port}", token=ADMIN_TOKEN, timeout=0.5) as client:
            started = time.monotonic()
            with pytest.raises(Unavailable) as caught:
                await client.status()
            assert time.monotonic() - started < 3
    assert caught.value.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)


# --- configuration and secrecy ------------------------------------------------------------------


async def test_token_never_in_text(addr: str) -> None:
    secret = "wrong-" + ADMIN_TOKEN
    async with AsyncControlClient(addr, token=secret) as client:
        for text in (repr(client), str(client), repr(client.config), str(client.config)):
            assert secret not in text and ADMIN_TOKEN not in text
        assert "token=set" in repr(client)
        with pytest.raises(Unauthenticated) as caught:
            await client.status()
    error = caught.value
    assert error.__context__ is None and error.__cause__ is None  # no RpcError (with its call) attached
    rendered = "".join(traceback.format_exception(error))
    for text in (str(error), repr(error), rendered, error.message):
        assert secret not in text and ADMIN_TOKEN not in text

    closed = f"127.0.0.1:{free_port()}"
    with ControlClient(closed, token=ADMIN_TOKEN, timeout=0.3) as sync:
        assert ADMIN_TOKEN not in repr(sync)
        with pytest.raises(Unavailable) as unreachable:
            sync.status()
    rendered = "".join(traceback.format_exception(unreachable.value))
    assert ADMIN_TOKEN not in rendered and ADMIN_TOKEN not in repr(unreachable.value)


async def test_config_from_environment_and_token_file(
    addr: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(READ_TOKEN + "\n")
    monkeypatch.setenv("OUTBOX_CONTROL_ADDR", addr)
    monkeypatch.setenv("OUTBOX_CONTROL_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("OUTBOX_CONTROL_TIMEOUT", "7.5")
    async with AsyncControlClient() as from_env:
        assert (from_env.config.addr, from_env.config.timeout) == (addr, 7.5)
        assert (await from_env.locks()) == []
        with pytest.raises(PermissionDenied):
            await from_env.resume()

    monkeypatch.setenv("OUTBOX_CONTROL_TOKEN", ADMIN_TOKEN)
    with pytest.raises(InvalidArgument, match="OUTBOX_CONTROL_TOKEN_FILE"):  # both: a leftover, refused
        AsyncControlClient()
    monkeypatch.delenv("OUTBOX_CONTROL_TOKEN_FILE")
    monkeypatch.setenv("OUTBOX_CONTROL_OPERATOR", "env-operator")
    async with AsyncControlClient() as admin:
        assert (await admin.pause(reason="r")).paused_by == "admin:env-operator"
    async with AsyncControlClient(token_file=token_file) as explicit:  # arguments win over the environment
        with pytest.raises(PermissionDenied):
            await explicit.resume()

    assert ControlConfig.resolve(env={}).addr == "127.0.0.1:50051"
    assert ControlConfig.resolve(env={}).timeout == 10.0
    for bad in (
        {"token_file": tmp_path / "missing"},
        {"token": "a", "token_file": token_file},
        {"tls_cert": token_file},  # a certificate without its key
        {"timeout": -1},
        {"token": "two words"},
    ):
        with pytest.raises(InvalidArgument) as caught:
            ControlConfig.resolve(env={}, **bad)
        assert READ_TOKEN not in str(caught.value)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(InvalidArgument, match="empty"):
        ControlConfig.resolve(env={"OUTBOX_CONTROL_TOKEN_FILE": str(empty)})


# --- TLS and mTLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("client-pki"))


async def test_tls_and_server_name(database_url: str, schema: str, pki: Pki) -> None:
    server = await start_server(database_url, schema, tls_cert=pki.server_cert, tls_key=pki.server_key)
    addr = f"127.0.0.1:{server.port}"
    try:
        async with AsyncControlClient(addr, token=READ_TOKEN, tls_ca=pki.ca) as client:
            assert (await client.status()).schema_version
        async with AsyncControlClient(addr, token=READ_TOKEN, tls_ca=pki.ca, tls_server_name="control.internal") as named:
            assert (await named.locks()) == []
        async with AsyncControlClient(addr, token=READ_TOKEN, tls_ca=pki.ca, tls_server_name="elsewhere.example",
                                      timeout=2) as wrong_name:
            with pytest.raises(Unavailable):
                await wrong_name.status()
        async with AsyncControlClient(addr, token=READ_TOKEN, timeout=2) as plaintext:
            with pytest.raises(Unavailable):
                await plaintext.status()
    finally:
        await server.stop(0)


async def test_mtls(database_url: str, schema: str, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    server = await start_server(
        database_url, schema, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    )
    addr = f"127.0.0.1:{server.port}"
    try:
        monkeypatch.setenv("OUTBOX_CONTROL_TLS_CA", str(pki.ca))
        monkeypatch.setenv("OUTBOX_CONTROL_CLIENT_CERT", str(pki.client_cert))
        monkeypatch.setenv("OUTBOX_CONTROL_CLIENT_KEY", str(pki.client_key))

        def blocking() -> None:
            with ControlClient(addr, token=READ_TOKEN) as client:
                assert client.config.tls and client.config.tls_cert == pki.client_cert
                assert client.status().schema_version

        await asyncio.to_thread(blocking)
        monkeypatch.delenv("OUTBOX_CONTROL_CLIENT_CERT")
        monkeypatch.delenv("OUTBOX_CONTROL_CLIENT_KEY")
        # The server's own certificate variables are not the client's: they present no certificate.
        monkeypatch.setenv("OUTBOX_CONTROL_TLS_CERT", str(pki.client_cert))
        monkeypatch.setenv("OUTBOX_CONTROL_TLS_KEY", str(pki.client_key))
        async with AsyncControlClient(addr, token=READ_TOKEN, timeout=2) as without_cert:
            with pytest.raises(Unavailable):
                await without_cert.status()
    finally:
        await server.stop(0)
