"""The relay's SQL: every statement it runs, from queries.sql here, as a name -> statement mapping per
schema. The file format (named blocks, `{fragment:name}`, `{schema}`) is relay.shared.sqlblocks's; the
control plane's statements are in control/queries.sql."""

from __future__ import annotations

from functools import cache

from relay.shared.sqlblocks import bind_schema, load_blocks


def notify_channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel the outbox insert trigger signals."""
    return f"{schema}.outbox_inserted"


@cache
def queries(schema: str) -> dict[str, str]:
    return bind_schema(load_blocks(__package__, "queries.sql"), schema)
