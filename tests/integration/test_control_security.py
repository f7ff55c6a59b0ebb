"""Control-plane security: bearer tokens and roles, open health and reflection, TLS and mTLS handshakes,
and the refusal to expose an unauthenticated server beyond loopback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from control._generated.outbox.control.v1 import control_pb2 as pb
from control._generated.outbox.control.v1 import control_pb2_grpc as pb_grpc
from control.server import ControlServer, ControlSettings, InsecureConfigurationError, is_loopback
from relay.schema_version import head_revision
from tests.conftest import settings_for
from tests.pki import Pki, make_pki

ADMIN_TOKEN = "admin-secret-3f9a1c0e5b7d"
READ_TOKEN = "read-secret-8e2b6d4a1f0c"
SERVICE = "outbox.control.v1.ControlService"
TIMEOUT = 10.0


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def start(database_url: str, schema: str, **settings: Any) -> ControlServer:
    settings.setdefault("addr", "127.0.0.1:0")
    server = ControlServer(ControlSettings(**settings), settings_for(database_url, schema))
    await server.start()
    return server


@pytest.fixture
async def server(database_url: str, schema: str) -> AsyncIterator[ControlServer]:
    server = await start(database_url, schema, admin_token=ADMIN_TOKEN, read_token=READ_TOKEN)
    try:
        yield server
    finally:
        await server.stop(0)


@pytest.fixture
async def stub(server: ControlServer) -> AsyncIterator[pb_grpc.ControlServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.ControlServiceStub(channel)


async def expect_code(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


# --- tokens and roles ----------------------------------------------------------------------------


async def test_missing_or_wrong_token_is_unauthenticated(stub: pb_grpc.ControlServiceStub) -> None:
    status = pb.GetStatusRequest()
    await expect_code(stub.GetStatus(status, timeout=TIMEOUT), grpc.StatusCode.UNAUTHENTICATED)
    await expect_code(stub.GetStatus(status, metadata=bearer("guess"), timeout=TIMEOUT),
                      grpc.StatusCode.UNAUTHENTICATED)
    await expect_code(stub.GetStatus(status, metadata=bearer(ADMIN_TOKEN[:-1]), timeout=TIMEOUT),
                      grpc.StatusCode.UNAUTHENTICATED)
    await expect_code(stub.GetStatus(status, metadata=(("authorization", f"Basic {ADMIN_TOKEN}"),),
                                     timeout=TIMEOUT), grpc.StatusCode.UNAUTHENTICATED)
    await expect_code(stub.Pause(pb.PauseRequest(all_topics=True), timeout=TIMEOUT), grpc.StatusCode.UNAUTHENTICATED)


async def test_read_token_reads_but_cannot_mutate(
    stub: pb_grpc.ControlServiceStub, pg: asyncpg.Connection, schema: str
) -> None:
    await stub.GetStatus(pb.GetStatusRequest(), metadata=bearer(READ_TOKEN), timeout=TIMEOUT)
    await stub.ListLocks(pb.ListLocksRequest(), metadata=bearer(READ_TOKEN), timeout=TIMEOUT)
    await stub.ListAudit(pb.ListAuditRequest(), metadata=bearer(READ_TOKEN), timeout=TIMEOUT)

    mutations = [
        stub.Pause(pb.PauseRequest(all_topics=True), metadata=bearer(READ_TOKEN), timeout=TIMEOUT),
        stub.Resume(pb.ResumeRequest(all_topics=True), metadata=bearer(READ_TOKEN), timeout=TIMEOUT),
        stub.ReleaseLock(pb.ReleaseLockRequest(name="leader", expected_token=1), metadata=bearer(READ_TOKEN),
                         timeout=TIMEOUT),
        stub.DeadLetterNow(pb.DeadLetterNowRequest(outbox_id=1, reason="r"), metadata=bearer(READ_TOKEN),
                           timeout=TIMEOUT),
        stub.ReplayDeadLetters(pb.ReplayDeadLettersRequest(request_id="r", ids=[1]), metadata=bearer(READ_TOKEN),
                               timeout=TIMEOUT),
        stub.PurgeDeadLetters(pb.PurgeDeadLettersRequest(ids=[1]), metadata=bearer(READ_TOKEN), timeout=TIMEOUT),
    ]
    for call in mutations:
        details = await expect_code(call, grpc.StatusCode.PERMISSION_DENIED)
        assert "admin token" in details
    assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".pauses') == 0
    assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".audit_log') == 0


async def test_admin_token_reads_and_mutates(
    stub: pb_grpc.ControlServiceStub, pg: asyncpg.Connection, schema: str
) -> None:
    await stub.GetStatus(pb.GetStatusRequest(), metadata=bearer(ADMIN_TOKEN), timeout=TIMEOUT)
    await stub.Pause(pb.PauseRequest(all_topics=True, operator="ops"), metadata=bearer(ADMIN_TOKEN), timeout=TIMEOUT)
    assert await pg.fetchval(f'SELECT actor FROM "{schema}".audit_log') == "admin:ops"
    reply = await stub.ListPauses(pb.ListPausesRequest(), metadata=bearer(READ_TOKEN), timeout=TIMEOUT)
    assert [p.paused_by for p in reply.pauses] == ["admin:ops"]


async def test_tokens_from_files(database_url: str, schema: str, tmp_path: Path) -> None:
    (tmp_path / "admin").write_text(ADMIN_TOKEN + "\n")
    (tmp_path / "read").write_text(READ_TOKEN + "\n")
    server = await start(database_url, schema, admin_token_file=tmp_path / "admin", read_token_file=tmp_path / "read")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ControlServiceStub(channel)
            await stub.ListLocks(pb.ListLocksRequest(), metadata=bearer(READ_TOKEN), timeout=TIMEOUT)
            await stub.Resume(pb.ResumeRequest(all_topics=True), metadata=bearer(ADMIN_TOKEN), timeout=TIMEOUT)
            await expect_code(stub.Resume(pb.ResumeRequest(all_topics=True), metadata=bearer(READ_TOKEN),
                                          timeout=TIMEOUT), grpc.StatusCode.PERMISSION_DENIED)
    finally:
        await server.stop(0)


def test_token_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OUTBOX_CONTROL_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("OUTBOX_CONTROL_READ_TOKEN_FILE", str(tmp_path / "read"))
    monkeypatch.setenv("OUTBOX_CONTROL_REPLAY_RATE", "100")
    (tmp_path / "read").write_text(READ_TOKEN)
    settings = ControlSettings()
    tokens = settings.tokens()
    assert (tokens.admin, tokens.read, settings.replay_rate) == (ADMIN_TOKEN.encode(), READ_TOKEN.encode(), 100)
    assert ADMIN_TOKEN not in repr(settings) and READ_TOKEN not in repr(tokens)

    monkeypatch.setenv("OUTBOX_CONTROL_READ_TOKEN", READ_TOKEN)
    with pytest.raises(ValueError, match="not both"):
        ControlSettings()
    monkeypatch.delenv("OUTBOX_CONTROL_READ_TOKEN_FILE")
    monkeypatch.setenv("OUTBOX_CONTROL_READ_TOKEN", ADMIN_TOKEN)
    with pytest.raises(ValueError, match="differ"):
        ControlSettings()
    monkeypatch.delenv("OUTBOX_CONTROL_READ_TOKEN")
    monkeypatch.setenv("OUTBOX_CONTROL_ADMIN_TOKEN_FILE", str(tmp_path / "missing"))
    monkeypatch.delenv("OUTBOX_CONTROL_ADMIN_TOKEN")
    with pytest.raises(ValueError, match="cannot read admin_token_file"):
        ControlSettings()


async def test_tokens_never_reach_the_log(
    database_url: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await start(database_url, schema, admin_token=ADMIN_TOKEN, read_token=READ_TOKEN)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ControlServiceStub(channel)
            await expect_code(stub.Pause(pb.PauseRequest(all_topics=True), metadata=bearer(READ_TOKEN),
                                         timeout=TIMEOUT), grpc.StatusCode.PERMISSION_DENIED)
            await expect_code(stub.GetStatus(pb.GetStatusRequest(), metadata=bearer("wrong-" + ADMIN_TOKEN),
                                             timeout=TIMEOUT), grpc.StatusCode.UNAUTHENTICATED)
    finally:
        await server.stop(0)
    assert "denied" in caplog.text
    assert ADMIN_TOKEN not in caplog.text and READ_TOKEN not in caplog.text


# --- open services ------------------------------------------------------------------------------


async def test_health_is_open(server: ControlServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_is_open(server: ControlServer) -> None:
    def describe() -> tuple[list[str], list[str]]:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = list(database.get_services())
            methods = DescriptorPool(database).FindServiceByName(SERVICE).methods
            return services, [m.name for m in methods]

    # The reflection client is synchronous; keep the event loop (and so the server) running.
    services, methods = await asyncio.to_thread(describe)
    assert SERVICE in services and "grpc.health.v1.Health" in services
    assert {"GetStatus", "ReplayDeadLetters", "ListAudit"} <= set(methods)


# --- TLS and mTLS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _secure_channel(port: int, pki: Pki, cert: Path | None = None, key: Path | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


async def _status(channel: grpc.aio.Channel) -> pb.GetStatusResponse:
    stub = pb_grpc.ControlServiceStub(channel)
    reply: pb.GetStatusResponse = await stub.GetStatus(
        pb.GetStatusRequest(), metadata=bearer(READ_TOKEN), timeout=TIMEOUT
    )
    return reply


async def test_tls(database_url: str, schema: str, pki: Pki) -> None:
    server = await start(database_url, schema, admin_token=ADMIN_TOKEN, read_token=READ_TOKEN,
                         tls_cert=pki.server_cert, tls_key=pki.server_key)
    try:
        async with _secure_channel(server.port, pki) as channel:
            assert (await _status(channel)).schema_version == head_revision()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as plain:
            await expect_code(_status(plain), grpc.StatusCode.UNAVAILABLE)
    finally:
        await server.stop(0)


async def test_mtls_requires_a_client_certificate_from_the_ca(database_url: str, schema: str, pki: Pki) -> None:
    server = await start(database_url, schema, admin_token=ADMIN_TOKEN, read_token=READ_TOKEN,
                         tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    try:
        async with _secure_channel(server.port, pki, pki.client_cert, pki.client_key) as channel:
            assert (await _status(channel)).schema_version == head_revision()
        async with _secure_channel(server.port, pki) as without_cert:
            await expect_code(_status(without_cert), grpc.StatusCode.UNAVAILABLE)
        async with _secure_channel(server.port, pki, pki.stranger_cert, pki.stranger_key) as stranger:
            await expect_code(_status(stranger), grpc.StatusCode.UNAVAILABLE)
    finally:
        await server.stop(0)


async def test_audit_records_the_client_certificate_beside_the_declared_operator(
    database_url: str, schema: str, pki: Pki
) -> None:
    server = await start(database_url, schema, admin_token=ADMIN_TOKEN, read_token=READ_TOKEN,
                         tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    try:
        async with _secure_channel(server.port, pki, pki.client_cert, pki.client_key) as channel:
            stub = pb_grpc.ControlServiceStub(channel)
            await stub.Pause(
                pb.PauseRequest(topic_pattern="orders", reason="r", operator="not-really-me"),
                metadata=bearer(ADMIN_TOKEN), timeout=TIMEOUT,
            )
            reply = await stub.ListAudit(pb.ListAuditRequest(), metadata=bearer(READ_TOKEN), timeout=TIMEOUT)
    finally:
        await server.stop(0)
    [entry] = reply.entries
    # The operator is declared by the caller; the certificate's CN ('operator', tests/pki.py) is verified.
    assert (entry.actor, entry.client_identity) == ("admin:not-really-me", "cn:operator")
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval(f'SELECT client_identity FROM "{schema}".audit_log') == "cn:operator"
    finally:
        await conn.close()


def test_tls_settings_must_be_complete(pki: Pki) -> None:
    with pytest.raises(ValueError, match="go together"):
        ControlSettings(tls_cert=pki.server_cert)
    with pytest.raises(ValueError, match="TLS_CLIENT_CA"):
        ControlSettings(tls_client_ca=pki.ca)


# --- exposure ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "loopback"),
    [
        ("127.0.0.1:50051", True), ("localhost:0", True), ("[::1]:50051", True), ("unix:/tmp/control.sock", True),
        ("0.0.0.0:50051", False), ("[::]:50051", False), ("10.1.2.3:50051", False), ("control.example:443", False),
    ],
)
def test_is_loopback(addr: str, loopback: bool) -> None:
    assert is_loopback(addr) is loopback


async def test_refuses_non_loopback_without_tokens(database_url: str, schema: str) -> None:
    with pytest.raises(InsecureConfigurationError, match="non-loopback"):
        await start(database_url, schema, addr="0.0.0.0:0")

    for allowed in ({"allow_insecure": True}, {"admin_token": ADMIN_TOKEN}):
        server = await start(database_url, schema, addr="0.0.0.0:0", **allowed)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                await pb_grpc.ControlServiceStub(channel).ListLocks(
                    pb.ListLocksRequest(), metadata=bearer(ADMIN_TOKEN), timeout=TIMEOUT
                )
        finally:
            await server.stop(0)


async def test_loopback_without_tokens_is_anonymous_admin(
    database_url: str, schema: str, pg: asyncpg.Connection
) -> None:
    server = await start(database_url, schema)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            await pb_grpc.ControlServiceStub(channel).Pause(pb.PauseRequest(all_topics=True), timeout=TIMEOUT)
    finally:
        await server.stop(0)
    assert await pg.fetchval(f'SELECT actor FROM "{schema}".audit_log') == "anonymous"
