"""Metrics and traces (OpenTelemetry). Metrics are exported for Prometheus on OUTBOX_METRICS_ADDR;
traces are relay.tracing's (the standard OTEL_* variables)."""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from relay.events import OutboxRow
from relay.faults import db_error_kind
from relay.shared.version import __version__

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from relay.sinks.base import Sink
    from relay.sinks.router import Router

log = logging.getLogger(__name__)
METER_NAME = "outbox_relay"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def prometheus_meter_provider(registry: CollectorRegistry) -> metrics.MeterProvider:
    """A MeterProvider of our own (not the global one) whose metrics `registry` serves."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import Histogram, MeterProvider
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
    from prometheus_client import PlatformCollector, ProcessCollector

    # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds... and python_info.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
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


GaugeSource = Callable[[], Iterable[tuple[float, dict[str, str]]]]

# The relay's own name for an instance (OUTBOX_INSTANCE_ID). Not `instance`: Prometheus sets that on
# every series to the scrape target (host:port), and a metric's own `instance` label clashes with it.
INSTANCE_LABEL = "relay_instance"
# Failure kinds whose counters exist from the start (0, not "No data"); others appear when they occur.
KNOWN_PUBLISH_FAILURES = ("broker_unavailable", "publish_timeout", "unknown_topic", "publish_failed")
KNOWN_LEASE_CHANGES = ("acquired", "lost", "acquire_failed")


def database_name(url: str) -> str:
    """The database name of a PostgreSQL URL or keyword DSN: a fleet label, so never the host, the
    user or the password ('' when the URL names none)."""
    text = url.strip()
    if "://" not in text:  # keyword DSN: host=... dbname=app
        for part in text.split():
            key, sep, value = part.partition("=")
            if sep and key.strip().lower() == "dbname":
                return value.strip().strip("'")
        return ""
    try:
        path = urlsplit(text).path
    except ValueError:
        return ""
    return unquote(path.lstrip("/").split("/", 1)[0])


def fleet_labels(schema: str, database_url: str) -> dict[str, str]:
    """The labels that tell fleets apart in one Prometheus: the outbox schema and the database name."""
    return {"schema": schema, "database": database_name(database_url)}


def build_labels() -> dict[str, str]:
    return {
        "version": __version__,
        "python": platform.python_version(),
        "implementation": platform.python_implementation().lower(),
    }


class RelayMetrics:
    """Every series carries the fleet labels (`schema`, `database`); the per-instance ones also
    `relay_instance`. Counters whose label sets are known at start exist from the start, at 0."""

    def __init__(
        self, instance_id: str, meter: metrics.Meter | None = None, fleet: Mapping[str, str] | None = None
    ) -> None:
        meter = meter or metrics.get_meter(METER_NAME)
        self._meter = meter
        self.fleet: dict[str, str] = dict(fleet or {})
        self._instance = {**self.fleet, INSTANCE_LABEL: instance_id}
        self._topic_attributes: dict[str, dict[str, str]] = {}
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

        self._start_at_zero()
        labels = {**self._instance, **build_labels()}
        self.gauge("outbox_build_info", "1", "1, labelled with the relay's version and Python", lambda: [(1.0, labels)])

    @property
    def instance_labels(self) -> dict[str, str]:
        """The labels of a per-instance series: the fleet's and `relay_instance`."""
        return dict(self._instance)

    def _start_at_zero(self) -> None:
        """The series dashboards and alerts use whose labels are known now, at 0 (an absent series
        shows "No data", and increase() misses its first increment)."""
        for kind in KNOWN_PUBLISH_FAILURES:
            self.publish_failures.add(0, {"kind": kind, **self._instance})
        for change in KNOWN_LEASE_CHANGES:
            self.lease_events.add(0, {"change": change, **self._instance})

    def gauge(self, name: str, unit: str, description: str, source: GaugeSource) -> None:
        """An observable gauge read at scrape time from `source` (value, labels) pairs; the fleet
        labels are added to each."""

        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, {**self.fleet, **labels}) for value, labels in source()]

        self._meter.create_observable_gauge(name, callbacks=[observe], unit=unit, description=description)

    def sink_connections(self, sinks: Callable[[], Mapping[str, Sink]]) -> None:
        """outbox_sink_connected{sink} and outbox_sink_connect_failures_total{sink,kind}, every kind
        from the start."""

        def failures(_options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(count, {"sink": name, "kind": kind, **self._instance})
                for name, sink in sinks().items()
                for kind, count in sink.connection.failures.items()
            ]

        self._meter.create_observable_counter(
            "outbox_sink_connect_failures",
            callbacks=[failures],
            unit="{attempt}",
            description="Failed attempts to connect to a sink, by kind (network, authentication, tls, unsupported, other)",
        )
        self.gauge(
            "outbox_sink_connected",
            "1",
            "1 while this instance is connected to the sink",
            lambda: [
                (1.0 if sink.is_connected() else 0.0, {"sink": name, **self._instance})
                for name, sink in sinks().items()
            ],
        )

    def claimed(self, count: int, seconds: float) -> None:
        self.batch_size.record(count, self._instance)
        self.claim_duration.record(seconds, self._instance)

    def published(
        self,
        rows: Sequence[OutboxRow],
        settle_seconds: float,
        router: Router,
        *,
        acknowledged_at: datetime | None = None,
    ) -> None:
        """Counts settled rows; their latency runs from the commit to `acknowledged_at` (the broker's
        acknowledgement; now if not given), not to the settle, which may wait for the next claim."""
        if not rows:
            return
        self.settle_duration.record(settle_seconds, self._instance)
        until = acknowledged_at or datetime.now(UTC)
        counts: dict[str, int] = {}
        for row in rows:
            attributes = self._published_attributes(row.topic, router)
            counts[row.topic] = counts.get(row.topic, 0) + 1
            self.latency.record((until - row.created_at).total_seconds(), attributes)
        for topic, count in counts.items():
            self.published_total.add(count, self._published_attributes(topic, router))

    def _published_attributes(self, topic: str, router: Router) -> dict[str, str]:
        """{topic, sink, instance labels}, one dict per topic (rows of a batch share it; the SDK
        only reads it)."""
        attributes = self._topic_attributes.get(topic)
        if attributes is None:
            if len(self._topic_attributes) >= 10_000:
                self._topic_attributes.clear()
            sink = router.sink_kind_for(topic).value
            attributes = self._topic_attributes[topic] = {"topic": topic, "sink": sink, **self._instance}
        return attributes

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
