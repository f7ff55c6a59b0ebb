"""The database half of the fault model (relay.faults): which errors are transient, and the
`kind` each is counted under."""

from __future__ import annotations

import asyncpg
import pytest

from relay import store
from relay.faults import TRANSIENT_DB_ERRORS, Fault, classify_db_error, db_error_kind, is_transient_db_error

TRANSIENT = {
    "57014": ("QueryCanceledError", "query_canceled"),  # pg_cancel_backend, statement_timeout
    "55P03": ("LockNotAvailableError", "lock_timeout"),
    "25006": ("ReadOnlySQLTransactionError", "read_only"),
    "57P01": ("AdminShutdownError", "shutdown"),  # pg_terminate_backend, fast shutdown
    "57P02": ("CrashShutdownError", "shutdown"),
    "57P03": ("CannotConnectNowError", "shutdown"),
    "40001": ("SerializationError", "serialization"),
    "40P01": ("DeadlockDetectedError", "deadlock"),
    "53300": ("TooManyConnectionsError", "resources"),
    "08006": ("ConnectionFailureError", "connection"),
    "08003": ("ConnectionDoesNotExistError", "connection"),
    "28P01": ("InvalidPasswordError", "authentication"),  # a rotated password
    "28000": ("InvalidAuthorizationSpecificationError", "authentication"),
    "25P03": ("IdleInTransactionSessionTimeoutError", "idle_timeout"),
}
BROKEN = {
    "42501": "InsufficientPrivilegeError",  # a revoked grant: no retry repairs it
    "42P01": "UndefinedTableError",
    "42703": "UndefinedColumnError",
    "23505": "UniqueViolationError",
    "22P02": "InvalidTextRepresentationError",
    "42601": "PostgresSyntaxError",
}


@pytest.mark.parametrize("sqlstate", sorted(TRANSIENT))
def test_transient_sqlstates(sqlstate: str) -> None:
    name, kind = TRANSIENT[sqlstate]
    exc = getattr(asyncpg.exceptions, name)("boom")
    assert exc.sqlstate == sqlstate
    assert is_transient_db_error(exc)
    assert isinstance(exc, TRANSIENT_DB_ERRORS), "`except TRANSIENT_DB_ERRORS` must catch it too"
    assert classify_db_error(exc) is Fault.DATABASE_TRANSIENT
    assert db_error_kind(exc) == kind


@pytest.mark.parametrize("sqlstate", sorted(BROKEN))
def test_errors_no_retry_repairs_are_broken(sqlstate: str) -> None:
    exc = getattr(asyncpg.exceptions, BROKEN[sqlstate])("boom")
    assert exc.sqlstate == sqlstate
    assert not is_transient_db_error(exc)
    assert classify_db_error(exc) is Fault.BROKEN


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ConnectionResetError("reset"), "connection"),
        (OSError("no route"), "connection"),
        (asyncpg.InterfaceError("connection is closed"), "connection"),
        (TimeoutError(), "timeout"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v,
)
def test_client_side_connection_trouble_is_transient(exc: BaseException, kind: str) -> None:
    assert is_transient_db_error(exc)
    assert db_error_kind(exc) == kind


def test_an_unknown_sqlstate_in_a_transient_class_is_transient() -> None:
    class Odd(Exception):
        sqlstate = "57P99"

    assert is_transient_db_error(Odd())
    assert db_error_kind(Odd()) == "shutdown"


def test_plain_bugs_are_broken() -> None:
    for exc in (ValueError("x"), KeyError("k"), RuntimeError("r")):
        assert not is_transient_db_error(exc)
        assert db_error_kind(exc) == "other"


def test_the_store_re_exports_the_fault_models_tuple() -> None:
    assert store.TRANSIENT_DB_ERRORS is TRANSIENT_DB_ERRORS
