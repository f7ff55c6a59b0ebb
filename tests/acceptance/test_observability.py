"""What operators see: the metrics the dashboard and the alerts rely on are really exported by a
running relay, the health endpoints answer, logs are structured and never carry a secret, and the
deploy/ and docs/ files agree with each other and with the code."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from clients.cli import app as outboxctl
from devtools.embedded import StackEndpoints
from devtools.fleet import (
    Fleet,
    RelayProcess,
    create_kafka_topic,
    json_lines,
    pending_count,
    unique_name,
    wait_until,
    write_events,
)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "kubernetes" / "prometheusrule.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
OBSERVABILITY = ROOT / "docs" / "observability.md"

METRIC_NAME = re.compile(r"\boutbox_[a-z_]+")
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")
# What the relay must export according to the brief of the dashboard and the runbook.
EXPECTED_FAMILIES = {
    "outbox_events_published_total",
    "outbox_publish_failures_total",
    "outbox_retries_total",
    "outbox_events_dead_lettered_total",
    "outbox_lease_changes_total",
    "outbox_commit_to_ack_latency_seconds",
    "outbox_batch_size",
    "outbox_claim_duration_seconds",
    "outbox_settle_duration_seconds",
    "outbox_pending_events",
    "outbox_oldest_pending_age_seconds",
    "outbox_dead_letters",
    "outbox_paused",
    "outbox_partitions_held",
    "outbox_leader",
    "outbox_live_instances",
    "outbox_build_info",
    "outbox_partitions",
    "outbox_sink_connected",
    "outbox_sink_connect_failures_total",
}
# The control plane's metrics (on the relay's /metrics when it runs inside `run`).
CONTROL_FAMILIES = {
    "outbox_control_calls_total",
    "outbox_control_call_duration_seconds",
    "outbox_replays_total",
    "outbox_replay_duplicates_skipped_total",
}
# Process metrics (prometheus_client's collectors), beside the relay's own.
PROCESS_FAMILIES = {
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
    "python_info",
}
PARTITIONS = 16


# --- reading deploy/ ---------------------------------------------------------------------------------


def family(name: str) -> str:
    """`outbox_x_bucket` / `_sum` / `_count` -> `outbox_x`; counters keep `_total`."""
    return HISTOGRAM_SUFFIX.sub("", name)


def _walk_panels(panels: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels", []))


def dashboard_expressions(path: Path) -> list[str]:
    dashboard = json.loads(path.read_text())
    exprs = [
        target["expr"]
        for panel in _walk_panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and isinstance(query, str):
            exprs.append(query)
    return exprs


def alert_expressions(text: str) -> list[str]:
    """The `expr:` values of a rules file, inline or as a `>-`/`|` block (no YAML library needed)."""
    lines, exprs, i = text.splitlines(), [], 0
    while i < len(lines):
        match = re.match(r"^(\s*)(?:- )?expr:\s*(.*)$", lines[i])
        i += 1
        if not match:
            continue
        indent, value = len(match.group(1)), match.group(2).strip()
        if value[:1] in (">", "|"):
            block = []
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
            ):
                block.append(lines[i].strip())
                i += 1
            value = " ".join(part for part in block if part)
        exprs.append(value)
    return exprs


def used_families() -> dict[str, set[str]]:
    """Metric family -> the files whose PromQL uses it."""
    used: dict[str, set[str]] = {}
    sources = [(path.name, dashboard_expressions(path)) for path in DASHBOARDS]
    sources.append((ALERTS.name, alert_expressions(ALERTS.read_text())))
    for source, exprs in sources:
        for expr in exprs:
            for name in METRIC_NAME.findall(expr):
                used.setdefault(family(name), set()).add(source)
    return used


def alert_rules(text: str) -> dict[str, str]:
    """Alert name -> its block of the rules file."""
    parts = re.split(r"^\s*- alert:\s*", text, flags=re.MULTILINE)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, flags=re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


# --- talking to a relay -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Response:
    status: int
    body: str


def _get(url: str) -> Response:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return Response(response.status, response.read().decode())
    except urllib.error.HTTPError as error:
        return Response(error.code, error.read().decode())


async def get(port: int, path: str) -> Response | None:
    """None while nothing listens yet."""
    try:
        return await asyncio.to_thread(_get, f"http://127.0.0.1:{port}{path}")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


async def scrape(port: int) -> list[Sample]:
    response = await get(port, "/metrics")
    if response is None or response.status != 200:
        return []
    return [
        Sample(sample.name, dict(sample.labels), float(sample.value))
        for metric in text_string_to_metric_families(response.body)
        for sample in metric.samples
    ]


def families(samples: Iterable[Sample]) -> set[str]:
    return {family(sample.name) for sample in samples}


def values(samples: Iterable[Sample], name: str, **labels: str) -> list[float]:
    return [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]


async def wait_ready(relay: RelayProcess, port: int, timeout: float = 60) -> Response:
    seen: list[Response | None] = [None]

    async def ready() -> bool:
        assert relay.alive(), relay.log()[-3000:]
        seen[0] = await get(port, "/readyz")
        return seen[0] is not None and seen[0].status == 200

    try:
        await wait_until(ready, timeout, what="/readyz to answer 200")
    except AssertionError:
        raise AssertionError(f"last /readyz: {seen[0]}\n{relay.log()[-3000:]}") from None
    assert seen[0] is not None
    return seen[0]


async def stop(relay: RelayProcess) -> int:
    relay.signal(signal.SIGTERM)
    return await asyncio.to_thread(relay.wait, 30)


async def execute(database_url: str, statement: str, *args: object) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(statement, *args)
    finally:
        await conn.close()


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = parts.hostname or "127.0.0.1"
    return urlunsplit((parts.scheme, f"{user}:{password}@{host}:{parts.port}", parts.path, parts.query, ""))


# --- deploy/ and docs/ agree, without a relay -----------------------------------------------------------


def test_the_dashboard_is_a_grafana_dashboard_on_a_prometheus_datasource_variable() -> None:
    assert DASHBOARDS, "deploy/grafana/*.json"
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["schemaVersion"] >= 39
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        for name in ("schema", "database", "relay_instance", "topic"):
            assert variables[name]["type"] == "query", name
        assert "instance" not in variables, "Prometheus's own target label; the relay's is relay_instance"
        panels = [p for p in _walk_panels(dashboard["panels"]) if p["type"] != "row"]
        assert len({p["id"] for p in _walk_panels(dashboard["panels"])}) == len(
            list(_walk_panels(dashboard["panels"]))
        ), "panel ids must be unique"
        for panel in panels:
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", panel["title"]
                assert METRIC_NAME.search(target["expr"]), (panel["title"], target["expr"])
                # Every panel shows the chosen fleet only, and no query uses the clashing label.
                assert 'schema=~"$schema"' in target["expr"], (panel["title"], target["expr"])
                assert not re.search(r"(?<![a-z_])instance=~", target["expr"]), target["expr"]
    assert set(used_families()) >= EXPECTED_FAMILIES, EXPECTED_FAMILIES - set(used_families())


def test_every_alert_has_a_runbook_section_and_annotations() -> None:
    rules = alert_rules(ALERTS.read_text())
    assert set(rules) >= {
        "OutboxLagHigh",
        "OutboxNoLeader",
        "OutboxDeadLetterRate",
        "OutboxPublishFailures",
        "OutboxInstanceFlapping",
        "OutboxPaused",
    }
    anchors = github_anchors(OPERATIONS.read_text())
    for name, block in rules.items():
        for field in ("expr:", "severity:", "summary:", "description:", "runbook_url:"):
            assert field in block, f"{name} has no {field}"
        url = re.search(r'runbook_url:\s*"?([^"\s]+)', block)
        assert url is not None, name
        page, _, anchor = url.group(1).partition("#")
        assert page.endswith("docs/operations.md"), (name, page)
        assert anchor in anchors, f"{name}: no section #{anchor} in docs/operations.md"


def test_every_metric_used_or_exported_is_documented() -> None:
    documented = OBSERVABILITY.read_text()
    for name in set(used_families()) | EXPECTED_FAMILIES | CONTROL_FAMILIES | PROCESS_FAMILIES:
        assert f"`{name}`" in documented, f"{name} is not described in docs/observability.md"


def test_no_alert_aggregates_by_the_clashing_instance_label_and_every_one_is_per_fleet() -> None:
    for name, block in alert_rules(ALERTS.read_text()).items():
        (expr,) = alert_expressions("- alert: " + block)
        assert not re.search(r"\binstance\b", expr.replace("relay_instance", "")), (name, expr)
        for clause in re.findall(r"\b(?:by|on) \(([^)]*)\)", expr):
            labels = {label.strip() for label in clause.split(",")}
            assert {"schema", "database"} <= labels, f"{name}: `{clause}` must keep the fleet labels"


def test_the_prometheus_rule_holds_the_same_groups_as_alerts_yml() -> None:
    yaml = pytest.importorskip("yaml")
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"], (
        "copy the groups of deploy/prometheus/alerts.yml into deploy/kubernetes/prometheusrule.yaml"
    )
    kustomization = (PROMETHEUS_RULE.parent / "kustomization.yaml").read_text()
    assert "prometheusrule.yaml" in kustomization
    assert {"OutboxPartitionsUnowned", "OutboxPublishLatencySLO"} <= set(alert_rules(ALERTS.read_text()))


def test_the_outboxctl_commands_in_the_runbook_exist() -> None:
    commands = set(
        re.findall(
            r"outboxctl (?:--json )?([a-z][a-z-]*(?: (?:list|show|replay|purge))?)", OPERATIONS.read_text()
        )
    )
    assert {"status", "locks", "release-lock", "pause", "resume", "pauses", "stuck", "park"} <= commands
    assert "dead-letters replay" in commands
    for command in sorted(commands):
        result = CliRunner().invoke(outboxctl, [*command.split(), "--help"])
        assert result.exit_code == 0, f"`outboxctl {command}` in docs/operations.md: {result.output}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Prometheus) is not installed")
def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    checked = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        ["promtool", "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, timeout=120
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


# --- a real relay ---------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_relay_exports_every_metric_the_dashboard_and_alerts_use(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    await create_kafka_topic(stack.kafka_bootstrap, topics["kafka"])
    port = free_port()
    relay = fleet.spawn(
        "relay-0",
        OUTBOX_METRICS_ADDR=f"127.0.0.1:{port}",
        OUTBOX_MAX_PAYLOAD_BYTES="1000",
        OUTBOX_MAX_ATTEMPTS="2",
        OUTBOX_BACKOFF_INITIAL="0.1",
        OUTBOX_BACKOFF_MAX="0.2",
    )

    # Health, before any traffic: every sink is connected from the start.
    ready = await wait_ready(relay, port)
    # Before any traffic too: the series alerts and panels rely on exist, at 0, not "No data".
    before = await scrape(port)
    ours = {"schema": fleet.schema, "database": urlsplit(fleet.database_url).path.strip("/")}
    assert ours["database"], "the fleet database URL names its database"
    for kind in ("broker_unavailable", "publish_timeout", "unknown_topic", "publish_failed"):
        assert values(before, "outbox_publish_failures_total", kind=kind, relay_instance="relay-0") == [0.0]
    for change in ("lost", "acquire_failed"):
        assert values(before, "outbox_lease_changes_total", change=change, **ours) == [0.0], change
    for sink in ("kafka", "redis"):
        assert values(before, "outbox_sink_connected", sink=sink, relay_instance="relay-0", **ours) == [1.0]
        for kind in ("network", "authentication", "tls", "unsupported", "other"):
            assert values(before, "outbox_sink_connect_failures_total", sink=sink, kind=kind, **ours) == [0.0]
    (build,) = [s for s in before if s.name == "outbox_build_info"]
    assert build.value == 1.0 and build.labels["relay_instance"] == "relay-0"
    assert {"version", "python", "schema", "database"} <= build.labels.keys(), build.labels
    assert values(before, "outbox_partitions", **ours) == [float(PARTITIONS)]
    assert families(before) >= PROCESS_FAMILIES, PROCESS_FAMILIES - families(before)
    assert values(before, "process_resident_memory_bytes")[0] > 1_000_000
    assert values(before, "process_open_fds")[0] > 0
    # No series carries the label Prometheus sets itself, and none a password or a host.
    assert not [s for s in before if "instance" in s.labels], [s for s in before if "instance" in s.labels][:3]
    relay_series = [s for s in before if s.name.startswith("outbox_")]
    assert all(s.labels.get("schema") == ours["schema"] for s in relay_series), relay_series[:3]
    assert not [s for s in relay_series if "127.0.0.1" in str(s.labels) or "@" in str(s.labels)]
    assert json.loads(ready.body) == {
        "database": True,
        "schema": True,
        "sink_kafka": True,
        "sink_redis": True,
    }
    health = await get(port, "/healthz")
    assert health is not None and health.status == 200

    # Traffic: published events on both sinks, a dead letter for size, a retried event that ends as
    # a dead letter (a Redis key of the wrong type), and an event held back by a pause.
    schema = f'"{fleet.schema}"'
    wrong_type = unique_name("rt.wrongtype.")
    held = unique_name("held.")
    client = aioredis.from_url(stack.redis_url)
    try:
        await client.set(wrong_type, "not a stream")
    finally:
        await client.aclose()
    await execute(
        fleet.database_url,
        f"INSERT INTO {schema}.pauses (topic_pattern, reason, paused_by) VALUES ($1, 'test', 'test')",
        held,
    )

    async def pause_seen() -> bool:  # relays poll the pauses table: wait until this one knows
        return bool(values(await scrape(port), "outbox_paused", pattern=held))

    await wait_until(pause_seen, 30, what="the relay to see the pause")
    await write_events(fleet.database_url, fleet.schema, [topics["kafka"], topics["redis"]], total=300)
    await execute(
        fleet.database_url,
        f"INSERT INTO {schema}.outbox (topic, key, payload) VALUES "
        "($1, 'big', convert_to(repeat('x', 5000), 'UTF8')), ($2, 'w', convert_to('{}', 'UTF8')), "
        "($3, 'h', convert_to('{}', 'UTF8'))",
        topics["kafka"],
        wrong_type,
        held,
    )

    samples: list[Sample] = []

    async def everything_reported() -> bool:
        assert relay.alive(), relay.log()[-3000:]
        samples[:] = await scrape(port)
        return (
            families(samples) >= EXPECTED_FAMILIES
            and bool(values(samples, "outbox_events_dead_lettered_total", reason="max_attempts"))
            and bool(values(samples, "outbox_pending_events", topic=held))
            and values(samples, "outbox_dead_letters") == [2.0]
            and sum(values(samples, "outbox_events_published_total")) >= 300
        )

    try:
        await wait_until(everything_reported, 60, what="every metric family")
    except AssertionError:
        absent = EXPECTED_FAMILIES - families(samples)
        outbox = [s for s in samples if s.name.startswith("outbox_") and "_bucket" not in s.name]
        raise AssertionError(f"missing {sorted(absent)} in {outbox}\n{relay.log()[-3000:]}") from None

    used = used_families()
    missing = {name: sorted(files) for name, files in used.items() if name not in families(samples)}
    assert not missing, f"used in deploy/ but not exported by a relay: {missing}"

    # The values behind the panels and alerts are the expected ones.
    assert sum(values(samples, "outbox_events_published_total", sink="kafka", relay_instance="relay-0")) > 0
    assert sum(values(samples, "outbox_events_published_total", sink="redis", relay_instance="relay-0")) > 0
    assert values(
        samples, "outbox_events_dead_lettered_total", reason="payload_too_large", topic=topics["kafka"]
    )
    assert values(samples, "outbox_events_dead_lettered_total", reason="max_attempts", topic=wrong_type)
    assert values(samples, "outbox_publish_failures_total", kind="publish_failed") == [2.0]
    assert values(samples, "outbox_retries_total", topic=wrong_type) == [1.0]
    assert values(samples, "outbox_dead_letters") == [2.0]
    assert values(samples, "outbox_pending_events", topic=held) == [1.0]
    assert values(samples, "outbox_oldest_pending_age_seconds", topic=held)[0] > 0
    assert values(samples, "outbox_paused", pattern=held) == [1.0]
    assert values(samples, "outbox_partitions_held", relay_instance="relay-0") == [float(PARTITIONS)]
    assert values(samples, "outbox_leader", relay_instance="relay-0") == [1.0]
    assert values(samples, "outbox_live_instances", relay_instance="relay-0") == [1.0]
    assert values(samples, "outbox_lease_changes_total", change="acquired") == [float(PARTITIONS)]
    latency_count = sum(values(samples, "outbox_commit_to_ack_latency_seconds_count"))
    assert latency_count == sum(values(samples, "outbox_events_published_total"))
    # Second-valued histograms have second-sized buckets (not the SDK's default 0, 5, 10, ... 10000).
    claim_buckets = {s.labels["le"] for s in samples if s.name == "outbox_claim_duration_seconds_bucket"}
    assert "0.01" in claim_buckets, sorted(claim_buckets)

    ready = await wait_ready(relay, port)
    assert json.loads(ready.body)["schema"] is True
    assert await stop(relay) == 0, relay.log()[-3000:]


@pytest.mark.slow
async def test_logs_are_json_lines_with_the_instance_and_one_line_per_lease_not_per_event(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    await create_kafka_topic(stack.kafka_bootstrap, topics["kafka"])
    port = free_port()
    relay = fleet.spawn("relay-logs", OUTBOX_METRICS_ADDR=f"127.0.0.1:{port}")
    await wait_ready(relay, port)
    written = await write_events(
        fleet.database_url, fleet.schema, [topics["kafka"], topics["redis"]], total=1000
    )

    async def drained() -> bool:
        return await pending_count(fleet.database_url, fleet.schema) == 0

    await wait_until(drained, 60, what="the outbox to drain")
    samples = await scrape(port)
    acquired_metric = sum(values(samples, "outbox_lease_changes_total", change="acquired"))
    assert await stop(relay) == 0, relay.log()[-3000:]

    text = relay.log()
    lines = [line for line in text.splitlines() if line.strip()]
    entries = json_lines(text)
    assert len(entries) == len(lines), [line for line in lines if not line.startswith("{")][:5]
    for entry in entries:
        assert {"ts", "level", "logger", "msg"} <= entry.keys(), entry
        assert entry["instance"] == "relay-logs", entry

    acquired = Counter(str(e["lease"]) for e in entries if e["msg"] == "lease acquired")
    assert len(acquired) == PARTITIONS and set(acquired.values()) == {1}, acquired
    assert sum(acquired.values()) == acquired_metric
    assert all(isinstance(e["fence"], int) for e in entries if e["msg"] == "lease acquired")
    assert sum(e["msg"] == "became leader" for e in entries) == 1
    assert any(e["msg"] == "relay started" for e in entries)
    assert any(e["msg"] == "released 17 leases" for e in entries), [e["msg"] for e in entries][-5:]
    # A thousand events published, and nothing logged per event.
    assert len(entries) < 50, Counter(str(e["msg"]) for e in entries).most_common(5)
    message_ids = {w.message_id for w in written}
    assert not [line for line in lines if any(m in line for m in message_ids)]


@pytest.mark.slow
async def test_no_password_reaches_the_output_while_a_sink_keeps_failing(
    stack: StackEndpoints, fleet: Fleet, topics: dict[str, str]
) -> None:
    secrets = {"database": "hunter2pw", "redis": "redispw77", "kafka": "saslpw99"}
    port = free_port()
    relay = fleet.spawn(
        "relay-secrets",
        OUTBOX_DATABASE_URL=with_password(stack.database_url, secrets["database"]),
        OUTBOX_REDIS_URL=f"redis://:{secrets['redis']}@127.0.0.1:{free_port()}/0",
        OUTBOX_KAFKA_SASL_USERNAME="relay",
        OUTBOX_KAFKA_SASL_PASSWORD=secrets["kafka"],
        OUTBOX_METRICS_ADDR=f"127.0.0.1:{port}",
        OUTBOX_SINK_BACKOFF_MAX="0.5",
        OUTBOX_LOG_LEVEL="DEBUG",
    )

    # The Redis sink is unreachable: not ready, and the body says which check fails; still alive.
    async def not_ready() -> bool:
        assert relay.alive(), relay.log()[-3000:]
        response = await get(port, "/readyz")
        if response is None or response.status != 503:
            return False
        # Started (database and Kafka fine), not merely not ready yet because it is still starting.
        body = json.loads(response.body)
        return bool(body["database"] and body.get("sink_kafka"))

    await wait_until(not_ready, 60, what="/readyz to answer 503")
    response = await get(port, "/readyz")
    assert response is not None
    body = json.loads(response.body)
    assert body.pop("reasons") == {"sink_redis": "not connected"}, "a 503 says why, per failing check"
    assert body == {
        "database": True,
        "schema": True,
        "sink_kafka": True,
        "sink_redis": False,
    }
    health = await get(port, "/healthz")
    assert health is not None and health.status == 200

    # Events routed to the unreachable Redis keep failing and being retried.
    await write_events(fleet.database_url, fleet.schema, [topics["redis"]], total=20, keys=5)

    async def failing() -> bool:
        samples = await scrape(port)
        return sum(values(samples, "outbox_publish_failures_total", kind="broker_unavailable")) >= 40

    await wait_until(failing, 60, what="repeated publish failures")
    metrics = await get(port, "/metrics")
    assert metrics is not None
    assert await stop(relay) == 0

    output = relay.log()
    assert "sink unavailable" in output
    assert len(json_lines(output)) == len([line for line in output.splitlines() if line.strip()])
    for name, secret in secrets.items():
        assert secret not in output, f"the {name} password is in the relay's output"
        assert secret not in metrics.body + response.body, f"the {name} password is served over HTTP"

    # Nor while the database cannot be reached at start (retries logged, then one line at exit).
    closed = with_password(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", secrets["database"])
    failed = fleet.spawn(
        f"relay-nodb-{uuid.uuid4().hex[:4]}", OUTBOX_DATABASE_URL=closed, OUTBOX_STARTUP_TIMEOUT="3"
    )
    assert await asyncio.to_thread(failed.wait, 60) == 1
    assert secrets["database"] not in failed.log(), failed.log()[-2000:]
    assert "relay failed" in failed.log(), failed.log()[-2000:]
    assert "database not reachable" in failed.log(), failed.log()[-2000:]


@pytest.mark.slow
async def test_a_sink_refusing_the_credentials_is_reported_on_readyz_in_metrics_and_the_log(
    stack: StackEndpoints, fleet: Fleet
) -> None:
    password, user = f"wrong-{uuid.uuid4().hex[:8]}", f"relay{uuid.uuid4().hex[:6]}"
    admin = aioredis.from_url(stack.redis_url)
    await admin.execute_command("ACL", "SETUSER", user, "on", ">the-right-one", "~*", "+@all")
    host_port = stack.redis_url.split("://", 1)[1].split("/", 1)[0]
    port = free_port()
    relay = fleet.spawn(
        "relay-auth",
        OUTBOX_REDIS_URL=f"redis://{user}:{password}@{host_port}/0",
        OUTBOX_METRICS_ADDR=f"127.0.0.1:{port}",
    )
    try:
        seen: list[dict[str, Any]] = []

        async def reported() -> bool:
            assert relay.alive(), relay.log()[-3000:]
            response = await get(port, "/readyz")
            if response is None or response.status != 503:
                return False
            seen[:] = [json.loads(response.body)]
            return bool(seen[0]["database"] and seen[0].get("sink_kafka"))

        await wait_until(reported, 60, what="/readyz to name the failing sink")
        reason = seen[0]["reasons"]["sink_redis"]
        assert reason.startswith("cannot connect: authentication: "), reason
        samples = await scrape(port)
        assert values(samples, "outbox_sink_connect_failures_total", sink="redis", kind="authentication")[0] >= 1
        assert values(samples, "outbox_sink_connected", sink="redis") == [0.0]
        assert values(samples, "outbox_sink_connected", sink="kafka") == [1.0]
        assert await stop(relay) == 0
        errors = [e for e in json_lines(relay.log()) if e["level"] == "error"]
        assert any(e["msg"].startswith("cannot connect to redis") for e in errors), errors
        assert any(e.get("connect_failure") == "authentication" for e in errors), errors
        assert password not in relay.log() and password not in reason
    finally:
        if relay.alive():
            relay.signal(signal.SIGTERM)
            await asyncio.to_thread(relay.wait, 30)
        await admin.execute_command("ACL", "DELUSER", user)
        await admin.aclose()
