"""Traces: a span per batch and per event after the OpenTelemetry messaging conventions, linked to
the writer's span and continued by consumers; tracing configured by the standard OTEL_* variables."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from devtools.embedded import StackEndpoints
from outbox_relay.cli import app as relay_app
from relay.shared.version import __version__
from relay.tracing import TracingConfigError, tracer_provider_from_env


def run_probe(stack: StackEndpoints, schema: str, topic: str) -> dict[str, Any]:
    probe = Path(__file__).with_name("tracing_probe.py")
    done = subprocess.run(
        [sys.executable, str(probe), stack.database_url, schema, stack.kafka_bootstrap, stack.redis_url, topic],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_publish_spans_follow_the_messaging_conventions_link_to_the_writer_and_travel_to_kafka(
    stack: StackEndpoints, schema: str
) -> None:
    topic = f"traced.{uuid.uuid4().hex[:8]}"
    result = run_probe(stack, schema, topic)
    by_name = {span["name"]: span for span in result["spans"]}
    assert f"send {topic}" in by_name, sorted(by_name)
    batch, send = by_name["outbox batch"], by_name[f"send {topic}"]
    assert send["kind"] == "PRODUCER"
    assert send["parent"] == batch["span_id"], "the event's span sits in its batch's span"
    assert result["writer"] in send["links"], "the event's span links to the writing transaction's span"
    # The consumer gets the send span's context, so its own trace continues from there.
    traceparent = result["headers"]["traceparent"]
    assert traceparent.split("-")[1:3] == [send["trace_id"], send["span_id"]]
    assert "message-id" in result["headers"]

    # OpenTelemetry messaging semantic conventions, with the values the consumer saw.
    attributes = send["attributes"]
    assert {
        "messaging.system": "kafka",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": topic,
        "messaging.destination.partition.id": str(result["partition"]),
        "messaging.kafka.message.key": "order-1",
        "messaging.message.id": result["message_id"],
    }.items() <= attributes.items(), attributes
    batches = [span for span in result["spans"] if span["name"] == "outbox batch"]
    assert sum(span["attributes"]["messaging.batch.message_count"] for span in batches) == 2

    stream = by_name[f"send {topic}.stream"]
    assert stream["kind"] == "PRODUCER"
    assert {
        "messaging.system": "redis",
        "messaging.operation.type": "send",
        "messaging.operation.name": "xadd",
        "messaging.destination.name": f"{topic}.stream",
    }.items() <= stream["attributes"].items(), stream["attributes"]
    assert "messaging.kafka.message.key" not in stream["attributes"]
    assert "messaging.destination.partition.id" not in stream["attributes"]


# --- the standard OTEL_* environment --------------------------------------------------------------


def test_without_otel_variables_no_span_is_made() -> None:
    assert tracer_provider_from_env({}) is None
    assert tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "TRUE"}) is None


def console_spans(environ: dict[str, str], capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """The spans a provider made from `environ` writes with the console exporter."""
    provider = tracer_provider_from_env(environ)
    assert provider is not None
    with provider.get_tracer("test").start_as_current_span("send orders"):
        pass
    provider.shutdown()
    decoder, text, spans = json.JSONDecoder(), capsys.readouterr().out.strip(), []
    while text:
        span, end = decoder.raw_decode(text)
        spans.append(span)
        text = text[end:].strip()
    return spans


def test_the_service_name_defaults_to_outbox_relay(capsys: pytest.CaptureFixture[str]) -> None:
    (span,) = console_spans({"OTEL_TRACES_EXPORTER": "console"}, capsys)
    assert span["name"] == "send orders"
    assert span["resource"]["attributes"]["service.name"] == "outbox-relay"
    assert span["resource"]["attributes"]["service.version"] == __version__


def test_otel_service_name_and_resource_attributes_are_honoured(capsys: pytest.CaptureFixture[str]) -> None:
    environ = {
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_SERVICE_NAME": "orders-relay",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.namespace=shop",
    }
    (span,) = console_spans(environ, capsys)
    resource = span["resource"]["attributes"]
    assert (resource["service.name"], resource["deployment.environment"], resource["service.namespace"]) == (
        "orders-relay",
        "prod",
        "shop",
    )
    del environ["OTEL_SERVICE_NAME"]
    environ["OTEL_RESOURCE_ATTRIBUTES"] = "service.name=from-attributes"
    (span,) = console_spans(environ, capsys)
    assert span["resource"]["attributes"]["service.name"] == "from-attributes"


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, ["OTEL_TRACES_EXPORTER", "zipkin", "otlp, console, none"]),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            ["OTEL_EXPORTER_OTLP_PROTOCOL", "grpc, http/protobuf"],
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "thrift"},
            ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift"],
        ),
    ],
)
def test_a_value_the_relay_cannot_honour_is_named(environ: dict[str, str], named: list[str]) -> None:
    with pytest.raises(TracingConfigError) as caught:
        tracer_provider_from_env(environ)
    assert all(part in str(caught.value) for part in named), str(caught.value)


@pytest.mark.parametrize(
    ("protocol", "module", "package"),
    [
        ("grpc", "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "opentelemetry-exporter-otlp-proto-grpc"),
        (
            "http/protobuf",
            "opentelemetry.exporter.otlp.proto.http.trace_exporter",
            "opentelemetry-exporter-otlp-proto-http",
        ),
    ],
)
def test_a_missing_exporter_package_is_named(
    monkeypatch: pytest.MonkeyPatch, protocol: str, module: str, package: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    with pytest.raises(TracingConfigError, match=package):
        tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": protocol})


def test_the_relay_exits_2_naming_a_wrong_otel_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_DATABASE_URL", "postgresql://relay:s3cret-pw@127.0.0.1:1/app")
    monkeypatch.setenv("OUTBOX_STARTUP_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jaeger")
    result = CliRunner().invoke(relay_app, ["run"])
    assert result.exit_code == 2, result.output
    assert "OTEL_TRACES_EXPORTER" in result.output and "s3cret-pw" not in result.output


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_otlp_over_http_protobuf_reaches_the_collector_with_the_service_name() -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    server = http.server.HTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        provider = tracer_provider_from_env(
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
                "OTEL_SERVICE_NAME": "relay-under-test",
            }
        )
        assert provider is not None
        with provider.get_tracer("test").start_as_current_span("send orders"):
            pass
        assert provider.force_flush(30_000)
        provider.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    ((path, content_type, body),) = _Collector.received
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    request = ExportTraceServiceRequest.FromString(body)
    (resource_spans,) = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "relay-under-test"
    assert [span.name for scope in resource_spans.scope_spans for span in scope.spans] == ["send orders"]
