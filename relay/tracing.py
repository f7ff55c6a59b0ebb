"""Spans for the relay path, after the OpenTelemetry messaging semantic conventions: one `outbox
batch` span per claimed batch and, inside it, one PRODUCER span `send <destination>` per event. Each
event's span is linked to the writer's span (the `traceparent` stored with the row) and its own
context travels on in the Kafka headers / Redis fields, so a consumer's trace continues it.

Tracing is configured by the SDK's standard environment (`configure_tracing`): OTEL_SDK_DISABLED,
OTEL_TRACES_EXPORTER (otlp, console, none), OTEL_EXPORTER_OTLP_PROTOCOL / _TRACES_PROTOCOL (grpc,
http/protobuf), OTEL_SERVICE_NAME (default outbox-relay), OTEL_RESOURCE_ATTRIBUTES, the OTLP
endpoint variables and the sampler variables. Without any of them, no span is made at all."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from relay.events import OutboxRow, PublishResult
from relay.shared.version import __version__

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)
tracer = trace.get_tracer("outbox_relay", __version__)

DEFAULT_SERVICE_NAME = "outbox-relay"
EXPORTERS = ("otlp", "console", "none")
OTLP_PROTOCOLS = {
    "grpc": (
        "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
        "opentelemetry-exporter-otlp-proto-grpc",
    ),
    "http/protobuf": (
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "opentelemetry-exporter-otlp-proto-http",
    ),
}
# The messaging.operation.name of each sink's send: Kafka's produce, Redis's XADD.
OPERATION_NAMES = {"kafka": "send", "redis": "xadd"}


class TracingConfigError(ValueError):
    """An OTEL_* variable asks for something the relay cannot do; the message names it."""


class Destinations(Protocol):
    """Where an event goes (relay.sinks.router.Router): sink kind, destination name, partition."""

    def destination(self, row: OutboxRow) -> tuple[str, str, int | None]: ...


# --- configuration from the environment -----------------------------------------------------------


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def wanted_exporters(environ: Mapping[str, str]) -> list[str]:
    """The span exporters OTEL_TRACES_EXPORTER names. Unlike the SDK's default (otlp), none when it is
    unset, unless an OTLP endpoint is set: spans cost time per event, so they are asked for."""
    raw = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not raw:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    names = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in EXPORTERS]
    if unknown:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} is not one of {', '.join(EXPORTERS)}"
        )
    return [name for name in names if name != "none"]


def _otlp_exporter(environ: Mapping[str, str]) -> SpanExporter:
    variable = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
    protocol = environ.get(variable, "").strip().lower()
    if not protocol:
        variable = "OTEL_EXPORTER_OTLP_PROTOCOL"
        protocol = environ.get(variable, "").strip().lower() or "grpc"
    if protocol not in OTLP_PROTOCOLS:
        raise TracingConfigError(
            f"{variable}: {protocol} is not one of {', '.join(OTLP_PROTOCOLS)} (http/json is not supported)"
        )
    module_name, package = OTLP_PROTOCOLS[protocol]
    try:
        module = __import__(module_name, fromlist=["OTLPSpanExporter"])
    except ImportError:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER=otlp with protocol {protocol} needs the package {package}"
            f" (pip install {package}, or pip install 'outbox-relay[otlp]')"
        ) from None
    exporter: SpanExporter = module.OTLPSpanExporter()
    return exporter


def tracer_provider_from_env(environ: Mapping[str, str] | None = None) -> TracerProvider | None:
    """A TracerProvider as the OTEL_* variables say, or None when they ask for no tracing. Raises
    TracingConfigError for a value it cannot honour (an unknown exporter or protocol, a missing
    exporter package)."""
    environ = os.environ if environ is None else environ
    if _flag(environ.get("OTEL_SDK_DISABLED")):
        return None
    exporters = wanted_exporters(environ)
    if not exporters:
        return None
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    # The SDK reads its variables (endpoints, headers, OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME,
    # the sampler) from os.environ; the defaults below count only where they name nothing.
    with _environment(environ):
        processors = [
            BatchSpanProcessor(_otlp_exporter(environ) if name == "otlp" else ConsoleSpanExporter(out=sys.stdout))
            for name in exporters
        ]
        detected = OTELResourceDetector().detect()
        defaults = {"service.name": DEFAULT_SERVICE_NAME, "service.version": __version__}
        resource = Resource.create(
            {key: value for key, value in defaults.items() if key not in detected.attributes}
        ).merge(detected)
        provider = TracerProvider(resource=resource)
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


@contextmanager
def _environment(environ: Mapping[str, str]) -> Iterator[None]:
    """os.environ as `environ` says for the OTEL_* variables, for the SDK parts that read it."""
    if environ is os.environ:
        yield
        return
    saved = {key: value for key, value in os.environ.items() if key.startswith("OTEL_")}
    try:
        for key in saved:
            del os.environ[key]
        os.environ.update({key: value for key, value in environ.items() if key.startswith("OTEL_")})
        yield
    finally:
        for key in [key for key in os.environ if key.startswith("OTEL_")]:
            del os.environ[key]
        os.environ.update(saved)


_configured: TracerProvider | None = None


def configure_tracing() -> bool:
    """Installs the TracerProvider the environment asks for (once per process). True when spans are
    recorded; raises TracingConfigError for a value it cannot honour."""
    global _configured
    if _configured is not None:
        return True
    provider = tracer_provider_from_env()
    if provider is None:
        return False
    trace.set_tracer_provider(provider)
    _configured = provider
    resource = provider.resource.attributes
    log.info(
        "tracing to %s as service %s",
        os.environ.get("OTEL_TRACES_EXPORTER") or "otlp",
        resource.get("service.name"),
    )
    return True


def tracing_enabled() -> bool:
    """Spans cost time per event; make them only when a real TracerProvider records them."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)


# --- spans ------------------------------------------------------------------------------------------


@contextmanager
def batch_span(partition: int, count: int) -> Iterator[Span]:
    """The span around one claimed batch's publishing (the events' spans sit inside it)."""
    with tracer.start_as_current_span(
        "outbox batch",
        kind=SpanKind.INTERNAL,
        attributes={"outbox.partition": partition, "messaging.batch.message_count": count},
    ) as span:
        yield span


def start_publish_spans(
    rows: Sequence[OutboxRow], partition: int, destinations: Destinations
) -> tuple[list[OutboxRow], list[Span]]:
    traced_rows: list[OutboxRow] = []
    spans: list[Span] = []
    for row in rows:
        writer_context = trace.get_current_span(propagate.extract(row.headers)).get_span_context()
        system, destination, _ = destinations.destination(row)
        attributes: dict[str, Any] = {
            "messaging.system": system,
            "messaging.operation.type": "send",
            "messaging.operation.name": OPERATION_NAMES.get(system, "send"),
            "messaging.destination.name": destination,
            "messaging.message.id": str(row.message_id),
            "outbox.partition": partition,
            "outbox.attempt": row.attempts + 1,
        }
        if system == "kafka" and row.key is not None:
            attributes["messaging.kafka.message.key"] = row.key
        span = tracer.start_span(
            f"send {destination}",
            kind=SpanKind.PRODUCER,
            links=[Link(writer_context)] if writer_context.is_valid else None,
            attributes=attributes,
        )
        carrier = dict(row.headers)
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        traced_rows.append(dataclasses.replace(row, headers=carrier))
        spans.append(span)
    return traced_rows, spans


def end_publish_spans(
    spans: Sequence[Span],
    results: Sequence[PublishResult] | None,
    rows: Sequence[OutboxRow] = (),
    destinations: Destinations | None = None,
) -> None:
    """Ends the events' spans: the partition the broker took each event to (known once sent), and an
    error status for those not published."""
    for index, span in enumerate(spans):
        result = results[index] if results is not None else None
        if destinations is not None and index < len(rows) and result is not None and result.ok:
            _, _, destination_partition = destinations.destination(rows[index])
            if destination_partition is not None:
                span.set_attribute("messaging.destination.partition.id", str(destination_partition))
        if result is not None and not result.ok:
            span.set_attribute("error.type", result.reason)
            span.set_status(Status(StatusCode.ERROR, f"{result.outcome}: {result.reason}"))
        span.end()
