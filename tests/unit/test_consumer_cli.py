"""`outbox-relay consume` without servers (issue 14): what it refuses before connecting, each as one
`error:` line and exit 2."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from outbox_relay.cli import app

HANDLER = "tests.consumer_handlers:record"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("OUTBOX_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--group", "g", HANDLER], {}, "give --kafka TOPICS or --redis STREAMS (one of them)"),
        (["--group", "g", "--kafka", "t", "--redis", "s", HANDLER], {}, "(one of them)"),
        (["--group", "g", "--kafka", "t", "--shards", "2", HANDLER], {}, "--shards applies to --redis only"),
        (["--group", "g", "--kafka", "t", HANDLER], {}, "OUTBOX_KAFKA_BOOTSTRAP is required"),
        (["--group", "g", "--redis", "s", HANDLER], {}, "OUTBOX_REDIS_URL is required"),
        (["--group", "g", "--kafka", "t", "tests.consumer_handlers:nope"], {"OUTBOX_KAFKA_BOOTSTRAP": "k:9092"},
         "module 'tests.consumer_handlers' has no attribute 'nope'"),
        (["--group", "g", "--kafka", "t", HANDLER], {"OUTBOX_CONSUMER_CONCURRENCY": "0"},
         "invalid configuration: OUTBOX_CONSUMER_CONCURRENCY"),
        (["--group", "g", "--kafka", "t", HANDLER],
         {"OUTBOX_KAFKA_BOOTSTRAP": "k:9092", "OUTBOX_INBOX_MAX_ATTEMPTS": "many"},
         "OUTBOX_INBOX_MAX_ATTEMPTS must be a whole number"),
        (["--group", " g", "--kafka", "t", HANDLER], {"OUTBOX_KAFKA_BOOTSTRAP": "k:9092"},
         "consumer must not contain control characters nor start or end with whitespace"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    args: list[str], env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["consume", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_the_help_lists_the_consumer_settings() -> None:
    result = CliRunner().invoke(app, ["consume", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for variable in ("OUTBOX_CONSUMER_CONCURRENCY", "OUTBOX_REDIS_MAX_DELIVERIES", "OUTBOX_KAFKA_SESSION_TIMEOUT"):
        assert variable in result.output
