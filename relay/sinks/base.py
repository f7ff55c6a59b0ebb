"""What the relay needs of a broker: publish a batch and say, per event, what happened."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from relay.events import OutboxRow, PublishResult

MESSAGE_ID_HEADER = "message-id"


class SinkUnavailableError(Exception):
    """The broker cannot be reached; nothing of the batch is known to be published."""


class Sink(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, rows: Sequence[OutboxRow]) -> list[PublishResult]:
        """One result per row, in order, after the broker acknowledged what it accepted.
        Raises SinkUnavailableError when the broker cannot be reached at all."""
        ...

    async def publish_dead_letter(self, row: OutboxRow, reason: str) -> None:
        """Best effort copy of a dead letter to '<topic>.dlq'."""
        ...

    def is_connected(self) -> bool: ...
