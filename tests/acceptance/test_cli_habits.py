"""CLI habits (issue 17), against a real `outbox-relay control` process and real PostgreSQL: --json and
-o json|yaml|wide after the command too, a hint when no token was given, "cannot reach the database"
told apart from "cannot reach the control plane", no gRPC core log lines on the terminal, and
`outbox-relay control` waiting for its database at start (or giving up in one line)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml

from clients.control import ControlClient, ControlError
from tests.acceptance import test_outboxctl as outboxctl
from tests.acceptance.test_outboxctl import (
    ADMIN_TOKEN,
    READ_TOKEN,
    Ctl,
    Seed,
    _env,
    _free_port,
    _start_control,
    describe,
)
from tests.pki import make_pki

# test_outboxctl's fixtures: a control-plane process on a fresh schema, outboxctl against it, seeded state.
control = outboxctl.control
ctl = outboxctl.ctl
db = outboxctl.db
seed = outboxctl.seed

WAIT_TIMEOUT = 60.0
RELAY_MODULE = [sys.executable, "-m", "outbox_relay"]  # the console script's launcher (outbox_relay.console)
OUTBOXCTL_MODULE = [sys.executable, "-m", "clients.console"]


class Forwarder:
    """A TCP forwarder to the database that can be started late and cut off: a database that is not
    there yet, or goes away, while the real one keeps serving the other tests."""

    def __init__(self, target: tuple[str, int], port: int) -> None:
        self.target = target
        self.port = port
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = False

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self._listener = listener
        self._stopped = False
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            sockets, self._sockets = self._sockets, []
            if self._listener is not None:
                sockets.append(self._listener)
                self._listener = None
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._stopped:  # stopped while this one was being accepted
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def _via(database_url: str, port: int) -> str:
    parts = urlsplit(database_url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


@pytest.fixture
def forwarder(database_url: str) -> Iterator[Forwarder]:
    parts = urlsplit(database_url)
    assert parts.hostname and parts.port, f"these tests need a TCP database URL, not {database_url}"
    proxy = Forwarder((parts.hostname, parts.port), _free_port())
    try:
        yield proxy
    finally:
        proxy.stop()


def _wait_for(condition: str, check: object, timeout: float = WAIT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {condition}")


# --- output options ------------------------------------------------------------------------------


def test_output_options_work_after_the_command_too(ctl: Ctl, seed: Seed) -> None:
    before = ctl.json("locks")
    assert ctl.ok("locks", "--json") and json.loads(ctl.ok("locks", "--json")) == before
    assert json.loads(ctl.ok("locks", "-o", "json")) == before
    assert yaml.safe_load(ctl.ok("locks", "-o", "yaml")) == before
    assert yaml.safe_load(ctl.ok("-o", "yaml", "locks")) == before
    nested = json.loads(ctl.ok("dead-letters", "list", "--topic", "orders", "--json"))
    assert {d["id"] for d in nested} == {seed.old_dead_letter, seed.binary_dead_letter}

    # wide: tables with nothing cut (a table cell is cut at 80 characters otherwise)
    long_reason = "maintenance window " + "x" * 120
    ctl.ok("pause", "orders.*", "--reason", long_reason)
    assert long_reason not in ctl.ok("pauses")
    assert long_reason in ctl.ok("pauses", "-o", "wide")

    assert "contradict" in ctl.fails(2, "locks", "--json", "-o", "yaml")
    assert "--output" in ctl.fails(2, "locks", "-o", "xml")


# --- errors an operator can act on -------------------------------------------------------------


def test_a_missing_token_gets_a_hint(ctl: Ctl) -> None:
    message = ctl.fails(4, "status", token=None)
    assert "OUTBOX_CONTROL_TOKEN" in message, message
    wrong = ctl.fails(4, "status", token="not-the-token")
    assert "no token was given" not in wrong, wrong


def test_an_unreachable_database_is_named_as_such(
    database_url: str, schema: str, forwarder: Forwarder, tmp_path: Path
) -> None:
    forwarder.start()
    control_process = _start_control(_via(database_url, forwarder.port), schema, tmp_path / "control.log")
    try:
        ctl = Ctl(control_process.addr)
        ctl.ok("locks")
        forwarder.stop()  # the database goes away; the control plane stays up
        message = ctl.fails(3, "--timeout", "3", "locks")
        assert "cannot reach the database" in message, message
        assert "cannot reach the control plane" not in message, message
    finally:
        control_process.stop()
    message = ctl.fails(3, "--timeout", "2", "locks")  # now the control plane itself is gone
    assert "cannot reach the control plane" in message, message


def test_grpc_core_log_lines_stay_off_the_terminal(ctl: Ctl, tmp_path: Path) -> None:
    """TLS to a plaintext server: gRPC core logs each failed handshake on stderr unless told not to."""
    pki = make_pki(tmp_path)
    result = subprocess.run(
        [*OUTBOXCTL_MODULE, "--addr", ctl.addr, "--tls-ca", str(pki.ca), "--timeout", "3", "locks"],
        env=_env(OUTBOX_CONTROL_TOKEN=ADMIN_TOKEN), capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, check=False,
    )
    assert result.returncode == 3, describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("outboxctl: error: cannot reach the control plane"), describe(result)


# --- outbox-relay control waits for its database ---------------------------------------------------


def test_control_waits_for_its_database_at_start(
    database_url: str, schema: str, forwarder: Forwarder, tmp_path: Path
) -> None:
    log_path = tmp_path / "control.log"
    addr = f"127.0.0.1:{_free_port()}"
    env = _env(
        OUTBOX_DATABASE_URL=_via(database_url, forwarder.port), OUTBOX_SCHEMA=schema, OUTBOX_CONTROL_ADDR=addr,
        OUTBOX_CONTROL_ADMIN_TOKEN=ADMIN_TOKEN, OUTBOX_CONTROL_READ_TOKEN=READ_TOKEN,
        OUTBOX_CONTROL_SHUTDOWN_GRACE="0",
    )
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*RELAY_MODULE, "control"], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        _wait_for("the control plane to log that the database is not reachable",
                  lambda: "database not reachable" in log_path.read_text(errors="replace") or process.poll() is not None)
        assert process.poll() is None, log_path.read_text(errors="replace")
        forwarder.start()  # the database comes up

        def answers() -> bool:
            assert process.poll() is None, log_path.read_text(errors="replace")
            with ControlClient(addr, token=READ_TOKEN, timeout=1, retries=0) as probe:
                try:
                    probe.locks()
                except ControlError:
                    return False
            return True

        _wait_for("the control plane to serve once the database is up", answers)
    finally:
        if process.poll() is None:
            process.terminate()
        code = process.wait(30)
    assert code == 0, log_path.read_text(errors="replace")  # asked to stop: exit 0
    text = log_path.read_text(errors="replace")
    assert ADMIN_TOKEN not in text and READ_TOKEN not in text


def test_control_gives_up_on_its_database_in_one_line(schema: str) -> None:
    unreachable = f"postgresql://relay:hunter2-secret@127.0.0.1:{_free_port()}/app"
    result = subprocess.run(
        [*RELAY_MODULE, "control"],
        env=_env(OUTBOX_DATABASE_URL=unreachable, OUTBOX_SCHEMA=schema, OUTBOX_STARTUP_TIMEOUT="1",
                 OUTBOX_CONTROL_ADDR=f"127.0.0.1:{_free_port()}"),
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
    )
    assert result.returncode == 1, describe(result)
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "hunter2-secret" not in output, describe(result)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: control plane stopped: database not reachable within OUTBOX_STARTUP_TIMEOUT=1s"), last
