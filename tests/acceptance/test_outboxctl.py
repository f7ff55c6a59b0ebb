"""`outboxctl` as an operator runs it: the real console script against a real `outbox-relay control`
process and real PostgreSQL, every command in table and --json form, exit codes and confirmations.

Each test gets a fresh migrated schema (state set up with plain SQL) and its own control-plane process."""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from clients.control import ControlClient, ControlError
from devtools.fleet import console_script
from relay.schema_version import head_revision

ADMIN_TOKEN = "admin-ctl-token-9d2e7f41c6a8"
READ_TOKEN = "read-ctl-token-4b1a8c3e5f70"
COMMAND_TIMEOUT = 60.0
START_TIMEOUT = 30.0


OUTBOXCTL = console_script("outboxctl")
OUTBOX_RELAY = console_script("outbox-relay")


def _env(**outbox: str) -> dict[str, str]:
    """This process's environment without any OUTBOX_* setting, plus the given ones."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OUTBOX_")}
    env.update(outbox)
    env.update(PYTHONUNBUFFERED="1", COLUMNS="250")
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- the control plane process ---------------------------------------------------------------------


@dataclass
class ControlProcess:
    addr: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def _start_control(database_url: str, schema: str, log_path: Path, **settings: str) -> ControlProcess:
    """`outbox-relay control` on a free port, once it answers; retried if another process took the port."""
    for _ in range(3):
        addr = f"127.0.0.1:{_free_port()}"
        env = _env(
            OUTBOX_DATABASE_URL=database_url, OUTBOX_SCHEMA=schema, OUTBOX_CONTROL_ADDR=addr,
            OUTBOX_CONTROL_ADMIN_TOKEN=ADMIN_TOKEN, OUTBOX_CONTROL_READ_TOKEN=READ_TOKEN,
            OUTBOX_CONTROL_SHUTDOWN_GRACE="0", **settings,
        )
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [OUTBOX_RELAY, "control"], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        control = ControlProcess(addr, process, log_path)
        deadline = time.monotonic() + START_TIMEOUT
        with ControlClient(addr, token=READ_TOKEN, timeout=1, retries=0) as probe:
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    probe.locks()
                    return control
                except ControlError:
                    time.sleep(0.1)
        control.stop()
    raise AssertionError(f"outbox-relay control did not start:\n{log_path.read_text(errors='replace')[-3000:]}")


@pytest.fixture
def control(database_url: str, schema: str, tmp_path: Path) -> Iterator[ControlProcess]:
    process = _start_control(database_url, schema, tmp_path / "control.log")
    try:
        yield process
    finally:
        process.stop()
    assert ADMIN_TOKEN not in process.log() and READ_TOKEN not in process.log()


# --- running outboxctl -----------------------------------------------------------------------------


@dataclass
class Ctl:
    """Runs `outboxctl` against the control plane with the admin token (from the environment)."""

    addr: str

    def run(self, *args: str, token: str | None = ADMIN_TOKEN, addr: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        outbox = {"OUTBOX_CONTROL_ADDR": addr or self.addr, "OUTBOX_CONTROL_OPERATOR": "ops"}
        if token is not None:
            outbox["OUTBOX_CONTROL_TOKEN"] = token
        result = subprocess.run(
            [OUTBOXCTL, *args], env={**_env(**outbox), **(env or {})}, capture_output=True, text=True,
            timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL, check=False,
        )
        for secret in (ADMIN_TOKEN, READ_TOKEN):
            assert secret not in result.stdout and secret not in result.stderr, describe(result)
        return result

    def ok(self, *args: str, **kwargs: Any) -> str:
        result = self.run(*args, **kwargs)
        assert result.returncode == 0, describe(result)
        return result.stdout

    def json(self, *args: str, **kwargs: Any) -> Any:
        return json.loads(self.ok("--json", *args, **kwargs))

    def fails(self, code: int, *args: str, **kwargs: Any) -> str:
        """Runs a command that must fail with `code`; returns its one-line error message."""
        result = self.run(*args, **kwargs)
        assert result.returncode == code, describe(result)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("outboxctl: "), describe(result)
        return lines[0]


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"{result.args}: exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


@pytest.fixture
def ctl(control: ControlProcess) -> Ctl:
    return Ctl(control.addr)


# --- state ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    stuck_orders: tuple[int, uuid.UUID]
    stuck_payments: tuple[int, uuid.UUID]
    pending: tuple[int, uuid.UUID]
    published: tuple[int, uuid.UUID]
    old_dead_letter: int  # orders/k1, archived 2 h ago
    binary_dead_letter: int  # orders/k2, payload not UTF-8
    poison_dead_letter: int  # payments/k1, reason 'poison'


class Db:
    def __init__(self, database_url: str, schema: str) -> None:
        self.url = database_url
        self.s = f'"{schema}"'

    def one(self, sql: str, *args: Any) -> Any:
        with psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute(sql.replace("{s}", self.s), args).fetchone()
        return None if row is None else (row[0] if len(row) == 1 else tuple(row))

    def execute(self, sql: str, *args: Any) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.replace("{s}", self.s), args)

    def event(self, topic: str, key: str | None, *, attempts: int = 0, error: str | None = None,
              published: bool = False) -> tuple[int, uuid.UUID]:
        row: tuple[int, uuid.UUID] = self.one(
            """INSERT INTO {s}.outbox (topic, key, payload, attempts, next_attempt_at, last_error, first_attempt_at,
                                       last_attempt_at, published_at)
               VALUES (%s, %s, '{}'::bytea, %s, CASE WHEN %s > 0 THEN now() + interval '1 minute' END, %s,
                       CASE WHEN %s > 0 THEN now() END, CASE WHEN %s > 0 THEN now() END, CASE WHEN %s THEN now() END)
               RETURNING id, message_id""",
            topic, key, attempts, attempts, error, attempts, attempts, published,
        )
        return row

    def dead_letter(self, topic: str, key: str, payload: bytes, reason: str, archived_ago: timedelta,
                    headers: str = "{}") -> int:
        dead_letter_id: int = self.one(
            """INSERT INTO {s}.dead_letter_archive
                   (outbox_id, message_id, topic, key, payload, headers, created_at, attempts, reason, last_error,
                    archived_at, archived_by)
               VALUES (500, gen_random_uuid(), %s, %s, %s, %s::jsonb, now() - interval '3 hours', 10, %s,
                       'broker said no', now() - %s::interval, 'relay-a')
               RETURNING id""",
            topic, key, payload, headers, reason, archived_ago,
        )
        return dead_letter_id

    def count(self, table: str) -> int:
        n: int = self.one(f"SELECT count(*) FROM {{s}}.{table}")
        return n


@pytest.fixture
def db(database_url: str, schema: str) -> Db:
    return Db(database_url, schema)


@pytest.fixture
def seed(db: Db) -> Seed:
    db.execute("""INSERT INTO {s}.relay_instances (instance_id, hostname, pid, version, partitions)
                  VALUES ('relay-a', 'host-a', 4242, '0.1.0', '{0,1}')""")
    db.execute("""INSERT INTO {s}.distributed_locks (name, holder, token, acquired_at, renewed_at, expires_at) VALUES
                  ('leader', 'relay-a', 7, now(), now(), now() + interval '1 minute'),
                  ('partition:0', 'relay-a', 3, now(), now(), now() + interval '1 minute'),
                  ('partition:1', NULL, 5, now(), now(), now() - interval '1 minute')""")
    return Seed(
        stuck_orders=db.event("orders", "k1", attempts=3, error="broker down"),
        stuck_payments=db.event("payments", "p1", attempts=1, error="timeout"),
        pending=db.event("orders", "k2"),
        published=db.event("orders", "k3", published=True),
        old_dead_letter=db.dead_letter("orders", "k1", b'{"n": 1}', "max_attempts", timedelta(hours=2),
                                       '{"trace": "t-1"}'),
        binary_dead_letter=db.dead_letter("orders", "k2", b"\xff\xfe\x00", "max_attempts", timedelta(minutes=1)),
        poison_dead_letter=db.dead_letter("payments", "k1", b"poison", "poison", timedelta(seconds=1)),
    )


def _iso(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text)


# --- read commands -------------------------------------------------------------------------------


def test_status(ctl: Ctl, seed: Seed) -> None:
    table = ctl.ok("status")
    assert f"schema version: {head_revision()}" in table and "dead letters: 3" in table
    assert "relay-a" in table and "host-a" in table and "orders" in table and "payments" in table

    status = ctl.json("status")
    assert (status["dead_letter_count"], status["schema_version"]) == (3, head_revision())
    assert abs(_iso(status["server_time"]) - datetime.now(UTC)) < timedelta(minutes=1)
    [instance] = status["instances"]
    assert (instance["instance_id"], instance["partitions"], instance["leader"]) == ("relay-a", [0, 1], True)
    backlog = {b["topic"]: b for b in status["backlog"]}
    assert backlog["orders"]["pending_count"] == 2 and backlog["payments"]["pending_count"] == 1
    assert isinstance(backlog["orders"]["oldest_pending_age_seconds"], float)
    assert status["pauses"] == []


def test_locks(ctl: Ctl, seed: Seed) -> None:
    table = ctl.ok("locks", token=READ_TOKEN)
    assert "partition:0" in table and "partition:1" in table and "leader" in table and "relay-a" in table
    locks = {lock["name"]: lock for lock in ctl.json("locks", token=READ_TOKEN)}
    assert (locks["leader"]["holder"], locks["leader"]["token"], locks["leader"]["expired"]) == ("relay-a", 7, False)
    assert (locks["partition:1"]["holder"], locks["partition:1"]["expired"]) == (None, True)
    _iso(locks["leader"]["expires_at"])


def test_stuck(ctl: Ctl, seed: Seed) -> None:
    table = ctl.ok("stuck")
    assert "broker down" in table and str(seed.stuck_orders[1]) in table and "payments" in table
    events = ctl.json("stuck")
    assert [e["id"] for e in events] == [seed.stuck_orders[0], seed.stuck_payments[0]]
    assert events[0]["message_id"] == str(seed.stuck_orders[1]) and events[0]["attempts"] == 3
    assert [e["topic"] for e in ctl.json("stuck", "--topic", "payments")] == ["payments"]

    first = ctl.run("--json", "stuck", "--limit", "1")
    assert first.returncode == 0 and [e["id"] for e in json.loads(first.stdout)] == [seed.stuck_orders[0]]
    token = first.stderr.strip().removeprefix("more results: pass --page-token ")
    assert token and " " not in token, first.stderr
    rest = ctl.run("--json", "stuck", "--page-token", token)
    assert [e["id"] for e in json.loads(rest.stdout)] == [seed.stuck_payments[0]] and rest.stderr == ""


def test_dead_letters_list_and_show(ctl: Ctl, seed: Seed) -> None:
    old, binary, poison = seed.old_dead_letter, seed.binary_dead_letter, seed.poison_dead_letter
    table = ctl.ok("dead-letters", "list")
    assert "max_attempts" in table and "poison" in table and "broker said no" in table

    def ids(*args: str) -> list[int]:
        return [d["id"] for d in ctl.json("dead-letters", "list", *args, token=READ_TOKEN)]

    assert ids() == [old, binary, poison]
    assert ids("--topic", "orders") == [old, binary]
    assert ids("--key", "k1") == [old, poison]
    assert ids("--reason", "poison") == [poison]
    assert ids("--since", "1h") == [binary, poison]
    assert ids("--until", "1h") == [old]
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert ids("--since", since, "--topic", "orders") == [binary]
    assert ids("--limit", "2") == [old, binary]

    summary = ctl.json("dead-letters", "list", "--limit", "1")[0]
    assert (summary["topic"], summary["key"], summary["payload_size"], summary["replay_count"]) == ("orders", "k1", 8, 0)
    _iso(summary["archived_at"])
    uuid.UUID(summary["message_id"])

    shown = ctl.ok("dead-letters", "show", str(old))
    assert '{"n": 1}' in shown and "trace" in shown and "t-1" in shown and "orders" in shown
    letter = ctl.json("dead-letters", "show", str(old))
    assert (letter["id"], letter["payload_utf8"], letter["payload_base64"]) == (old, '{"n": 1}', "eyJuIjogMX0=")
    assert letter["headers"] == {"trace": "t-1"} and letter["replays"] == []
    raw = ctl.json("dead-letters", "show", str(binary))
    assert (raw["payload_utf8"], raw["payload_base64"]) == (None, "//4A")
    assert "not UTF-8" in ctl.ok("dead-letters", "show", str(binary))


def test_audit(ctl: Ctl, seed: Seed) -> None:
    ctl.ok("pause", "a.*", "--reason", "one")
    ctl.ok("pause", "b.*", "--reason", "two")
    ctl.ok("resume", "a.*")
    table = ctl.ok("audit", token=READ_TOKEN)
    assert "Resume" in table and "Pause" in table and "admin:ops" in table
    entries = ctl.json("audit", token=READ_TOKEN)
    assert [e["action"] for e in entries] == ["Resume", "Pause", "Pause"]
    assert entries[0]["arguments"] == {"topic_pattern": "a.*"} and entries[0]["result"] == {"resumed": True}
    assert entries[0]["actor"] == "admin:ops"
    # What the server verified (the admin token), beside what the caller declared (--operator).
    assert entries[0]["client_identity"] == "token:admin" and "token:admin" in table
    _iso(entries[0]["at"])
    assert [e["arguments"]["topic_pattern"] for e in ctl.json("audit", "--action", "Pause")] == ["b.*", "a.*"]
    assert len(ctl.json("audit", "--limit", "1")) == 1


# --- mutating commands -----------------------------------------------------------------------------


def test_pause_resume_pauses(ctl: Ctl, db: Db) -> None:
    out = ctl.ok("pause", "orders.*", "--reason", "broker maintenance", "--ttl", "30m")
    assert "paused 'orders.*' until" in out
    everything = ctl.json("pause", "--reason", "all stop")
    assert (everything["topic_pattern"], everything["expires_at"], everything["paused_by"]) == ("*", None, "admin:ops")
    longer = ctl.json("pause", "orders.*", "--reason", "longer", "--ttl", "1h30m")
    expires = _iso(longer["expires_at"])
    assert timedelta(minutes=89) < expires - datetime.now(UTC) < timedelta(minutes=91)

    table = ctl.ok("pauses", token=READ_TOKEN)
    assert "orders.*" in table and "longer" in table and "all stop" in table and "never" in table
    assert [p["topic_pattern"] for p in ctl.json("pauses")] == ["*", "orders.*"]
    assert len(ctl.json("status")["pauses"]) == 2

    assert "resumed 'orders.*'" in ctl.ok("resume", "orders.*")
    assert "'orders.*' was not paused" in ctl.ok("resume", "orders.*")
    assert ctl.json("resume", "orders.*") == {"resumed": False, "pause": None}
    resumed = ctl.json("resume")
    assert resumed["resumed"] is True and resumed["pause"]["topic_pattern"] == "*"
    assert db.count("pauses") == 0

    assert "--ttl" in ctl.fails(2, "pause", "x", "--reason", "r", "--ttl", "soon")
    # '[...]' means a character class to fnmatch but nothing to the relay's LIKE: refused, not listed.
    assert "character classes" in ctl.fails(2, "pause", "orders.[ab]", "--reason", "r")
    assert db.count("pauses") == 0
    assert "topic_pattern" in ctl.fails(2, "pause", " x ", "--reason", "r")
    assert "--reason" in ctl.fails(2, "pause", "x")


def test_release_lock(ctl: Ctl, seed: Seed, db: Db) -> None:
    refused = ctl.fails(2, "release-lock", "partition:0", "--holder", "relay-a")
    assert "--yes" in refused
    assert db.one("SELECT holder FROM {s}.distributed_locks WHERE name = 'partition:0'") == "relay-a"

    out = ctl.ok("release-lock", "partition:0", "--holder", "relay-a", "--yes")
    assert "released lease partition:0" in out
    assert db.one("SELECT holder FROM {s}.distributed_locks WHERE name = 'partition:0'") is None

    stale = ctl.fails(7, "release-lock", "leader", "--token", "6", "--yes")
    assert "changed hands" in stale
    released = ctl.json("release-lock", "leader", "--token", "7", "--holder", "relay-a", "-y")
    assert (released["name"], released["holder"], released["token"]) == ("leader", None, 7)
    assert "does not exist" in ctl.fails(6, "release-lock", "partition:99", "--token", "1", "--yes")
    assert "--holder or --token" in ctl.fails(2, "release-lock", "leader", "--yes")


def test_park(ctl: Ctl, seed: Seed, db: Db) -> None:
    assert "--yes" in ctl.fails(2, "park", str(seed.stuck_orders[0]), "--reason", "poison pill")
    assert db.count("dead_letter_archive") == 3

    # Waiting for a retry: no relay can be publishing it, even though relay-a holds its partition.
    out = ctl.ok("park", str(seed.stuck_orders[0]), "--reason", "poison pill", "--yes")
    assert f"parked event {seed.stuck_orders[0]}" in out
    # Not waiting, and its partition (0) leased by relay-a: relay-a may be publishing it right now.
    assert db.one("SELECT partition FROM {s}.outbox WHERE id = %s", seed.pending[0]) == 0
    fenced = ctl.fails(7, "park", str(seed.pending[1]), "--reason", "bad data", "--yes")
    assert "may be being published right now" in fenced and "partition:0" in fenced and "relay-a" in fenced
    assert db.count("dead_letter_archive") == 4
    ctl.ok("release-lock", "partition:0", "--holder", "relay-a", "--yes")
    parked = ctl.json("park", str(seed.pending[1]), "--reason", "bad data", "--yes")
    assert (parked["outbox_id"], parked["message_id"], parked["reason"]) == (seed.pending[0], str(seed.pending[1]), "operator")
    assert parked["last_error"].startswith("bad data")
    assert db.count("dead_letter_archive") == 5

    assert "already published" in ctl.fails(7, "park", str(seed.published[0]), "--reason", "r", "--yes")
    assert "no unpublished event" in ctl.fails(6, "park", "999999", "--reason", "r", "--yes")
    assert "neither an outbox id nor a message UUID" in ctl.fails(2, "park", "not-an-id", "--reason", "r", "--yes")


def test_replay(ctl: Ctl, seed: Seed, db: Db) -> None:
    old, binary, poison = seed.old_dead_letter, seed.binary_dead_letter, seed.poison_dead_letter
    outbox = db.count("outbox")
    assert "--yes" in ctl.fails(2, "dead-letters", "replay", str(old), str(binary))
    assert db.count("outbox") == outbox

    dry = ctl.ok("dead-letters", "replay", str(old), str(binary), "--dry-run")  # a dry run needs no --yes
    assert "would replay 2" in dry
    done = ctl.run("dead-letters", "replay", str(old), str(binary), "--yes")
    assert done.returncode == 0 and "replayed 2" in done.stdout and "request id: " in done.stdout, describe(done)
    # The request id is on stderr before anything is replayed, and is the one of the result.
    announced = done.stderr.strip().splitlines()[0]
    assert announced.startswith("outboxctl: replay request id: ") and "--request-id" in announced, describe(done)
    assert f"request id: {announced.split()[4]}" in done.stdout
    assert db.count("outbox") == outbox + 2

    first = ctl.json("dead-letters", "replay", str(poison), "--request-id", "ticket-42", "--yes")
    assert (first["request_id"], first["replayed_ids"], first["replayed_count"]) == ("ticket-42", [poison], 1)
    again = ctl.json("dead-letters", "replay", str(poison), "--request-id", "ticket-42", "--yes")
    assert again["replayed_ids"] == [poison] and db.count("outbox") == outbox + 3  # nothing replayed twice

    skipped = ctl.json("dead-letters", "replay", "--topic", "orders", "--dry-run")
    assert (skipped["replayed_count"], skipped["skipped_already_replayed_ids"], skipped["dry_run"]) == (0, [old, binary], True)
    forced = ctl.json("dead-letters", "replay", "--topic", "orders", "--key", "k1", "--force", "--yes")
    assert forced["replayed_ids"] == [old] and db.count("outbox") == outbox + 4
    assert [r["forced"] for r in ctl.json("dead-letters", "show", str(old))["replays"]] == [False, True]

    reused = ctl.run("dead-letters", "replay", str(old), "--request-id", "ticket-42", "--yes")
    assert reused.returncode == 7, describe(reused)
    *_, error = reused.stderr.strip().splitlines()
    # Every error names the request id (here: the one given) and how to finish the request.
    assert error.startswith("outboxctl: error: ") and "different replay request" in error, describe(reused)
    assert "--request-id ticket-42" in error
    assert "not both" in ctl.fails(2, "dead-letters", "replay", str(old), "--topic", "orders", "--yes")
    assert "at least one filter" in ctl.fails(2, "dead-letters", "replay", "--yes")


def test_purge(ctl: Ctl, seed: Seed, db: Db) -> None:
    binary, poison = seed.binary_dead_letter, seed.poison_dead_letter
    assert "--yes" in ctl.fails(2, "dead-letters", "purge", str(binary))
    assert "would purge 1" in ctl.ok("dead-letters", "purge", str(binary), "999999", "--dry-run")
    assert db.count("dead_letter_archive") == 3

    out = ctl.ok("dead-letters", "purge", str(binary), "999999", "--yes")
    assert "purged 1 dead letter(s), not found 1" in out
    dry = ctl.json("dead-letters", "purge", "--reason", "poison", "--dry-run")
    assert dry == {"purged_count": 1, "not_found_count": 0, "dry_run": True}
    done = ctl.json("dead-letters", "purge", "--reason", "poison", "--yes")
    assert done == {"purged_count": 1, "not_found_count": 0, "dry_run": False}
    assert db.count("dead_letter_archive") == 1
    assert [d["id"] for d in ctl.json("dead-letters", "list")] == [seed.old_dead_letter]
    assert "does not exist" in ctl.fails(6, "dead-letters", "show", str(poison))

    # Everything takes an explicit --all, alone.
    assert "--all" in ctl.fails(2, "dead-letters", "purge", "--yes")
    assert "not several" in ctl.fails(2, "dead-letters", "purge", "--all", "--topic", "orders", "--yes")
    assert "--yes" in ctl.fails(2, "dead-letters", "purge", "--all")
    for n in range(3):
        db.dead_letter("more", f"k{n}", b"x", "max_attempts", timedelta(days=400))
    assert ctl.json("dead-letters", "purge", "--all", "--dry-run")["purged_count"] == 4
    assert "purged 4 dead letter(s)" in ctl.ok("dead-letters", "purge", "--all", "--yes")
    assert db.count("dead_letter_archive") == 0
    [entry, *_] = ctl.json("audit", "--action", "PurgeDeadLetters")
    assert entry["arguments"] == {"all_dead_letters": True} and entry["result"]["status"] == "done"


def test_confirmation_on_a_terminal(ctl: Ctl, seed: Seed, db: Db) -> None:
    """On a terminal the destructive commands ask (default no) instead of refusing."""

    def answer(reply: bytes, *args: str) -> tuple[int, str]:
        primary, secondary = pty.openpty()
        env = _env(OUTBOX_CONTROL_ADDR=ctl.addr, OUTBOX_CONTROL_TOKEN=ADMIN_TOKEN)
        process = subprocess.Popen([OUTBOXCTL, *args], stdin=secondary, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=env)
        os.close(secondary)
        try:
            os.write(primary, reply)
            _, err = process.communicate(timeout=COMMAND_TIMEOUT)
        finally:
            os.close(primary)
        return process.returncode, err.decode()

    code, err = answer(b"n\n", "dead-letters", "purge", str(seed.poison_dead_letter))
    assert code == 1 and "Delete 1 dead letter(s)" in err and "aborted" in err
    assert db.count("dead_letter_archive") == 3
    code, err = answer(b"y\n", "dead-letters", "purge", str(seed.poison_dead_letter))
    assert code == 0, err
    assert db.count("dead_letter_archive") == 2


# --- exit codes ----------------------------------------------------------------------------------


def test_exit_codes(ctl: Ctl, seed: Seed) -> None:
    closed = f"127.0.0.1:{_free_port()}"
    message = ctl.fails(3, "status", addr=closed)
    assert "cannot reach the control plane" in message and closed in message
    assert ctl.fails(3, "--timeout", "0.5", "--json", "locks", addr=closed)

    assert "invalid bearer token" in ctl.fails(4, "status", token="not-the-token")
    assert "authorization" in ctl.fails(4, "locks", token=None)
    # A token given on the command line is never echoed either (Ctl.run checks every output).
    assert ctl.fails(4, "--token", ADMIN_TOKEN + "x", "status", token=None)

    assert "admin token" in ctl.fails(5, "pause", "--reason", "r", token=READ_TOKEN)
    assert "admin token" in ctl.fails(5, "dead-letters", "purge", "1", "--dry-run", token=READ_TOKEN)

    assert "No such command" in ctl.fails(2, "frobnicate")
    assert "--nope" in ctl.fails(2, "status", "--nope")
    assert "ID" in ctl.fails(2, "dead-letters", "show", "abc")
    assert "page_token" in ctl.fails(2, "dead-letters", "list", "--page-token", "garbage")
    assert "page_size" not in ctl.fails(2, "dead-letters", "list", "--limit", "-1")
    assert "--since" in ctl.fails(2, "dead-letters", "list", "--since", "yesterday-ish")
    assert "does not exist" in ctl.fails(6, "dead-letters", "show", "999999")

    missing = Path("/nonexistent/token")
    assert "token_file" in ctl.fails(2, "--token-file", str(missing), "status", token=None)

    result = ctl.run()
    assert result.returncode == 2 and "Usage" in result.stderr + result.stdout
    assert ctl.run("--help").returncode == 0


def test_a_cut_off_replay_is_finished_with_its_request_id(database_url: str, schema: str, db: Db, tmp_path: Path) -> None:
    """A --force replay that times out part-way: the request id printed before it started finishes it,
    and nothing is replayed twice."""
    dead = [db.dead_letter("bulk", f"k{n % 3}", b"{}", "max_attempts", timedelta(minutes=5)) for n in range(12)]
    # 5 rows/s in chunks of 2: the 12 rows take about 2 s, longer than the first call's --timeout.
    slow = _start_control(database_url, schema, tmp_path / "slow.log",
                          OUTBOX_CONTROL_REPLAY_RATE="5", OUTBOX_CONTROL_REPLAY_BATCH_SIZE="2")
    try:
        ctl = Ctl(slow.addr)
        cut = ctl.run("--timeout", "1", "dead-letters", "replay", "--topic", "bulk", "--force", "--yes")
        assert cut.returncode == 3, describe(cut)
        announced, *_, error = cut.stderr.strip().splitlines()
        assert announced.startswith("outboxctl: replay request id: "), describe(cut)
        request_id = announced.split()[4]
        assert f"--request-id {request_id}" in error, describe(cut)
        time.sleep(0.5)  # the server gives up at the same deadline; let a chunk caught committing land
        done_before = db.count("outbox")
        assert 0 < done_before < 12, describe(cut)
        [running] = ctl.json("audit", "--action", "ReplayDeadLetters")
        assert running["arguments"]["request_id"] == request_id
        assert running["result"]["replayed_count"] == done_before and running["result"]["status"] == "running"

        finished = ctl.json("--timeout", "30", "dead-letters", "replay", "--topic", "bulk", "--force",
                            "--request-id", request_id, "--yes")
        assert finished["replayed_ids"] == dead and finished["request_id"] == request_id
        assert db.count("outbox") == 12  # the rows done before were not replayed again
        second, first = ctl.json("audit", "--action", "ReplayDeadLetters")
        assert first["result"]["status"] == "interrupted" and second["result"]["status"] == "done"
    finally:
        slow.stop()
