"""clients.leases without a database: argument checks, and the module stays as light as the writer."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from clients import leases

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["leader", "partition:0", "partition:", "partition:abc", "", " x", "x ", "a\x00b", "x" * 201])
def test_reserved_and_bad_names_raise_value_error(name: str) -> None:
    with pytest.raises(ValueError):
        leases.lease(object(), name)
    with pytest.raises(ValueError):
        leases.lease_sync(lambda: None, name)


@pytest.mark.parametrize("name", ["reconcile-invoices", "leaders", "Leader", "partitions:0", "job:partition:1"])
def test_other_names_are_allowed(name: str) -> None:
    assert leases.lease(object(), name).held is None


def test_the_psycopg_statements_have_the_same_parameters_in_order() -> None:
    for statement in (leases._ACQUIRE, leases._RENEW, leases._RELEASE, leases._CURRENT):
        numbers = [int(n) for n in re.findall(r"\$(\d+)", statement)]
        assert numbers == list(range(1, len(numbers) + 1)), statement
        assert "$" not in leases._psycopg(statement)


def test_importing_leases_loads_no_driver_grpc_or_relay() -> None:
    probe = "import sys, clients.leases, clients; print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT)}).stdout
    for heavy in ("'asyncpg'", "'psycopg'", "'grpc'", "'relay'", "'control'", "'opentelemetry.metrics'"):
        assert heavy not in out, heavy
