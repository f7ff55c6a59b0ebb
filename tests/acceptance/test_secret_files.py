"""Secrets from files (docs/security.md): `outbox-relay run` and `control` start and work with their
database URL, Redis URL and tokens given only as `<VAR>_FILE` files or in OUTBOX_SECRETS_DIR, and
the control plane accepts several admin and read tokens at once (rotation), telling them apart in
the audit log by position, never by value."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients.control import ControlClient, ControlError, PermissionDenied, Unauthenticated
from devtools.embedded import StackEndpoints
from devtools.fleet import Fleet, check_delivery, console_script, read_redis, wait_until, write_events

pytestmark = pytest.mark.slow

OLD_ADMIN = "old-admin-tok-3f9a0c71"
NEW_ADMIN = "new-admin-tok-8b2e5d46"
EXTRA_ADMIN = "extra-admin-tok-19c4a7e2"
READ_ONE = "read-one-tok-6e0b3f58"
READ_TWO = "read-two-tok-a4d7c912"
TOKENS = (OLD_ADMIN, NEW_ADMIN, EXTRA_ADMIN, READ_ONE, READ_TWO)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _secret(path: Path, value: str) -> str:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return str(path)


async def test_run_reads_its_urls_from_a_file_and_the_secrets_directory(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str], tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    _secret(secrets / "OUTBOX_REDIS_URL", stack.redis_url)
    relay = fleet.spawn(
        "relay-0",
        OUTBOX_DATABASE_URL="",  # empty: ignored, as if unset
        OUTBOX_DATABASE_URL_FILE=_secret(tmp_path / "database-url", fleet.database_url),
        OUTBOX_REDIS_URL="",
        OUTBOX_SECRETS_DIR=str(secrets),
    )
    stream = topics["redis"]
    written = await write_events(fleet.database_url, fleet.schema, [stream], total=50, keys=5)

    async def delivered() -> bool:
        fleet.check_alive()
        return len(await read_redis(stack.redis_url, stream)) >= 50

    await wait_until(delivered, 60, what="events published with the URLs from files")
    check_delivery(written, await read_redis(stack.redis_url, stream))
    assert relay.alive()


@pytest.fixture
def control_with_files(stack: StackEndpoints, schema: str, tmp_path: Path) -> Iterator[str]:
    """`outbox-relay control` whose database URL and tokens all come from files: two admin tokens in
    one file (old and new, during a rotation), one more admin token and the read tokens from variables."""
    log_path = tmp_path / "control.log"
    env = {name: value for name, value in os.environ.items() if not name.startswith("OUTBOX_")}
    addr = f"127.0.0.1:{_free_port()}"
    env.update(
        OUTBOX_DATABASE_URL_FILE=_secret(tmp_path / "database-url", stack.database_url),
        OUTBOX_SCHEMA=schema,
        OUTBOX_CONTROL_ADDR=addr,
        OUTBOX_CONTROL_ADMIN_TOKEN_FILE=_secret(tmp_path / "admin-tokens", f"{OLD_ADMIN}\n# rotated in:\n{NEW_ADMIN}"),
        OUTBOX_CONTROL_ADMIN_TOKENS=EXTRA_ADMIN,
        OUTBOX_CONTROL_READ_TOKENS=f"{READ_ONE},{READ_TWO}",
        OUTBOX_CONTROL_SHUTDOWN_GRACE="0",
        OUTBOX_LOG_LEVEL="DEBUG",
        PYTHONUNBUFFERED="1",
    )
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [console_script("outbox-relay"), "control"], env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 60
        with ControlClient(addr, token=READ_ONE, timeout=2, retries=0) as probe:
            while True:
                assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
                try:
                    probe.locks()
                    break
                except ControlError:
                    assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
                    time.sleep(0.2)
        yield addr
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
    output = log_path.read_text(errors="replace")
    leaked = [token for token in TOKENS if token in output]
    assert not leaked, f"tokens in the control plane's log: {output[-3000:]}"
    assert process.returncode == 0, output[-3000:]


def test_control_accepts_every_rotated_token_and_audits_which(control_with_files: str) -> None:
    addr = control_with_files
    for number, token in enumerate((OLD_ADMIN, NEW_ADMIN, EXTRA_ADMIN), start=1):
        with ControlClient(addr, token=token, operator="ops", timeout=5) as admin:
            admin.pause(f"rotation-{number}.*", reason="rotation test")
    for token in (READ_ONE, READ_TWO):
        with ControlClient(addr, token=token, operator="ops", timeout=5) as reader:
            reader.locks()
            with pytest.raises(PermissionDenied):
                reader.pause("nope.*", reason="a read token cannot")
    with ControlClient(addr, token="not-a-configured-token", timeout=5) as stranger, pytest.raises(Unauthenticated):
        stranger.locks()

    with ControlClient(addr, token=READ_TWO, timeout=5) as reader:
        entries = reader.audit(action="Pause").items
    identities = {e.arguments["topic_pattern"]: e.client_identity for e in entries}
    assert identities == {
        "rotation-1.*": "token:admin#1",
        "rotation-2.*": "token:admin#2",
        "rotation-3.*": "token:admin#3",
    }
    assert not any(token in repr(entries) for token in TOKENS)
