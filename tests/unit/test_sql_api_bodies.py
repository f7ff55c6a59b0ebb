"""Without a database: the functions migration 0005 creates (the SQL API, docs/sql-api.md) run the
relay's and the control plane's own statements word for word. tests/integration/test_sql_api.py
checks the same against the migrated schema."""

from __future__ import annotations

import importlib
import re
from types import SimpleNamespace

import pytest

from relay.shared.sqlblocks import bind_schema, load_blocks
from tests.integration.test_sql_api import CONTROL_STATEMENTS, RELAY_STATEMENTS, normalized

_CREATED = re.compile(r'CREATE FUNCTION "outbox"\.([a-z_]+)\(')


def _created_functions(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    migration = importlib.import_module("relay.migrations.versions.0005_sql_api")
    executed: list[str] = []
    monkeypatch.setattr(migration, "op", SimpleNamespace(execute=executed.append))
    monkeypatch.setattr(migration, "schema", lambda: '"outbox"')
    migration.upgrade()
    functions: dict[str, str] = {}
    for statement in executed:
        match = _CREATED.search(statement)
        assert match, statement[:80]
        functions.setdefault(match.group(1), "")
        functions[match.group(1)] += statement
    return functions


def test_migration_0005_creates_functions_that_run_the_relay_statements(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    functions = _created_functions(monkeypatch)
    for package, statements in (("relay.sql", RELAY_STATEMENTS), ("control", CONTROL_STATEMENTS)):
        blocks = bind_schema(load_blocks(package, "queries.sql"), "outbox")
        for function, names in statements.items():
            for name in names:
                assert normalized(blocks[name]) in normalized(functions[function]), (
                    f"{function}() no longer runs block {name} of {package}/queries.sql word for word: a change "
                    "to that statement needs a migration that redefines the function (see migration 0005)"
                )


def test_every_function_is_security_invoker_and_dropped_by_the_downgrade(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    functions = _created_functions(monkeypatch)
    migration = importlib.import_module("relay.migrations.versions.0005_sql_api")
    for name, sql in functions.items():
        assert "SECURITY INVOKER" in sql and "SECURITY DEFINER" not in sql, name
    dropped = {signature.partition("(")[0] for signature in migration.SIGNATURES}
    assert dropped == set(functions)
