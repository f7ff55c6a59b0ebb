"""The control client's one exception hierarchy, and the gRPC status code each one stands for."""

from __future__ import annotations

import grpc

__all__ = [
    "ControlError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Unauthenticated",
    "Unavailable",
]


class ControlError(Exception):
    """A control-plane call failed. ``str()`` is the server's message (or the client's, for local
    problems); ``code`` is the gRPC status code when the server or transport gave one."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, method: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.method = method

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class Unavailable(ControlError):
    """The control plane cannot be reached (connection refused, TLS handshake failed, server gone)."""


class DeadlineExceeded(Unavailable):
    """No answer within the call's deadline."""


class Unauthenticated(ControlError):
    """Missing or wrong bearer token."""


class PermissionDenied(ControlError):
    """The token is valid but not allowed to do this (the read token on a mutating call)."""


class InvalidArgument(ControlError):
    """The request (or the client configuration) is invalid; nothing was changed."""


class NotFound(ControlError):
    """The lease, event or dead letter does not exist."""


class FailedPrecondition(ControlError):
    """The state does not allow the call (lease changed hands, event already published, ...)."""


ERRORS: dict[grpc.StatusCode, type[ControlError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}
