"""No secret in any error, log line or CLI output (issue 13).

Every configuration mistake we could think of is fed to the real console scripts (`outbox-relay run`,
`control`, `migrate`, `outboxctl ...`) as subprocesses, with recognisable secrets everywhere in the
environment: the database password (URL and keyword-DSN form), PGPASSWORD, the Redis and SASL
passwords, both control-plane tokens and token files. Each case must exit non-zero, name what is wrong
(the variable, for a configuration error) and print none of the secrets, on stdout or stderr.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clients.control import ControlClient, ControlError
from devtools.embedded import StackEndpoints
from devtools.fleet import console_script

DB_PASSWORD = "dbpw-Url-5e1c9a0f"
KW_PASSWORD = "kwpw 7b3d 2f91"  # a keyword-DSN password with spaces, so quoted: password='...'
KW_PLAIN_PASSWORD = "kwpw-Plain-8a4e61"
PG_ENV_PASSWORD = "pgenvpw-71ac3d92"
REDIS_PASSWORD = "redispw-3c9f71b5"
SASL_PASSWORD = "saslpw-6d2a84c3"
ADMIN_TOKEN = "admin-tok-91f3c2e7aa"
READ_TOKEN = "read-tok-4a8b6d10bb"
FILE_TOKEN = "file-tok-c0ffee42dd"
CLI_TOKEN = "cli-tok-5eed1e55ee"
SECRETS = {
    "database password": DB_PASSWORD,
    "keyword-DSN password": KW_PASSWORD,
    "keyword-DSN password, part": "7b3d 2f91",
    "plain keyword-DSN password": KW_PLAIN_PASSWORD,
    "PGPASSWORD": PG_ENV_PASSWORD,
    "Redis password": REDIS_PASSWORD,
    "SASL password": SASL_PASSWORD,
    "admin token": ADMIN_TOKEN,
    "read token": READ_TOKEN,
    "token file contents": FILE_TOKEN,
    "outboxctl token": CLI_TOKEN,
}
COMMAND_TIMEOUT = 60.0


OUTBOX_RELAY = console_script("outbox-relay")
OUTBOXCTL = console_script("outboxctl")


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def assert_no_secret(output: str, context: str) -> None:
    leaked = [name for name, secret in SECRETS.items() if secret in output]
    assert not leaked, f"{', '.join(leaked)} in the output of {context}:\n{output[-4000:]}"


# --- a PostgreSQL server that rejects every password ------------------------------------------------


class PasswordRejectingPostgres:
    """Speaks just enough of the PostgreSQL protocol to ask for a clear-text password (so the client
    really sends it) and answer 28P01 `password authentication failed`. Remembers what it received."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.received: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(10)
                while True:  # SSLRequest / GSSENCRequest: refuse; then the StartupMessage
                    length = int.from_bytes(self._read(conn, 4), "big")
                    body = self._read(conn, length - 4)
                    code = int.from_bytes(body[:4], "big")
                    if code in (80877103, 80877104):
                        conn.sendall(b"N")
                        continue
                    if code == 80877102:  # CancelRequest
                        return
                    break
                conn.sendall(b"R" + (8).to_bytes(4, "big") + (3).to_bytes(4, "big"))  # clear-text password
                kind = self._read(conn, 1)
                length = int.from_bytes(self._read(conn, 4), "big")
                body = self._read(conn, length - 4)
                if kind == b"p":
                    self.received.append(body.rstrip(b"\0"))
                fields = b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"app\"\0\0"
                conn.sendall(b"E" + (len(fields) + 4).to_bytes(4, "big") + fields)
            except (OSError, ConnectionError):
                return

    def close(self) -> None:
        self._sock.close()


@pytest.fixture(scope="module")
def rejecting_postgres() -> Iterator[PasswordRejectingPostgres]:
    server = PasswordRejectingPostgres()
    try:
        yield server
    finally:
        server.close()


# --- the cases ----------------------------------------------------------------------------------------


@dataclass
class World:
    """What a case may refer to: files and ports of this test run."""

    tmp: Path
    closed_port: int
    rejecting_port: int

    @property
    def token_file(self) -> Path:
        path = self.tmp / "token"
        path.write_text(FILE_TOKEN + "\n")
        return path


@dataclass
class Case:
    id: str
    command: list[str]
    env: Callable[[World], dict[str, str | None]] = lambda w: {}
    expect: tuple[str, ...] = ()  # what the output must name (a variable, for configuration errors)
    code: int | None = None  # the exit code, when it is specific; any non-zero one otherwise
    args: Callable[[World], list[str]] = field(default=lambda w: [])


def base_env(world: World) -> dict[str, str]:
    """Secrets everywhere, servers nowhere: each case changes what it needs."""
    port = world.closed_port
    return {
        "OUTBOX_DATABASE_URL": f"postgresql://app:{DB_PASSWORD}@127.0.0.1:{port}/app",
        "OUTBOX_REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0",
        "OUTBOX_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
        "OUTBOX_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "OUTBOX_KAFKA_SASL_MECHANISM": "PLAIN",
        "OUTBOX_KAFKA_SASL_USERNAME": "relay",
        "OUTBOX_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        "OUTBOX_CONTROL_ADMIN_TOKEN": ADMIN_TOKEN,
        "OUTBOX_CONTROL_READ_TOKEN": READ_TOKEN,
        "OUTBOX_STARTUP_TIMEOUT": "1",
        "OUTBOX_CONTROL_TOKEN": ADMIN_TOKEN,  # outboxctl's
        "OUTBOX_CONTROL_ADDR": f"127.0.0.1:{port}",
        "OUTBOX_CONTROL_TIMEOUT": "2",
        "PGPASSWORD": PG_ENV_PASSWORD,
    }


KW_DSN = f"host=127.0.0.1 port=5432 user=app password='{KW_PASSWORD}' dbname=app"
KW_PLAIN_DSN = f"host=127.0.0.1 user=app password={KW_PLAIN_PASSWORD} dbname=app"
MALFORMED_URLS = {
    "no-at": f"postgresql://app:{DB_PASSWORD}/127.0.0.1/app",  # the password parses as a port
    "bad-ipv6": f"postgresql://app:{DB_PASSWORD}@[::1/app",
    "bad-port": f"postgresql://app:{DB_PASSWORD}@db:54x2/app",
    "no-scheme": f"app:{DB_PASSWORD}@127.0.0.1:5432/app",
    "mysql": f"mysql://app:{DB_PASSWORD}@127.0.0.1/app",
}
RUN = ["run"]
CONTROL = ["control"]
MIGRATE = ["migrate"]

RELAY_CASES = [
    # control-plane configuration, read by `control` and by `run` with OUTBOX_CONTROL_ADDR
    *(
        Case(f"{cmd[0]}-read-token-equals-admin-token", cmd, lambda w: {"OUTBOX_CONTROL_READ_TOKEN": ADMIN_TOKEN},
             ("OUTBOX_CONTROL_READ_TOKEN",), 2)
        for cmd in (CONTROL, RUN)
    ),
    *(
        Case(f"{cmd[0]}-token-and-token-file", cmd, lambda w: {"OUTBOX_CONTROL_ADMIN_TOKEN_FILE": str(w.token_file)},
             ("OUTBOX_CONTROL_ADMIN_TOKEN",), 2)
        for cmd in (CONTROL, RUN)
    ),
    *(
        Case(f"{cmd[0]}-tls-cert-without-key", cmd, lambda w: {"OUTBOX_CONTROL_TLS_CERT": str(w.token_file)},
             ("OUTBOX_CONTROL_TLS_KEY",), 2)
        for cmd in (CONTROL, RUN)
    ),
    Case("control-tls-key-without-cert", CONTROL, lambda w: {"OUTBOX_CONTROL_TLS_KEY": str(w.token_file)},
         ("OUTBOX_CONTROL_TLS_CERT",), 2),
    Case("control-client-ca-without-cert", CONTROL, lambda w: {"OUTBOX_CONTROL_TLS_CLIENT_CA": str(w.token_file)},
         ("OUTBOX_CONTROL_TLS_CLIENT_CA",), 2),
    Case("control-missing-token-file", CONTROL,
         lambda w: {"OUTBOX_CONTROL_READ_TOKEN": None, "OUTBOX_CONTROL_READ_TOKEN_FILE": str(w.tmp / "missing")},
         ("OUTBOX_CONTROL_READ_TOKEN_FILE",), 2),
    Case("control-unreadable-token-file", CONTROL,
         lambda w: {"OUTBOX_CONTROL_READ_TOKEN": None, "OUTBOX_CONTROL_READ_TOKEN_FILE": str(w.tmp)},  # a directory
         ("OUTBOX_CONTROL_READ_TOKEN_FILE",), 2),
    Case("control-empty-token-file", CONTROL,
         lambda w: {"OUTBOX_CONTROL_ADMIN_TOKEN": None, "OUTBOX_CONTROL_ADMIN_TOKEN_FILE": _write(w.tmp / "empty", b" \n")},
         ("OUTBOX_CONTROL_ADMIN_TOKEN_FILE",), 2),
    Case("control-binary-token-file", CONTROL,
         lambda w: {"OUTBOX_CONTROL_ADMIN_TOKEN": None,
                    "OUTBOX_CONTROL_ADMIN_TOKEN_FILE": _write(w.tmp / "binary", b"\xff\xfe" + FILE_TOKEN.encode())},
         ("OUTBOX_CONTROL_ADMIN_TOKEN_FILE",), 2),
    Case("control-file-token-equals-admin-token", CONTROL,
         lambda w: {"OUTBOX_CONTROL_READ_TOKEN": None, "OUTBOX_CONTROL_READ_TOKEN_FILE": str(w.token_file),
                    "OUTBOX_CONTROL_ADMIN_TOKEN": FILE_TOKEN},
         ("OUTBOX_CONTROL_READ_TOKEN",), 2),
    Case("control-bad-replay-rate", CONTROL, lambda w: {"OUTBOX_CONTROL_REPLAY_RATE": "fast"},
         ("OUTBOX_CONTROL_REPLAY_RATE",), 2),
    Case("control-insecure-exposure", CONTROL,
         lambda w: {"OUTBOX_CONTROL_ADMIN_TOKEN": None, "OUTBOX_CONTROL_READ_TOKEN": None,
                    "OUTBOX_CONTROL_ADDR": "0.0.0.0:0"},
         ("OUTBOX_CONTROL_ADMIN_TOKEN",), 2),
    # relay settings
    Case("run-batch-size-zero", RUN, lambda w: {"OUTBOX_BATCH_SIZE": "0"}, ("OUTBOX_BATCH_SIZE",), 2),
    Case("run-batch-size-not-a-number", RUN, lambda w: {"OUTBOX_BATCH_SIZE": "many"}, ("OUTBOX_BATCH_SIZE",), 2),
    Case("run-bad-routes-sink", RUN, lambda w: {"OUTBOX_ROUTES": "orders.*=rabbitmq"}, ("OUTBOX_ROUTES",), 2),
    Case("run-bad-routes-item", RUN, lambda w: {"OUTBOX_ROUTES": "orders.*"}, ("OUTBOX_ROUTES",), 2),
    Case("run-bad-redis-shards", RUN, lambda w: {"OUTBOX_REDIS_SHARDS": "orders=0"}, ("OUTBOX_REDIS_SHARDS",), 2),
    Case("run-bad-kafka-acks", RUN, lambda w: {"OUTBOX_KAFKA_ACKS": "2"}, ("OUTBOX_KAFKA_ACKS",), 2),
    Case("run-inflight-below-claim", RUN,
         lambda w: {"OUTBOX_INFLIGHT_MAX_BYTES": "4096", "OUTBOX_CLAIM_MAX_BYTES": "8192"},
         ("OUTBOX_INFLIGHT_MAX_BYTES", "OUTBOX_CLAIM_MAX_BYTES"), 2),
    Case("run-several-mistakes-at-once", RUN,
         lambda w: {"OUTBOX_BATCH_SIZE": "0", "OUTBOX_LISTEN": "maybe", "OUTBOX_CONTROL_READ_TOKEN": ADMIN_TOKEN},
         ("OUTBOX_BATCH_SIZE", "OUTBOX_LISTEN", "OUTBOX_CONTROL_READ_TOKEN"), 2),
    # the schema name and the database URL, read by every command
    *(Case(f"{cmd[0]}-invalid-schema", cmd, lambda w: {"OUTBOX_SCHEMA": 'Outbox"; DROP'}, ("OUTBOX_SCHEMA",), 2)
      for cmd in (RUN, CONTROL, MIGRATE)),
    *(Case(f"{cmd[0]}-keyword-dsn", cmd, lambda w: {"OUTBOX_DATABASE_URL": KW_DSN}, ("OUTBOX_DATABASE_URL",), 2)
      for cmd in (RUN, CONTROL, MIGRATE)),
    *(Case(f"{cmd[0]}-plain-keyword-dsn", cmd, lambda w: {"OUTBOX_DATABASE_URL": KW_PLAIN_DSN},
           ("OUTBOX_DATABASE_URL",), 2)
      for cmd in (RUN, MIGRATE)),
    *(Case(f"{cmd[0]}-malformed-url-{name}", cmd, lambda w, url=url: {"OUTBOX_DATABASE_URL": url},
           ("OUTBOX_DATABASE_URL",), 2)
      for name, url in MALFORMED_URLS.items() for cmd in (RUN, CONTROL, MIGRATE)),
    # secrets from files (`<VAR>_FILE`) and from OUTBOX_SECRETS_DIR, read by every command
    *(Case(f"{cmd[0]}-database-url-and-url-file", cmd,
           lambda w: {"OUTBOX_DATABASE_URL_FILE": _write(w.tmp / "db-url", _url(w.closed_port))},
           ("OUTBOX_DATABASE_URL", "OUTBOX_DATABASE_URL_FILE"), 2)
      for cmd in (RUN, CONTROL, MIGRATE)),
    *(Case(f"{cmd[0]}-missing-database-url-file", cmd,
           lambda w: {"OUTBOX_DATABASE_URL": None, "OUTBOX_DATABASE_URL_FILE": str(w.tmp / "missing")},
           ("OUTBOX_DATABASE_URL_FILE", "missing"), 2)
      for cmd in (RUN, CONTROL, MIGRATE)),
    *(Case(f"{cmd[0]}-unreachable-database-from-url-file", cmd,
           lambda w: {"OUTBOX_DATABASE_URL": None,
                      "OUTBOX_DATABASE_URL_FILE": _write(w.tmp / "db-url", _url(w.closed_port))})
      for cmd in (RUN, CONTROL, MIGRATE)),
    *(Case(f"{cmd[0]}-wrong-password-from-secrets-dir", cmd,
           lambda w: {"OUTBOX_DATABASE_URL": None, "OUTBOX_SECRETS_DIR": _secrets_dir(w)},
           ("password authentication failed",))
      for cmd in (RUN, CONTROL, MIGRATE)),
    *(Case(f"{cmd[0]}-secrets-dir-missing", cmd, lambda w: {"OUTBOX_SECRETS_DIR": str(w.tmp / "nowhere")},
           ("OUTBOX_SECRETS_DIR",), 2)
      for cmd in (RUN, CONTROL, MIGRATE)),
    Case("run-sasl-password-and-file", RUN,
         lambda w: {"OUTBOX_KAFKA_SASL_PASSWORD_FILE": _write(w.tmp / "sasl", SASL_PASSWORD.encode() + b"\n")},
         ("OUTBOX_KAFKA_SASL_PASSWORD", "OUTBOX_KAFKA_SASL_PASSWORD_FILE"), 2),
    Case("run-unreadable-redis-url-file", RUN,
         lambda w: {"OUTBOX_REDIS_URL": None, "OUTBOX_REDIS_URL_FILE": str(w.tmp)},  # a directory
         ("OUTBOX_REDIS_URL_FILE",), 2),
    Case("control-rotated-admin-token-equals-read-token", CONTROL,
         lambda w: {"OUTBOX_CONTROL_ADMIN_TOKENS": f"{FILE_TOKEN},{READ_TOKEN}"}, ("OUTBOX_CONTROL_READ_TOKEN",), 2),
    Case("control-two-token-file-equals-read-token", CONTROL,
         lambda w: {"OUTBOX_CONTROL_ADMIN_TOKEN": None,
                    "OUTBOX_CONTROL_ADMIN_TOKEN_FILE": _write(w.tmp / "admins", f"{FILE_TOKEN}\n{READ_TOKEN}\n".encode())},
         ("OUTBOX_CONTROL_READ_TOKEN",), 2),
    Case("migrate-bad-partitions", MIGRATE, lambda w: {"OUTBOX_PARTITIONS": "many"}, ("OUTBOX_PARTITIONS",)),
    # a database that is not there, or refuses the password (not configuration errors: no variable)
    Case("run-unreachable-database", RUN, lambda w: {}, ("OUTBOX_STARTUP_TIMEOUT",), 1),
    Case("run-unreachable-database-password-in-query", RUN,
         lambda w: {"OUTBOX_DATABASE_URL": f"postgresql://app@127.0.0.1:{w.closed_port}/app?password={DB_PASSWORD}"},
         ("OUTBOX_STARTUP_TIMEOUT",), 1),
    Case("migrate-unreachable-database", MIGRATE, lambda w: {}, ("Connection refused",), 1),
    Case("control-unreachable-database", CONTROL, lambda w: {}, ("ConnectionRefusedError",), 1),
    *(Case(f"{cmd[0]}-wrong-password", cmd,
           lambda w: {"OUTBOX_DATABASE_URL": f"postgresql://app:{DB_PASSWORD}@127.0.0.1:{w.rejecting_port}/app"},
           ("password authentication failed",))
      for cmd in (RUN, CONTROL, MIGRATE)),
]

CTL_CASES = [
    Case("outboxctl-cli-token-and-token-file", ["status"], lambda w: {"OUTBOX_CONTROL_TOKEN": None}, ("token",), 2,
         args=lambda w: ["--token", CLI_TOKEN, "--token-file", str(w.token_file)]),
    Case("outboxctl-missing-token-file", ["status"],
         lambda w: {"OUTBOX_CONTROL_TOKEN": None, "OUTBOX_CONTROL_TOKEN_FILE": str(w.tmp / "missing")},
         ("token_file",), 2),
    Case("outboxctl-token-with-spaces", ["status"], lambda w: {"OUTBOX_CONTROL_TOKEN": f"{CLI_TOKEN} {ADMIN_TOKEN}"},
         ("token",), 2),
    Case("outboxctl-token-and-token-file-variables", ["status"],
         lambda w: {"OUTBOX_CONTROL_TOKEN_FILE": str(w.token_file)}, ("OUTBOX_CONTROL_TOKEN_FILE",), 2),
    Case("outboxctl-bad-timeout", ["status"], lambda w: {"OUTBOX_CONTROL_TIMEOUT": "soon"}, ("timeout",), 2),
    Case("outboxctl-client-cert-without-key", ["status"],
         lambda w: {"OUTBOX_CONTROL_CLIENT_CERT": str(w.token_file)}, ("CLIENT_KEY",), 2),
    Case("outboxctl-unreachable", ["status"], lambda w: {}, (), 3),
    Case("outboxctl-unreachable-cli-token", ["locks"], lambda w: {"OUTBOX_CONTROL_TOKEN": None}, (), 3,
         args=lambda w: ["--token", CLI_TOKEN]),
]


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _url(port: int) -> bytes:
    return f"postgresql://app:{DB_PASSWORD}@127.0.0.1:{port}/app\n".encode()


def _secrets_dir(world: World) -> str:
    """A secrets directory (one file per variable) whose database URL's password the server rejects."""
    directory = world.tmp / "secrets"
    directory.mkdir(exist_ok=True)
    _write(directory / "OUTBOX_DATABASE_URL", _url(world.rejecting_port))
    return str(directory)


@pytest.fixture
def world(tmp_path: Path, rejecting_postgres: PasswordRejectingPostgres) -> World:
    return World(tmp_path, _closed_port(), rejecting_postgres.port)


def _environment(world: World, case: Case) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("OUTBOX_", "PG"))}
    env.update(base_env(world))
    for name, value in case.env(world).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    env.update(PYTHONUNBUFFERED="1", COLUMNS="200")
    return env


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL, check=False
    )


def _check(case: Case, result: subprocess.CompletedProcess[str]) -> str:
    output = result.stdout + result.stderr
    context = f"{case.id} ({' '.join(result.args)}), exit {result.returncode}"
    assert_no_secret(output, context)
    assert result.returncode != 0, f"{context}: should have failed:\n{output[-3000:]}"
    if case.code is not None:
        assert result.returncode == case.code, f"{context}: expected exit {case.code}:\n{output[-3000:]}"
    for expected in case.expect:
        assert expected in output, f"{context}: {expected!r} not named:\n{output[-3000:]}"
    assert "Traceback" not in output and "input_value" not in output, f"{context}:\n{output[-3000:]}"
    return output


@pytest.mark.parametrize("case", RELAY_CASES, ids=lambda c: c.id)
def test_outbox_relay_prints_no_secret(case: Case, world: World) -> None:
    output = _check(case, _run([OUTBOX_RELAY, *case.command, *case.args(world)], _environment(world, case)))
    if case.code == 2:  # configuration errors: one line per problem, each naming its variable
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert errors, output
        assert all("OUTBOX_" in line for line in errors), output


def test_the_wrong_password_case_really_sends_the_password(
    world: World, rejecting_postgres: PasswordRejectingPostgres
) -> None:
    """Guards the wrong-password cases: the password did reach the server, and still not the output."""
    case = next(c for c in RELAY_CASES if c.id == "migrate-wrong-password")
    _check(case, _run([OUTBOX_RELAY, *case.command], _environment(world, case)))
    assert DB_PASSWORD.encode() in rejecting_postgres.received


@pytest.mark.parametrize("case", CTL_CASES, ids=lambda c: c.id)
def test_outboxctl_prints_no_secret(case: Case, world: World) -> None:
    output = _check(case, _run([OUTBOXCTL, *case.args(world), *case.command], _environment(world, case)))
    assert len(output.strip().splitlines()) == 1, output


# --- outboxctl against a running control plane ------------------------------------------------------


@dataclass
class ControlProcess:
    addr: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def control(stack: StackEndpoints, schema: str, tmp_path: Path) -> Iterator[ControlProcess]:
    """`outbox-relay control` with the secret tokens (the read one from a file), its log checked at the end."""
    log_path = tmp_path / "control.log"
    token_file = tmp_path / "read-token"
    token_file.write_text(FILE_TOKEN + "\n")
    env = {name: value for name, value in os.environ.items() if not name.startswith("OUTBOX_")}
    for _ in range(3):
        addr = f"127.0.0.1:{_closed_port()}"
        env.update(
            OUTBOX_DATABASE_URL=stack.database_url, OUTBOX_SCHEMA=schema, OUTBOX_CONTROL_ADDR=addr,
            OUTBOX_CONTROL_ADMIN_TOKEN=ADMIN_TOKEN, OUTBOX_CONTROL_READ_TOKEN_FILE=str(token_file),
            OUTBOX_CONTROL_SHUTDOWN_GRACE="0", OUTBOX_LOG_LEVEL="DEBUG", PYTHONUNBUFFERED="1",
        )
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [OUTBOX_RELAY, "control"], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        running = ControlProcess(addr, process, log_path)
        deadline = time.monotonic() + 30
        with ControlClient(addr, token=FILE_TOKEN, timeout=1, retries=0) as probe:
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    probe.locks()
                    break
                except ControlError:
                    time.sleep(0.1)
        if process.poll() is None and time.monotonic() < deadline:
            try:
                yield running
            finally:
                assert_no_secret(running.stop(), "outbox-relay control")
            return
        running.stop()
    raise AssertionError(f"outbox-relay control did not start:\n{log_path.read_text(errors='replace')[-3000:]}")


def test_outboxctl_against_a_running_control_plane_prints_no_secret(control: ControlProcess, tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("OUTBOX_")}
    env.update(OUTBOX_CONTROL_ADDR=control.addr, OUTBOX_CONTROL_TIMEOUT="5", OUTBOX_CONTROL_OPERATOR="ops")
    token_file = tmp_path / "wrong-token"
    token_file.write_text(f"x{FILE_TOKEN}\n")
    cases = [
        # (what, arguments, env, exit code)
        ("wrong token", ["status"], {"OUTBOX_CONTROL_TOKEN": f"{ADMIN_TOKEN}x"}, 4),
        ("wrong token on the command line", ["--token", CLI_TOKEN, "locks"], {}, 4),
        ("wrong token from a file", ["--token-file", str(token_file), "pauses"], {}, 4),
        ("no token", ["status"], {}, 4),
        ("read token on a mutating command", ["pause", "--reason", "test"], {"OUTBOX_CONTROL_TOKEN": FILE_TOKEN}, 5),
        ("admin token, unknown dead letter", ["dead-letters", "show", "999999"], {"OUTBOX_CONTROL_TOKEN": ADMIN_TOKEN}, 6),
    ]
    for what, args, extra, code in cases:
        result = _run([OUTBOXCTL, *args], {**env, **extra})
        output = result.stdout + result.stderr
        assert_no_secret(output, f"outboxctl, {what}")
        assert f"x{FILE_TOKEN}" not in output and f"{ADMIN_TOKEN}x" not in output, output
        assert result.returncode == code, f"{what}: exit {result.returncode}\n{output}"
        assert len(output.strip().splitlines()) == 1, output
    # and the working tokens still work, with nothing of them in the output
    result = _run([OUTBOXCTL, "status"], {**env, "OUTBOX_CONTROL_TOKEN": FILE_TOKEN})
    assert result.returncode == 0, result.stderr
    assert_no_secret(result.stdout + result.stderr, "outboxctl status")
