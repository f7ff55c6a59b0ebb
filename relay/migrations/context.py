"""What a migration script may ask of the run that executes it."""

from __future__ import annotations

from alembic import context


def schema() -> str:
    """The quoted schema name this migration run targets."""
    return f'"{context.config.attributes["schema"]}"'


def partitions() -> int:
    return int(context.config.attributes.get("partitions", 16))
