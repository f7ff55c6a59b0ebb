"""Metrics and traces (OpenTelemetry). Metrics are exported for Prometheus on OUTBOX_METRICS_ADDR;
traces go wherever the standard OTEL_* variables say, and nowhere by default."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation

from relay.events import OutboxRow
from relay.faults import db_error_kind

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from relay.sinks.router import Router

log = logging.getLogger(__name__)
METER_NAME = "outbox_relay"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def prometheus_meter_provider(registry: CollectorRegistry) -> metrics.MeterProvider:
    """A MeterProvider of our own (not the global one) whose metrics `registry` serves."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import Histogram, MeterProvider
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

    reader = PrometheusMetricReader(registry=registry, disable_target_info=True, scope_info_enabled=False)
    # Second-valued histograms need second-sized buckets (the SDK default tops out at 10000).
    seconds_views = [
        View(
            instrument_type=Histogram,
            instrument_name=name,
            aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS),
        )
        for name in ("outbox_commit_to_ack_latency", "outbox_claim_duration", "outbox_settle_duration")
    ]
    return MeterProvider(metric_readers=[reader], views=seconds_views)


_tracing_configured = False


def configure_tracing() -> bool:
    """Installs an OTLP exporter (once per process) when the standard OpenTelemetry variables ask
    for one."""
    global _tracing_configured
    if _tracing_configured:
        return True
    wanted = os.environ.get("OTEL_TRACES_EXPORTER", "").lower()
    if wanted in ("", "none") and not os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return False
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "OTEL_TRACES_EXPORTER is set but opentelemetry-exporter-otlp is not installed; tracing off"
        )
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": "outbox-relay"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _tracing_configured = True
    return True


GaugeSource = Callable[[], Iterable[tuple[float, dict[str, str]]]]


class RelayMetrics:
    def __init__(self, instance_id: str, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter(METER_NAME)
        self._meter = meter
        self._instance = {"instance": instance_id}
        self.published_total = meter.create_counter(
            "outbox_events_published", unit="{event}", description="Events acknowledged by a sink"
        )
        self.publish_failures = meter.create_counter(
            "outbox_publish_failures", unit="{event}", description="Failed publish attempts by kind"
        )
        self.retries = meter.create_counter(
            "outbox_retries", unit="{event}", description="Events scheduled for another attempt"
        )
        self.dead_letters = meter.create_counter(
            "outbox_events_dead_lettered",
            unit="{event}",
            description="Events moved to the dead-letter archive",
        )
        self.lease_events = meter.create_counter(
            "outbox_lease_changes",
            unit="{lease}",
            description="Lease acquisitions, losses and failed acquisitions",
        )
        self.task_restarts = meter.create_counter(
            "outbox_task_restarts",
            unit="{restart}",
            description="Restarts of a relay task after an unexpected error (see the log's traceback)",
        )
        self.database_errors = meter.create_counter(
            "outbox_database_errors",
            unit="{error}",
            description="Transient database errors met and retried, by kind",
        )
        self.latency = meter.create_histogram(
            "outbox_commit_to_ack_latency",
            unit="s",
            description="From the writing transaction to the broker's acknowledgement",
        )
        self.batch_size = meter.create_histogram(
            "outbox_batch_size", unit="{event}", description="Rows per claim"
        )
        self.claim_duration = meter.create_histogram(
            "outbox_claim_duration", unit="s", description="Claim time"
        )
        self.settle_duration = meter.create_histogram(
            "outbox_settle_duration", unit="s", description="Settle time"
        )

    def gauge(self, name: str, unit: str, description: str, source: GaugeSource) -> None:
        """An observable gauge read at scrape time from `source` (value, labels) pairs."""

        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, labels) for value, labels in source()]

        self._meter.create_observable_gauge(name, callbacks=[observe], unit=unit, description=description)

    def claimed(self, count: int, seconds: float) -> None:
        self.batch_size.record(count, self._instance)
        self.claim_duration.record(seconds, self._instance)

    def published(self, rows: Sequence[OutboxRow], settle_seconds: float, router: Router) -> None:
        if not rows:
            return
        self.settle_duration.record(settle_seconds, self._instance)
        now = datetime.now(UTC)
        counts: dict[tuple[str, str], int] = {}
        for row in rows:
            sink = router.sink_kind_for(row.topic).value
            counts[(row.topic, sink)] = counts.get((row.topic, sink), 0) + 1
            self.latency.record((now - row.created_at).total_seconds(), {"topic": row.topic, "sink": sink})
        for (topic, sink), count in counts.items():
            self.published_total.add(count, {"topic": topic, "sink": sink, **self._instance})

    def publish_failed(self, kind: str, count: int = 1) -> None:
        self.publish_failures.add(count, {"kind": kind, **self._instance})

    def retried(self, rows: Sequence[OutboxRow]) -> None:
        for row in rows:
            self.retries.add(1, {"topic": row.topic, **self._instance})

    def dead_lettered(self, topic: str, reason: str) -> None:
        self.dead_letters.add(1, {"topic": topic, "reason": reason, **self._instance})

    def lease(self, change: str, count: int = 1) -> None:
        self.lease_events.add(count, {"change": change, **self._instance})

    def task_restarted(self, task: str) -> None:
        self.task_restarts.add(1, {"task": task, **self._instance})

    def database_error(self, exc: BaseException) -> None:
        """Counts a transient database error under its kind (relay.faults.db_error_kind)."""
        self.database_errors.add(1, {"kind": db_error_kind(exc), **self._instance})
