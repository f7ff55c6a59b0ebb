"""Client-side helpers for applications that write to the outbox."""

from clients.writer import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    EnqueueResult,
    OutboxEvent,
    OutboxValidationError,
    aenqueue,
    aenqueue_many,
    enqueue,
    enqueue_many,
)

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "EnqueueResult",
    "OutboxEvent",
    "OutboxValidationError",
    "aenqueue",
    "aenqueue_many",
    "enqueue",
    "enqueue_many",
]
