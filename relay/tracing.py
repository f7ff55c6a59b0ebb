"""Spans for the relay path: one per claimed batch, one per published event. Each event's span is
linked to the writer's span (the `traceparent` stored with the row) and its own context travels on
in the Kafka headers / Redis fields, so a consumer's trace continues it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from relay.events import OutboxRow, PublishResult

tracer = trace.get_tracer("outbox_relay")


def tracing_enabled() -> bool:
    """Spans cost time per event; make them only when a real TracerProvider records them."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def start_publish_spans(rows: Sequence[OutboxRow], partition: int) -> tuple[list[OutboxRow], list[Span]]:
    traced_rows: list[OutboxRow] = []
    spans: list[Span] = []
    for row in rows:
        writer_context = trace.get_current_span(propagate.extract(row.headers)).get_span_context()
        span = tracer.start_span(
            f"publish {row.topic}",
            kind=SpanKind.PRODUCER,
            links=[Link(writer_context)] if writer_context.is_valid else None,
            attributes={
                "messaging.destination.name": row.topic,
                "messaging.message.id": str(row.message_id),
                "outbox.partition": partition,
                "outbox.attempt": row.attempts + 1,
            },
        )
        carrier = dict(row.headers)
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        traced_rows.append(dataclasses.replace(row, headers=carrier))
        spans.append(span)
    return traced_rows, spans


def end_publish_spans(spans: Sequence[Span], results: Sequence[PublishResult] | None) -> None:
    for index, span in enumerate(spans):
        result = results[index] if results is not None else None
        if result is not None and not result.ok:
            span.set_status(Status(StatusCode.ERROR, f"{result.outcome}: {result.reason}"))
        span.end()
