"""The consumers' metrics (meter ``outbox_relay.consumer``, attribute ``group``), besides the inbox's
own (processed, duplicates, lock conflicts, stale takeovers, failures: clients.inbox.metrics)."""

from __future__ import annotations

from opentelemetry import metrics

METER_NAME = "outbox_relay.consumer"


class ConsumerMetrics:
    def __init__(self, group: str, system: str) -> None:
        meter = metrics.get_meter(METER_NAME)
        self._labels = {"group": group, "system": system}
        self.settled = meter.create_counter(
            "outbox_consumer_messages",
            unit="{message}",
            description="Messages settled (offset committed / entry acknowledged), by inbox outcome",
        )
        self.retries = meter.create_counter(
            "outbox_consumer_retries",
            unit="{attempt}",
            description="Messages tried again: locked by another worker, handler failed, or an outage",
        )
        self.invalid = meter.create_counter(
            "outbox_consumer_invalid_messages",
            unit="{message}",
            description="Messages that cannot be processed (no message-id), parked",
        )
        self.dead_letters = meter.create_counter(
            "outbox_consumer_dead_letters",
            unit="{message}",
            description="Redis entries moved to '<stream>:dlq', by reason",
        )
        self.errors = meter.create_counter(
            "outbox_consumer_errors",
            unit="{error}",
            description="Errors met and waited out (database or broker unavailable, unexpected), by kind",
        )
        self.handling = meter.create_histogram(
            "outbox_consumer_process_duration", unit="s", description="One inbox.process call, handler included"
        )

    def counted(self, counter: metrics.Counter, **labels: str) -> None:
        counter.add(1, {**self._labels, **labels})
