"""Client-side helpers for applications that write to the outbox."""

from clients.writer import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    EnqueueResult,
    OutboxConflictError,
    OutboxEvent,
    OutboxValidationError,
    OutboxWriterError,
    aenqueue,
    aenqueue_many,
    enqueue,
    enqueue_many,
)

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "EnqueueResult",
    "OutboxConflictError",
    "OutboxEvent",
    "OutboxValidationError",
    "OutboxWriterError",
    "aenqueue",
    "aenqueue_many",
    "enqueue",
    "enqueue_many",
]

# The control-plane clients (gRPC ControlService); see clients.control for the result types.
from clients.control import (
    AsyncControlClient,
    ControlClient,
    ControlError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

__all__ += [
    "AsyncControlClient",
    "ControlClient",
    "ControlError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Unauthenticated",
    "Unavailable",
]
