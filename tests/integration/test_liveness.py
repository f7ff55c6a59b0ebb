"""Fast takeover's SQL against real PostgreSQL: the liveness lock of a session that ended is seen
free, and only then are its holder's leases expired (relay.liveness)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from relay.liveness import LivenessWatcher, liveness_key_prefix
from relay.store import RelayStore


@pytest.fixture
async def store(database_url: str, schema: str) -> AsyncIterator[RelayStore]:
    s = RelayStore(database_url, schema, pool_size=4)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_a_dead_sessions_leases_expire_and_a_live_ones_do_not(store: RelayStore) -> None:
    prefix = liveness_key_prefix(store.schema)
    watcher_conn = await store.connect_liveness()
    victim_conn = await store.connect_liveness()
    try:
        assert await store.take_liveness_lock(victim_conn, prefix + "victim")
        assert await store.take_liveness_lock(watcher_conn, prefix + "me")
        # The same key from another session: not granted (a previous process's lingering backend).
        assert not await store.take_liveness_lock(watcher_conn, prefix + "victim")
        await store.heartbeat("victim", [1, 2], 10)
        for name in ("partition:1", "partition:2", "leader"):
            assert await store.acquire_lease(name, "victim", 10) is not None
        assert await store.acquire_lease("partition:3", "never-locked", 10) is not None
        assert await store.acquire_lease("job:nightly", "victim", 10) is not None  # an application's lease

        assert await store.liveness_peers(watcher_conn, prefix, "me") == {
            "victim": True,
            "never-locked": False,
        }
        # Guarded in the statement itself: the lock is held, nothing expires.
        assert await store.expire_dead_holder(watcher_conn, prefix, "victim") == []

        await victim_conn.close()  # the process died: its session ends, its lock goes
        assert await store.liveness_peers(watcher_conn, prefix, "me") == {
            "victim": False,
            "never-locked": False,
        }
        expired = await store.expire_dead_holder(watcher_conn, prefix, "victim")
        assert expired == ["leader", "partition:1", "partition:2"]
        assert await store.liveness_peers(watcher_conn, prefix, "me") == {"never-locked": False}
        assert sorted(await store.claimable_partitions(4)) == [0, 1, 2]
        held = await store.pool.fetchval(
            f'SELECT expires_at > now() FROM "{store.schema}".distributed_locks WHERE name = $1',
            "job:nightly",
        )
        assert held, "applications' leases are left to their own TTL"
        live = await store.heartbeat("me", [], 10)
        assert "victim" not in live, "a dead instance stops counting towards the fair share"
        assert await store.acquire_lease("partition:1", "me", 10) is not None
    finally:
        for conn in (watcher_conn, victim_conn):
            if not conn.is_closed():
                await conn.close()


async def test_the_watcher_expires_a_peer_it_saw_alive_once_it_dies(store: RelayStore) -> None:
    pokes: list[int] = []
    watcher = LivenessWatcher(store, "me", lambda: pokes.append(1))
    conn = await store.connect_liveness()
    peer = await store.connect_liveness()
    try:
        await store.take_liveness_lock(peer, liveness_key_prefix(store.schema) + "peer")
        await store.acquire_lease("partition:0", "peer", 10)
        await store.acquire_lease("partition:1", "old-relay", 10)  # never held a liveness lock
        assert await watcher.check_once(conn) == []
        await peer.close()
        assert await watcher.check_once(conn) == ["peer"]
        assert pokes == [1]
        assert await store.claimable_partitions(2) == [0], "old-relay's lease waits for its TTL"
    finally:
        await conn.close()
        if not peer.is_closed():
            await peer.close()


async def test_a_session_sees_the_lock_of_another_schema_as_another_key(
    store: RelayStore, database_url: str
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await store.take_liveness_lock(conn, liveness_key_prefix("other_schema") + "x")
        other = await store.connect_liveness()
        try:
            assert await store.take_liveness_lock(other, liveness_key_prefix(store.schema) + "x")
        finally:
            await other.close()
    finally:
        await conn.close()
