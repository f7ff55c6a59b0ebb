"""What the relay needs of a broker: publish a batch and say, per event, what happened."""

from __future__ import annotations

import logging
import ssl
from collections import Counter
from collections.abc import Sequence
from enum import StrEnum
from typing import Protocol

from relay.events import OutboxRow, PublishResult
from relay.shared.redaction import redact

MESSAGE_ID_HEADER = "message-id"
log = logging.getLogger(__name__)


class ConnectFailure(StrEnum):
    """Why connecting to a broker failed: the `kind` label of outbox_sink_connect_failures_total.
    Only `network` is expected to heal by itself; the others need an operator (credentials,
    certificates, a broker version or feature, a setting)."""

    NETWORK = "network"
    AUTHENTICATION = "authentication"
    TLS = "tls"
    UNSUPPORTED = "unsupported"
    OTHER = "other"


class ConnectState:
    """How connecting to one broker goes: failures counted by kind, and the last failure that is not
    the network's, so that /readyz and the log say "cannot connect: SASL authentication failed"
    instead of "not connected yet" for as long as the relay runs."""

    def __init__(self, sink: str, logger: logging.Logger | None = None) -> None:
        self.sink = sink
        self._log = logger or log
        self.failures: Counter[str] = Counter({kind.value: 0 for kind in ConnectFailure})
        self.error: str | None = None  # the last non-network failure; None once connected

    def failed(self, kind: ConnectFailure, detail: str, retry_in: float | None = None) -> None:
        detail = redact(detail)
        self.failures[kind.value] += 1
        retry = f"; retrying in {retry_in:.1f}s" if retry_in is not None else ""
        if kind is ConnectFailure.NETWORK:
            self.error = None
            self._log.warning("%s not reachable yet (%s)%s", self.sink, detail, retry)
        else:
            self.error = f"{kind.value}: {detail}"
            self._log.error(
                "cannot connect to %s: %s (%s; a retry will not help until it is fixed)%s",
                self.sink,
                detail,
                kind.value,
                retry,
                extra={"sink": self.sink, "connect_failure": kind.value},
            )

    def connected(self) -> None:
        if self.error is not None:
            self._log.info("connected to %s (the earlier failure is gone)", self.sink)
        self.error = None


def is_tls_error(exc: BaseException) -> bool:
    """An error of the TLS handshake or certificates, also when wrapped (`raise ... from`)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError | ssl.CertificateError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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

    def destination(self, row: OutboxRow) -> tuple[str, int | None]:
        """Where `row` goes: the destination's name (topic, stream) and its partition when known."""
        ...

    @property
    def connection(self) -> ConnectState:
        """How connecting goes (failures by kind, the last one that is not the network's)."""
        ...

    async def probe(self) -> bool:
        """True when the broker answers now (a cheap round trip, no event sent)."""
        ...
