"""The consumer's `process` span: the child of the context the message carries (`traceparent`, put
there by the relay's publish span, itself linked to the writer's), so one trace runs from the writer
to the handler. Attributes follow the OpenTelemetry messaging semantic conventions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind

from clients.inbox import InboxMessage

tracer = trace.get_tracer("outbox_relay.consumer")


def span_attributes(
    message: InboxMessage, system: str, group: str, partition: int | None = None, offset: int | None = None
) -> dict[str, str | int]:
    attributes: dict[str, str | int] = {
        "messaging.system": system,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": message.topic,
        "messaging.message.id": message.message_id,
        "messaging.consumer.group.name": group,
        "outbox.source": message.source,
    }
    if partition is not None:
        attributes["messaging.destination.partition.id"] = str(partition)
    if offset is not None:
        attributes["messaging.kafka.offset"] = offset
    if message.key is not None:
        if system == "kafka":
            attributes["messaging.kafka.message.key"] = message.key
        else:
            attributes["outbox.key"] = message.key
    return attributes


@contextmanager
def process_span(message: InboxMessage, attributes: dict[str, str | int]) -> Iterator[Span]:
    """A CONSUMER span `process <topic>`, current while the handler runs (so its own spans nest)."""
    parent = propagate.extract(dict(message.headers))
    with tracer.start_as_current_span(
        f"process {message.topic}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
    ) as span:
        yield span
