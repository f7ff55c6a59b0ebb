"""All of Outbox Relay's SQL, loaded from the *.sql files here (queries.sql: the relay; control.sql: the control plane) into a name -> statement mapping per schema."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from relay.config import validate_schema_name

_BLOCK = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


def notify_channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel the outbox insert trigger signals."""
    return f"{schema}.outbox_inserted"


@cache
def _raw_queries() -> dict[str, str]:
    found: dict[str, str] = {}
    for sql_file in sorted(resources.files(__package__).iterdir(), key=lambda f: f.name):
        if not sql_file.name.endswith(".sql"):
            continue
        parts = _BLOCK.split(sql_file.read_text(encoding="utf-8"))
        # parts = [preamble, name1, body1, name2, body2, ...]
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in found:
                raise RuntimeError(f"SQL block {name!r} is defined twice")
            found[name] = body.strip()
    return found


@cache
def queries(schema: str) -> dict[str, str]:
    quoted = f'"{validate_schema_name(schema)}"'
    return {name: body.replace("{schema}", quoted) for name, body in _raw_queries().items()}
