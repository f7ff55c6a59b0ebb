"""Client-side helpers for applications that write to the outbox (and lease their own singleton jobs)."""

from typing import TYPE_CHECKING, Any

from clients.leases import HeldLease, LeaseError, LeaseLost, LeaseUnavailable, lease, lease_sync
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
    "HeldLease",
    "LeaseError",
    "LeaseLost",
    "LeaseUnavailable",
    "OutboxConflictError",
    "OutboxEvent",
    "OutboxValidationError",
    "OutboxWriterError",
    "aenqueue",
    "aenqueue_many",
    "enqueue",
    "enqueue_many",
    "lease",
    "lease_sync",
]

# The control-plane clients (gRPC ControlService); see clients.control for the result types. They are
# loaded on first use (PEP 562), so that applications that only write events never import grpc or protobuf.
_WRITER_NAME_COUNT = len(__all__)
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
_CONTROL_NAMES = frozenset(__all__[_WRITER_NAME_COUNT:])

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name in _CONTROL_NAMES:
        import clients.control

        value = getattr(clients.control, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CONTROL_NAMES))
