"""Traces: a span per batch and per event, linked to the writer's span, and continued by consumers."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

from devtools.embedded import StackEndpoints


def test_publish_spans_link_to_the_writer_and_travel_to_kafka(stack: StackEndpoints, schema: str) -> None:
    topic = f"traced.{uuid.uuid4().hex[:8]}"
    probe = Path(__file__).with_name("tracing_probe.py")
    done = subprocess.run(
        [sys.executable, str(probe), stack.database_url, schema, stack.kafka_bootstrap, topic],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    by_name = {span["name"]: span for span in result["spans"]}
    batch, publish = by_name["outbox batch"], by_name[f"publish {topic}"]
    assert publish["kind"] == "PRODUCER"
    assert publish["parent"] == batch["span_id"], "the event's span sits in its batch's span"
    assert result["writer"] in publish["links"], "the event's span links to the writing transaction's span"
    # The consumer gets the publish span's context, so its own trace continues from there.
    traceparent = result["headers"]["traceparent"]
    assert traceparent.split("-")[1:3] == [publish["trace_id"], publish["span_id"]]
    assert "message-id" in result["headers"]
