"""Leases as this process sees them: a row in distributed_locks plus a local trust window.

The window ends a safety margin before the database would let the lease expire, measured from
*before* the acquiring or renewing statement was sent, so a slow round trip or a frozen process
can only shorten it. Once the window closes, nothing is published under the lease."""

from __future__ import annotations

import time
from dataclasses import dataclass

from relay.store import Fence

LEADER = "leader"


def partition_lease(partition: int) -> str:
    return f"partition:{partition}"


@dataclass(slots=True)
class Lease:
    name: str
    holder: str
    token: int
    valid_until: float  # time.monotonic() deadline of the local trust window

    @classmethod
    def granted(cls, name: str, holder: str, token: int, requested_at: float, ttl: float) -> Lease:
        return cls(name, holder, token, requested_at + trust_window(ttl))

    def renewed(self, requested_at: float, ttl: float) -> None:
        self.valid_until = requested_at + trust_window(ttl)

    def remaining(self) -> float:
        return self.valid_until - time.monotonic()

    @property
    def fence(self) -> Fence:
        return Fence(self.name, self.holder, self.token)


def trust_window(ttl: float) -> float:
    """How long after asking we may act on a lease: the TTL minus a margin for clock rate drift
    and scheduling delays (20% of the TTL, at least 0.5 s)."""
    return ttl - max(ttl * 0.2, 0.5)
