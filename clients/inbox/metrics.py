"""The inbox's metrics, through the OpenTelemetry API when it is installed (meter
``outbox_relay.inbox``, attribute ``consumer``); nothing at all when it is not. docs/observability.md
lists them."""

from __future__ import annotations

import threading
from typing import Any

METER_NAME = "outbox_relay.inbox"

# kind -> (instrument name, description); Prometheus exporters add `_total` to counters.
COUNTERS = {
    "processed": ("outbox_inbox_processed", "Messages whose handler committed with the processed mark"),
    "duplicates": ("outbox_inbox_duplicates", "Redeliveries of an already processed message, skipped"),
    "lock_conflicts": ("outbox_inbox_lock_conflicts", "Messages skipped because another worker holds them"),
    "stale_takeovers": ("outbox_inbox_stale_takeovers", "Claims taken over from a worker whose lock went stale"),
    "failures": ("outbox_inbox_failures", "Handler failures (rolled back, recorded; retried or given up)"),
    "gave_up": ("outbox_inbox_gave_up", "Messages given up after max attempts (status failed)"),
    "fence_lost": ("outbox_inbox_fence_lost", "Handler transactions rolled back: the claim was taken over"),
}
STALE_LOCKS_GAUGE = "outbox_inbox_stale_locks"

_lock = threading.Lock()
_counters: dict[str, Any] = {}
_stale: dict[tuple[str, str], int] = {}  # (consumer, schema) -> stale locks
_gauge_registered = False


def count(kind: str, consumer: str, schema: str) -> None:
    """Adds one to the counter `kind` for `consumer` of the inbox in `schema` (the fleet label the
    dashboard filters on); metrics never break processing."""
    try:
        with _lock:
            counter = _counters.get(kind)
            if counter is None:
                from opentelemetry import metrics

                name, description = COUNTERS[kind]
                counter = metrics.get_meter(METER_NAME).create_counter(
                    name, unit="{message}", description=description
                )
                _counters[kind] = counter
        counter.add(1, {"consumer": consumer, "schema": schema})
    except Exception:  # pragma: no cover - no OpenTelemetry, or a broken SDK
        pass


def set_stale_locks(consumer: str, schema: str, value: int) -> None:
    """The latest count of stale locks of `consumer` (inbox in `schema`), reported by the gauge at
    collection time."""
    global _gauge_registered
    with _lock:
        _stale[(consumer, schema)] = value
        if _gauge_registered:
            return
        _gauge_registered = True
    try:
        from opentelemetry import metrics
        from opentelemetry.metrics import CallbackOptions, Observation

        def observe(_options: CallbackOptions) -> list[Observation]:
            with _lock:
                return [
                    Observation(count, {"consumer": name, "schema": schema})
                    for (name, schema), count in _stale.items()
                ]

        metrics.get_meter(METER_NAME).create_observable_gauge(
            STALE_LOCKS_GAUGE,
            callbacks=[observe],
            unit="{lock}",
            description="Inbox claims older than the stale threshold (workers presumed dead)",
        )
    except Exception:  # pragma: no cover - no OpenTelemetry, or a broken SDK
        pass
