"""SQL identifiers the operator chooses (the schema name): checked once, then quoted into statements."""

from __future__ import annotations

import re

SQL_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def validate_schema_name(name: str) -> str:
    if not SQL_IDENTIFIER.fullmatch(name):
        raise ValueError(f"schema name {name!r} must be a lower-case SQL identifier ([a-z_][a-z0-9_]*)")
    return name


def quote_schema(name: str) -> str:
    """The schema name as it goes into a statement: validated, then double-quoted."""
    return f'"{validate_schema_name(name)}"'
