"""The consumers' pure logic (issue 14): decoding deliveries into inbox messages, subscriptions and
shard names, handler loading, stream ownership shares, and what the processing loop does with each
inbox outcome (with a fake inbox: no database here; the integration tests use the real one)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import SecretStr, ValidationError

from clients.consumers import ConsumerSettings, HandlerError, InvalidMessageError, load_handler
from clients.consumers import tracing as consumer_tracing
from clients.consumers.messages import (
    kafka_message,
    kafka_subscription,
    logical_topic,
    redis_message,
    shard_streams,
)
from clients.consumers.metrics import ConsumerMetrics
from clients.consumers.ownership import fair_share, preference
from clients.consumers.processing import Processor, RetryDelay
from clients.consumers.tracing import span_attributes
from clients.inbox import InboxMessage, InboxOutcome, InboxResult

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


def test_a_kafka_record_becomes_an_inbox_message() -> None:
    headers = [("traceparent", TRACEPARENT.encode()), ("message-id", b"m-1"), ("tenant", b"acme")]
    message = kafka_message("orders", 3, 1234, b"k1", b'{"n":1}', headers)
    assert (message.message_id, message.topic, message.key, message.payload) == ("m-1", "orders", "k1", b'{"n":1}')
    assert dict(message.headers) == {"traceparent": TRACEPARENT, "tenant": "acme"}
    assert message.source == "kafka:orders[3]@1234"


@pytest.mark.parametrize("headers", [[], [("message-id", b"")], [("message-id", b"  ")], [("other", b"x")]])
def test_a_kafka_record_without_message_id_is_invalid_with_where_it_came_from(
    headers: list[tuple[str, bytes]],
) -> None:
    with pytest.raises(InvalidMessageError) as caught:
        kafka_message("orders", 0, 7, None, b"", headers)
    assert caught.value.reason == "missing_message_id"
    assert "kafka:orders[0]@7 has no 'message-id' header" in str(caught.value)


def test_a_relay_stream_entry_becomes_an_inbox_message_of_its_topic() -> None:
    fields = {
        b"message-id": b"m-2", b"payload": b"\x00\x01", b"key": b"k9",
        b"headers": b'{"traceparent":"x","n":3}', b"traceparent": TRACEPARENT.encode(),
    }
    message = redis_message("orders:2", b"1700000000000-0", fields)
    assert (message.message_id, message.topic, message.key, message.payload) == ("m-2", "orders", "k9", b"\x00\x01")
    assert dict(message.headers) == {"traceparent": TRACEPARENT, "n": "3"}
    assert message.source == "redis:orders:2/1700000000000-0"
    with pytest.raises(InvalidMessageError, match="redis:orders:2/1-0 has no 'message-id' field"):
        redis_message("orders:2", b"1-0", {b"payload": b"x"})


def test_stream_names_and_subscriptions() -> None:
    assert shard_streams(["orders", "mail"], 3) == ["orders:0", "orders:1", "orders:2", "mail:0", "mail:1", "mail:2"]
    assert shard_streams(["orders"], 0) == ["orders"]
    assert logical_topic("orders:12") == "orders" and logical_topic("a:b") == "a:b" and logical_topic("x") == "x"
    assert kafka_subscription("orders, payments") == (["orders", "payments"], None)
    topics, pattern = kafka_subscription("orders.*")
    import re

    assert topics == [] and pattern is not None
    matches = [name for name in ("orders.eu", "orders.", "ordersx", "x.orders.eu") if re.match(pattern, name)]
    assert matches == ["orders.eu", "orders."]
    with pytest.raises(ValueError, match="--kafka needs a topic"):
        kafka_subscription(" , ")


def test_handlers_load_from_module_function_or_fail_in_one_line() -> None:
    from tests import consumer_handlers

    assert load_handler("tests.consumer_handlers:record") is consumer_handlers.record
    for spec, expected in [
        ("tests.nope:x", "cannot import handler module 'tests.nope': ModuleNotFoundError"),
        ("tests.consumer_handlers:nope", "has no attribute 'nope'"),
        ("tests.consumer_handlers:not_callable", "is a int, not a callable"),
        (":x", "must be module:function"),
    ]:
        with pytest.raises(HandlerError) as caught:
            load_handler(spec)
        assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_members_aim_at_a_fair_share_and_start_from_different_streams() -> None:
    assert [fair_share(4, n) for n in (0, 1, 2, 3, 4, 5)] == [4, 4, 2, 2, 1, 1]
    streams = [f"s:{n}" for n in range(8)]
    orders = {tuple(preference(streams, f"member-{n}")) for n in range(6)}
    assert all(sorted(order) == streams for order in orders) and len({o[0] for o in orders}) > 1


def test_retry_delays_grow_with_jitter_up_to_the_maximum() -> None:
    delays = RetryDelay(0.1, 2.0)
    assert 0.05 <= delays.delay(1) <= 0.1
    assert all(1.0 <= delays.delay(n) <= 2.0 for n in (6, 50, 10_000))


def test_settings_come_from_the_environment_and_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_CONSUMER_CONCURRENCY", "3")
    monkeypatch.setenv("OUTBOX_REDIS_MAX_DELIVERIES", "4")
    settings = ConsumerSettings()
    assert (settings.consumer_concurrency, settings.redis_max_deliveries) == (3, 4)
    monkeypatch.setenv("OUTBOX_CONSUMER_BACKOFF_MAX", "0.01")
    with pytest.raises(ValidationError, match="BACKOFF_MAX must be at least"):
        ConsumerSettings()


# --- the processing loop, with a fake inbox ------------------------------------------------------


class FakeInbox:
    def __init__(self, *answers: InboxResult | BaseException) -> None:
        self.answers = list(answers)
        self.calls = 0
        self.worker_id = "w"

    async def process(self, conn: Any, message: InboxMessage, handler: Any) -> InboxResult:
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


class FakePool:
    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[object]:
        yield object()


def processor(inbox: FakeInbox) -> Processor:
    settings = ConsumerSettings(database_url=SecretStr("postgresql://x@h/db"), consumer_backoff_initial=0.001,
                                consumer_backoff_max=0.002)
    worker = Processor(settings, inbox, lambda conn, message: None, ConsumerMetrics("g", "test"), "test")  # type: ignore[arg-type]
    worker.pool = FakePool()
    return worker


MESSAGE = InboxMessage("m-1", "orders", "k", b"{}", {"traceparent": TRACEPARENT}, "test:orders/1")


def result(outcome: InboxOutcome, **kw: Any) -> InboxResult:
    return InboxResult(outcome, 1, **kw)


@pytest.mark.parametrize("final", [InboxOutcome.PROCESSED, InboxOutcome.DUPLICATE, InboxOutcome.GAVE_UP])
async def test_locked_failed_and_outages_are_retried_in_place_until_settled(
    final: InboxOutcome, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = FakeInbox(
        result(InboxOutcome.LOCKED, holder="pod-a"),
        result(InboxOutcome.FAILED, error="ValueError: boom"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection lost"),
        OSError("refused"),
        result(final),
    )
    with caplog.at_level(logging.INFO, logger="clients.consumers"):
        settled = await processor(inbox).settle(MESSAGE, asyncio.Event(), {})
    assert settled is not None and settled.outcome is final and inbox.calls == 5
    text = caplog.text
    assert "locked by another worker (pod-a)" in text and "handler failed on test:orders/1" in text
    assert "database unavailable while processing test:orders/1" in text


async def test_an_unexpected_error_is_logged_loudly_and_retried_not_skipped(caplog: pytest.LogCaptureFixture) -> None:
    inbox = FakeInbox(RuntimeError("bug"), result(InboxOutcome.PROCESSED))
    with caplog.at_level(logging.ERROR, logger="clients.consumers"):
        settled = await processor(inbox).settle(MESSAGE, asyncio.Event(), {})
    assert settled is not None and settled.outcome is InboxOutcome.PROCESSED
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


async def test_letting_go_during_a_retry_returns_none_so_nothing_is_committed() -> None:
    abandon = asyncio.Event()
    inbox = FakeInbox(result(InboxOutcome.LOCKED), result(InboxOutcome.PROCESSED))
    worker = processor(inbox)
    worker.delays = RetryDelay(30.0, 30.0)
    task = asyncio.create_task(worker.settle(MESSAGE, abandon, {}))
    await asyncio.sleep(0.05)
    abandon.set()
    assert await asyncio.wait_for(task, 5) is None and inbox.calls == 1


async def test_the_process_span_continues_the_writers_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(consumer_tracing, "tracer", provider.get_tracer("test"))
    inbox = FakeInbox(result(InboxOutcome.FAILED, error="boom"), result(InboxOutcome.PROCESSED))
    message = InboxMessage("m-1", "orders", "k", b"{}", {"traceparent": TRACEPARENT}, "kafka:orders[3]@5")
    attributes = span_attributes(message, "kafka", "billing", 3, 5)
    await processor(inbox).settle(message, asyncio.Event(), attributes)
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["process orders", "process orders"]
    span = spans[-1]
    assert span.kind is SpanKind.CONSUMER and span.parent is not None
    assert f"{span.context.trace_id:032x}" == TRACE_ID and f"{span.parent.span_id:016x}" == "b7ad6b7169203331"
    assert span.attributes is not None and {
        key: span.attributes[key] for key in ("messaging.system", "messaging.operation.type",
                                               "messaging.destination.name", "messaging.message.id",
                                               "messaging.consumer.group.name",
                                               "messaging.destination.partition.id", "messaging.kafka.offset")
    } == {"messaging.system": "kafka", "messaging.operation.type": "process", "messaging.destination.name": "orders",
          "messaging.message.id": "m-1", "messaging.consumer.group.name": "billing",
          "messaging.destination.partition.id": "3", "messaging.kafka.offset": 5}
    assert span.attributes["outbox.inbox.outcome"] == "processed"
    assert not spans[0].status.is_ok  # the failed attempt
    assert trace.get_tracer_provider() is not provider
