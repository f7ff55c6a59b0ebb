"""Metrics the relay records (OpenTelemetry API; exported when a MeterProvider is installed)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from opentelemetry import metrics

from relay.events import OutboxRow

if TYPE_CHECKING:
    from relay.sinks.router import Router

METER_NAME = "outbox_relay"


class RelayMetrics:
    def __init__(self, instance_id: str, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter(METER_NAME)
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
