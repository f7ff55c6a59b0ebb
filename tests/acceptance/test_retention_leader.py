"""Retention of the control tables runs on the leader only (relay/maintenance.py): with two relays,
expired audit rows go, younger ones stay, and only the instance holding the `leader` lease deletes."""

from __future__ import annotations

import asyncpg
import pytest

from devtools.fleet import Fleet, wait_until

pytestmark = pytest.mark.slow

DAY = 86_400


async def test_only_the_leader_deletes_expired_audit_rows(fleet: Fleet) -> None:
    table = f'"{fleet.schema}".audit_log'
    conn = await asyncpg.connect(fleet.database_url)
    try:
        await conn.execute(
            f"INSERT INTO {table} (at, actor, action)"
            " SELECT now() - make_interval(secs => $1), 'tester', 'Pause' FROM generate_series(1, 25)",
            float(10 * DAY),
        )
        await conn.execute(f"INSERT INTO {table} (actor, action) VALUES ('tester', 'Resume')")
        relays = [
            fleet.spawn(f"relay-{n}", OUTBOX_AUDIT_RETENTION=str(DAY), OUTBOX_CLEANUP_BATCH_SIZE="10")
            for n in range(2)
        ]

        async def expired_gone() -> bool:
            fleet.check_alive()
            return int(await conn.fetchval(f"SELECT count(*) FROM {table}")) == 1

        await wait_until(expired_gone, 90, what="the leader's retention clean-up")
        assert await conn.fetchval(f"SELECT action FROM {table}") == "Resume", "the young row stays"
        leader = await conn.fetchval(
            f"""SELECT holder FROM "{fleet.schema}".distributed_locks WHERE name = 'leader'"""
        )
    finally:
        await conn.close()
    deleting = [r.instance_id for r in relays if "retention: deleted 25 expired audit rows" in r.log()]
    assert deleting == [leader], f"leader {leader}; deleted by {deleting}"
    others = [r for r in relays if r.instance_id != leader]
    assert all("retention: deleted" not in r.log() for r in others)
