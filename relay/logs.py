"""Structured logs: one JSON object per line when not on a terminal, with secrets redacted, and the
current span's `trace_id`/`span_id` (as OpenTelemetry writes them) when a line is logged inside one."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from relay.shared.redaction import redact

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
_SECRET_WORDS = ("password", "token", "secret")


def _is_secret(key: object) -> bool:
    return any(word in str(key).lower() for word in _SECRET_WORDS)


def _clean(value: Any) -> Any:
    """An extra field's value with URL passwords redacted (also inside lists and dicts)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {str(k): "***" if _is_secret(k) else _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v) for v in value]
    return redact(value if isinstance(value, str) else str(value))


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    extras = {
        key: "***" if _is_secret(key) else _clean(value)
        for key, value in record.__dict__.items()
        if key not in _STANDARD
    }
    extras.update(trace_fields())
    return extras


def trace_fields() -> dict[str, str]:
    """`trace_id` and `span_id` of the current span (32 and 16 hex digits); none outside a span."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


class JsonFormatter(logging.Formatter):
    def __init__(self, static: dict[str, str] | None = None) -> None:
        super().__init__()
        self._static = static or {}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
            **self._static,
            **_extras(record),
        }
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class ConsoleFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = redact(super().format(record))
        extras = _extras(record)
        if extras:
            line += "  " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


def setup_logging(
    level: str = "INFO", *, instance_id: str | None = None, json_logs: bool | None = None
) -> None:
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    static = {"instance": instance_id} if instance_id else {}
    handler.setFormatter(JsonFormatter(static) if json_logs else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "kafka", "alembic.runtime.migration", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
