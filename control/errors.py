"""Domain errors of the control plane and the one table that maps every error to a gRPC status."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import grpc


class ControlError(Exception):
    """An error whose message is safe to return to the caller."""


class InvalidArgument(ControlError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(ControlError):
    pass


class FailedPrecondition(ControlError):
    pass


class Unauthenticated(ControlError):
    pass


class PermissionDenied(ControlError):
    pass


@dataclass(frozen=True)
class Status:
    code: grpc.StatusCode
    # None: the exception's own message is safe to show; otherwise this replaces it so that
    # database internals never reach a caller.
    message: str | None = None


# Looked up along the exception's MRO, so the most specific entry wins.
STATUS_TABLE: dict[type[BaseException], Status] = {
    InvalidArgument: Status(grpc.StatusCode.INVALID_ARGUMENT),
    NotFound: Status(grpc.StatusCode.NOT_FOUND),
    FailedPrecondition: Status(grpc.StatusCode.FAILED_PRECONDITION),
    Unauthenticated: Status(grpc.StatusCode.UNAUTHENTICATED),
    PermissionDenied: Status(grpc.StatusCode.PERMISSION_DENIED),
    TimeoutError: Status(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while waiting for the database"),
    asyncpg.QueryCanceledError: Status(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "the database cancelled the statement: it ran longer than the control plane allows"
        " (OUTBOX_CONTROL_STATEMENT_TIMEOUT) or was cancelled by an operator",
    ),
    asyncpg.IdleInTransactionSessionTimeoutError: Status(
        grpc.StatusCode.UNAVAILABLE, "the database ended an idle transaction; retry"
    ),
    asyncpg.LockNotAvailableError: Status(grpc.StatusCode.ABORTED, "a row is locked by another transaction; retry"),
    asyncpg.DeadlockDetectedError: Status(grpc.StatusCode.ABORTED, "deadlock with another transaction; retry"),
    asyncpg.SerializationError: Status(grpc.StatusCode.ABORTED, "conflict with another transaction; retry"),
    asyncpg.UndefinedTableError: Status(
        grpc.StatusCode.FAILED_PRECONDITION, "the relay schema is missing or not migrated (outbox-relay migrate)"
    ),
    asyncpg.TooManyConnectionsError: Status(grpc.StatusCode.UNAVAILABLE, "the database refuses more connections"),
    asyncpg.CannotConnectNowError: Status(grpc.StatusCode.UNAVAILABLE, "the database is starting or shutting down"),
    asyncpg.PostgresConnectionError: Status(grpc.StatusCode.UNAVAILABLE, "lost the connection to the database"),
    asyncpg.InterfaceError: Status(grpc.StatusCode.UNAVAILABLE, "the database connection is not usable"),
    OSError: Status(grpc.StatusCode.UNAVAILABLE, "cannot reach the database"),
}

# Trailing metadata of an UNAVAILABLE status caused by the database (not the control plane itself).
DATABASE_UNAVAILABLE = ("outbox-unavailable", "database")

_INTERNAL = Status(grpc.StatusCode.INTERNAL, "internal error (see the control plane log)")


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and caller-safe message for `error`; INTERNAL for anything unexpected."""
    for cls in type(error).__mro__:
        status = STATUS_TABLE.get(cls)
        if status is not None:
            return status.code, status.message if status.message is not None else str(error)
    return _INTERNAL.code, _INTERNAL.message or ""


def is_expected(error: BaseException) -> bool:
    """Domain errors are the caller's business; everything else deserves a log line with a traceback."""
    return isinstance(error, ControlError)
