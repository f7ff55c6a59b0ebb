"""The user's own singleton job, in real processes (issue 15): two processes compete for one lease
and only one runs the job at a time; kill -9 of the holder hands the job over after the ttl; a holder
stopped (SIGSTOP) past the ttl has its fenced writes refused once it runs again; `outboxctl locks`
lists the lease and `outboxctl release-lock` makes the holder's next renewal fail."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.acceptance.test_outboxctl import READ_TOKEN, Ctl, _start_control

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
JOB = "reconcile-invoices"
TTL = 2.0

# The job: holds the lease (waiting for it), and while holding appends one fenced row per tick.
# Every write result goes to stdout as JSON; a lost lease goes back to waiting.
SCRIPT = textwrap.dedent("""
    import asyncio, json, sys, time
    import asyncpg
    from clients import LeaseLost, lease

    url, schema, me, ttl = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    FENCED = f'''INSERT INTO "{schema}".job_log (who, token, at)
        SELECT $1, $2, clock_timestamp()
        WHERE EXISTS (SELECT 1 FROM "{schema}".distributed_locks
                      WHERE name = 'reconcile-invoices' AND holder = $1 AND token = $2)'''

    def say(**fields):
        print(json.dumps({"who": me, "t": time.time(), **fields}), flush=True)

    async def write(pool, token):
        status = await pool.execute(FENCED, me, token)
        say(event="write", token=token, rows=int(status.split()[-1]))

    async def main():
        async with asyncpg.create_pool(url, min_size=2, max_size=4) as pool:
            while True:
                try:
                    async with lease(pool, "reconcile-invoices", ttl=ttl, schema=schema, holder=me,
                                     wait=True, retry_interval=0.1) as held:
                        say(event="acquired", token=held.token)
                        while True:
                            time.sleep(0.3)  # the job's own (blocking) work
                            await asyncio.shield(write(pool, held.token))
                except LeaseLost as e:
                    say(event="lost", token=e.token)
                    await asyncio.sleep(0.5)

    asyncio.run(main())
""")


class Job:
    def __init__(self, tmp_path: Path, database_url: str, schema: str, who: str) -> None:
        self.who = who
        self.out = tmp_path / f"{who}.jsonl"
        script = tmp_path / "job.py"
        script.write_text(SCRIPT)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        with self.out.open("wb") as out, (tmp_path / f"{who}.err").open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, str(script), database_url, schema, who, str(TTL)],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
            )

    def events(self, kind: str | None = None) -> list[dict[str, object]]:
        lines = [json.loads(line) for line in self.out.read_text().splitlines() if line.startswith("{")]
        return [e for e in lines if kind is None or e["event"] == kind]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
        self.process.wait(10)


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def db(database_url: str, schema: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{schema}".job_log (who text, token bigint, at timestamptz)')
        yield conn


@pytest.fixture
def jobs(tmp_path: Path, database_url: str, schema: str, db: psycopg.Connection) -> Iterator[list[Job]]:
    started: list[Job] = []
    try:
        yield started
    finally:
        for job in started:
            job.stop()


def _start(jobs: list[Job], tmp_path: Path, database_url: str, schema: str, who: str) -> Job:
    job = Job(tmp_path, database_url, schema, who)
    jobs.append(job)
    return job


def _holder(jobs: list[Job]) -> tuple[Job, Job]:
    first = jobs[0] if jobs[0].events("acquired") else jobs[1]
    return first, jobs[1] if first is jobs[0] else jobs[0]


def _no_overlap(db: psycopg.Connection, schema: str) -> list[tuple[str, int]]:
    """The job's rows by token: each token is one holder, and their time ranges never interleave."""
    spans = db.execute(
        f'SELECT who, token, min(at), max(at) FROM "{schema}".job_log GROUP BY who, token ORDER BY min(at)'
    ).fetchall()
    assert len({token for _, token, _, _ in spans}) == len(spans), spans  # one holder per token
    for earlier, later in itertools.pairwise(spans):
        assert earlier[3] < later[2] and earlier[1] < later[1], spans
    return [(who, token) for who, token, _, _ in spans]


def test_one_at_a_time_and_kill_9_hands_over_after_the_ttl(
    jobs: list[Job], tmp_path: Path, database_url: str, schema: str, db: psycopg.Connection
) -> None:
    _start(jobs, tmp_path, database_url, schema, "a")
    _start(jobs, tmp_path, database_url, schema, "b")
    wait_for(lambda: any(j.events("acquired") for j in jobs), 20, "a holder")
    time.sleep(3 * TTL)  # both run; only one holds
    holder, other = _holder(jobs)
    assert other.events("acquired") == [] and len(holder.events("write")) >= 5
    assert all(e["rows"] == 1 for e in holder.events("write"))

    holder.process.send_signal(signal.SIGKILL)
    killed_at = time.time()
    holder.process.wait(10)
    wait_for(lambda: other.events("acquired"), 4 * TTL, "the takeover")
    taken = other.events("acquired")[0]
    assert TTL - 1.0 <= float(taken["t"]) - killed_at <= TTL + 2.0, taken  # only once the lease expired
    assert taken["token"] == holder.events("acquired")[0]["token"] + 1  # type: ignore[operator]
    wait_for(lambda: other.events("write"), 5, "the new holder's writes")
    assert _no_overlap(db, schema)[-1][0] == other.who


def test_a_stopped_holder_is_fenced_off(
    jobs: list[Job], tmp_path: Path, database_url: str, schema: str, db: psycopg.Connection
) -> None:
    _start(jobs, tmp_path, database_url, schema, "a")
    _start(jobs, tmp_path, database_url, schema, "b")
    wait_for(lambda: any(j.events("write") for j in jobs), 20, "a writing holder")
    holder, other = _holder(jobs)
    old = int(holder.events("acquired")[0]["token"])  # type: ignore[call-overload]
    os.kill(holder.process.pid, signal.SIGSTOP)
    wait_for(lambda: other.events("write"), 4 * TTL, "the takeover")
    assert other.events("acquired")[0]["token"] == old + 1
    # The pattern itself: a write fenced by the old holder's token is refused (0 rows).
    refused = db.execute(
        f'UPDATE "{schema}".job_log SET who = who WHERE EXISTS (SELECT 1 FROM "{schema}".distributed_locks '
        "WHERE name = %s AND holder = %s AND token = %s)", (JOB, holder.who, old),
    )
    assert refused.rowcount == 0
    writes_before = len(holder.events("write"))
    os.kill(holder.process.pid, signal.SIGCONT)
    wait_for(lambda: holder.events("lost"), 4 * TTL, "the old holder to notice the loss")
    late = holder.events("write")[writes_before:]
    assert late and all(e["rows"] == 0 and e["token"] == old for e in late), late  # its fenced write was refused
    time.sleep(1)
    assert [who for who, _ in _no_overlap(db, schema)] == [holder.who, other.who]


def test_outboxctl_lists_and_force_releases_a_user_lease(
    jobs: list[Job], tmp_path: Path, database_url: str, schema: str, db: psycopg.Connection
) -> None:
    control = _start_control(database_url, schema, tmp_path / "control.log")
    try:
        ctl = Ctl(control.addr)
        job = _start(jobs, tmp_path, database_url, schema, "a")
        wait_for(lambda: job.events("write"), 20, "the job")
        locks = {lock["name"]: lock for lock in ctl.json("locks", token=READ_TOKEN)}
        assert locks[JOB]["holder"] == "a" and locks[JOB]["token"] == 1 and not locks[JOB]["expired"]
        assert JOB in ctl.ok("locks", token=READ_TOKEN)
        ctl.ok("release-lock", JOB, "--holder", "a", "--token", "1", "--yes")
        wait_for(lambda: job.events("lost"), TTL + 2, "the holder's next renewal to fail")
        # The job went back to waiting and takes the free lease again, with a new token.
        wait_for(lambda: len(job.events("acquired")) == 2, 10, "the job to reacquire")
        assert job.events("acquired")[1]["token"] == 2
        audit = ctl.ok("audit", token=READ_TOKEN)
        assert JOB in audit
    finally:
        control.stop()
