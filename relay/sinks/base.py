"""What the relay needs of a broker: publish a batch and say, per event, what happened."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from relay.events import OutboxRow, PublishResult

MESSAGE_ID_HEADER = "message-id"


class SinkUnavailableError(Exception):
    """The broker cannot take the batch (unreachable, or refusing writes for a reason that is its
    own); nothing of the batch is known to be published."""


class Sink(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, rows: Sequence[OutboxRow]) -> list[PublishResult]:
        """One result per row, in order, after the broker acknowledged what it accepted.
        Raises SinkUnavailableError when the broker cannot be reached at all."""
        ...

    async def publish_dead_letters(self, letters: Sequence[tuple[OutboxRow, str]]) -> None:
        """Copies dead letters to '<topic>.dlq' (best effort: the archive is the record)."""
        ...

    def is_connected(self) -> bool: ...

    async def probe(self) -> bool:
        """True when the broker answers now (a cheap round trip, no event sent)."""
        ...
