"""A sink whose connection fails for a reason that is not the network (credentials refused, a TLS
handshake with a broker that does not speak TLS, a SASL mechanism the broker does not offer) says so
against the real brokers: the kind and the broker's answer, never "not connected yet" forever, and
never the password."""

from __future__ import annotations

import asyncio
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from devtools.embedded import StackEndpoints
from relay.config import RelaySettings
from relay.sinks.base import ConnectFailure
from relay.sinks.kafka import KafkaSink
from relay.sinks.redis import RedisSink
from tests.pki import Pki, make_pki

PASSWORD = "n0t-the-pw-" + uuid.uuid4().hex[:6]


def settings(stack: StackEndpoints, **overrides: object) -> RelaySettings:
    values: dict[str, object] = {
        "database_url": SecretStr(stack.database_url),
        "kafka_bootstrap": stack.kafka_bootstrap,
        "redis_url": SecretStr(stack.redis_url),
        "sink_backoff_max": 0.5,
    }
    return RelaySettings(**(values | overrides))  # type: ignore[arg-type]


async def wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def redis_host_port(stack: StackEndpoints) -> str:
    return stack.redis_url.split("://", 1)[1].rsplit("@", 1)[-1].split("/", 1)[0]


@pytest.fixture
async def redis_admin(stack: StackEndpoints) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(stack.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_redis_refusing_the_password_is_an_authentication_failure(
    stack: StackEndpoints, redis_admin: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    user = f"relay{uuid.uuid4().hex[:6]}"
    await redis_admin.execute_command("ACL", "SETUSER", user, "on", ">the-right-one", "~*", "+@all")
    sink = RedisSink(settings(stack, redis_url=SecretStr(f"redis://{user}:{PASSWORD}@{redis_host_port(stack)}/0")))
    try:
        with caplog.at_level(logging.WARNING):
            await sink.start()
            assert not sink.is_connected()
            assert sink.connection.failures[ConnectFailure.AUTHENTICATION] == 1
            assert sink.connection.failures[ConnectFailure.NETWORK] == 0
            error = sink.connection.error
            assert error is not None and error.startswith("authentication: "), error
            # Probing again (as an instance in an outage does) counts again, says the same.
            assert await sink.probe() is False
            assert sink.connection.failures[ConnectFailure.AUTHENTICATION] == 2
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert errors and "cannot connect to redis" in errors[0].getMessage()
        assert PASSWORD not in caplog.text and PASSWORD not in error
    finally:
        await sink.stop()
        await redis_admin.execute_command("ACL", "DELUSER", user)


async def test_an_unreachable_redis_is_only_a_network_failure(stack: StackEndpoints) -> None:
    sink = RedisSink(settings(stack, redis_url=SecretStr(f"redis://:{PASSWORD}@127.0.0.1:9/0")))
    try:
        await sink.start()
        assert not sink.is_connected()
        assert sink.connection.failures[ConnectFailure.NETWORK] == 1
        assert sink.connection.error is None, "not reachable yet is not a reason to call an operator"
    finally:
        await sink.stop()


async def test_a_reachable_redis_clears_the_failure(stack: StackEndpoints) -> None:
    sink = RedisSink(settings(stack))
    try:
        await sink.start()
        assert sink.is_connected() and sink.connection.error is None
        assert set(sink.connection.failures.values()) == {0}
    finally:
        await sink.stop()


async def kafka_failure(stack: StackEndpoints, **overrides: object) -> tuple[KafkaSink, str]:
    """A Kafka sink started with `overrides`, once its connection failed for a non-network reason."""
    sink = KafkaSink(settings(stack, **overrides))
    await sink.start()
    await wait_for(lambda: sink.connection.error is not None)
    assert not sink.is_connected()
    error = sink.connection.error
    assert error is not None
    return sink, error


@pytest.fixture
async def tls_listener(tmp_path: Path) -> AsyncIterator[tuple[str, Pki]]:
    """host:port of a TLS server whose certificate (for 127.0.0.1) is signed by the test CA."""
    pki = make_pki(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)

    async def close(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(close, "127.0.0.1", 0, ssl=context)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", pki
    finally:
        server.close()


async def test_kafka_brokers_certificate_that_does_not_verify_is_a_tls_failure(
    stack: StackEndpoints, tls_listener: tuple[str, Pki]
) -> None:
    address, pki = tls_listener
    # Trusting another CA than the one that signed the broker's certificate.
    sink, error = await kafka_failure(
        stack,
        kafka_bootstrap=address,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=str(pki.stranger_cert.with_name("other-ca.pem")),
    )
    try:
        assert error.startswith("tls: "), error
        assert "CERTIFICATE_VERIFY_FAILED" in error or "certificate verify failed" in error, error
        assert sink.connection.failures[ConnectFailure.TLS] >= 1
        assert "Unable to bootstrap" not in error, "the broker's own answer, not aiokafka's summary"
    finally:
        await sink.stop()


async def test_kafka_sasl_the_broker_does_not_offer_is_reported_not_retried_silently(
    stack: StackEndpoints, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        sink, error = await kafka_failure(
            stack,
            kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_mechanism="SCRAM-SHA-512",
            kafka_sasl_username="relay",
            kafka_sasl_password=SecretStr(PASSWORD),
        )
    try:
        # The embedded broker offers PLAIN only: it refuses the mechanism (a broker that offers it
        # and refuses the password says `authentication: SaslAuthenticationFailed...`).
        kind = error.split(":", 1)[0]
        assert kind == ConnectFailure.UNSUPPORTED, error
        assert "UnsupportedSaslMechanismError" in error
        assert sink.connection.failures[kind] >= 1
        assert any(r.levelno == logging.ERROR and "cannot connect to kafka" in r.getMessage() for r in caplog.records)
        assert PASSWORD not in caplog.text and PASSWORD not in error
        # It keeps trying (the broker's side may be fixed without a restart), and keeps saying why.
        first = sink.connection.failures[kind]
        await wait_for(lambda: sink.connection.failures[kind] > first)
        assert sink.connection.error is not None
    finally:
        await sink.stop()


def test_tls_errors_are_told_apart_also_when_wrapped() -> None:
    from relay.sinks.base import is_tls_error

    try:
        try:
            raise ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
        except ssl.SSLError as inner:
            raise ConnectionError("handshake failed") from inner
    except ConnectionError as outer:
        assert is_tls_error(outer)
    assert not is_tls_error(ConnectionRefusedError(111, "refused"))
