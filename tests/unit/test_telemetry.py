"""relay.telemetry without a relay: the labels every series carries (never `instance`, never a host or
a password), the series that exist from the start, the build info and the process metrics."""

from __future__ import annotations

import platform

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relay.shared.version import __version__
from relay.sinks.base import ConnectFailure, ConnectState
from relay.telemetry import METER_NAME, RelayMetrics, database_name, fleet_labels, prometheus_meter_provider


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("postgresql://relay:s3cret@db.internal:5432/orders?sslmode=require", "orders"),
        ("postgresql://postgres@/app?host=/run/postgresql", "app"),
        ("postgres://db.internal/some%20db", "some db"),
        ("host=db.internal user=relay password='s3cret' dbname=billing", "billing"),
        ("postgresql://relay:s3cret@db.internal:5432", ""),
        ("host=db.internal password=s3cret", ""),
    ],
)
def test_the_database_label_is_the_database_name_only(url: str, name: str) -> None:
    assert database_name(url) == name
    assert fleet_labels("outbox", url) == {"schema": "outbox", "database": name}


class FakeSink:
    def __init__(self, connected: bool) -> None:
        self.connection = ConnectState("kafka")
        self._connected = connected

    def is_connected(self) -> bool:
        return self._connected


def scrape(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    text = generate_latest(registry).decode()
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def test_a_fresh_relay_exports_its_labels_zero_series_build_info_and_process_metrics() -> None:
    registry = CollectorRegistry()
    provider = prometheus_meter_provider(registry)
    fleet = fleet_labels("orders_outbox", "postgresql://relay:s3cret@db.internal:5432/shop")
    metrics = RelayMetrics("relay-7", provider.get_meter(METER_NAME), fleet)
    sink = FakeSink(connected=False)
    sink.connection.failed(ConnectFailure.AUTHENTICATION, "SaslAuthenticationFailed: bad password")
    metrics.sink_connections(lambda: {"kafka": sink})  # type: ignore[dict-item]
    samples = scrape(registry)

    def value(name: str, **labels: str) -> list[float]:
        return [v for n, ls, v in samples if n == name and labels.items() <= ls.items()]

    ours = {"schema": "orders_outbox", "database": "shop", "relay_instance": "relay-7"}
    for kind in ("broker_unavailable", "publish_timeout", "unknown_topic", "publish_failed"):
        assert value("outbox_publish_failures_total", kind=kind, **ours) == [0.0], kind
    for change in ("acquired", "lost", "acquire_failed"):
        assert value("outbox_lease_changes_total", change=change, **ours) == [0.0], change
    assert value("outbox_sink_connect_failures_total", sink="kafka", kind="authentication", **ours) == [1.0]
    assert value("outbox_sink_connect_failures_total", sink="kafka", kind="network", **ours) == [0.0]
    assert value("outbox_sink_connected", sink="kafka", **ours) == [0.0]
    assert value(
        "outbox_build_info", version=__version__, python=platform.python_version(), **ours
    ) == [1.0]
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"):
        assert value(name), f"{name} is not exported"
    assert value("process_resident_memory_bytes")[0] > 1_000_000

    outbox = [(n, ls) for n, ls, _ in samples if n.startswith("outbox_")]
    assert all("instance" not in ls for _, ls in outbox), "Prometheus's own target label"
    assert all(ls.get("schema") == "orders_outbox" and ls.get("database") == "shop" for _, ls in outbox)
    text = generate_latest(registry).decode()
    assert "s3cret" not in text and "db.internal" not in text and "relay:" not in text
    provider.shutdown()  # type: ignore[attr-defined]
