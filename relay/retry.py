"""Backoff policies: per event (counts an event's attempts) and per run of consecutive failures
(FailureBackoff: a sink outage, database retries, listener reconnects, supervised restarts)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float
    maximum: float
    multiplier: float = 2.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before attempt `attempt + 1`, with "equal jitter": between half and all of the
        exponential value, so retries of many events spread out instead of arriving together."""
        try:
            exponential = min(self.maximum, self.initial * self.multiplier ** max(attempt - 1, 0))
        except OverflowError:  # e.g. the 1025th failure of a long outage: far past the cap anyway
            exponential = self.maximum
        return exponential / 2 + (rng or random).uniform(0, exponential / 2)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    backoff: Backoff

    def exhausted(self, attempts_so_far: int) -> bool:
        """True when the attempt that just failed was the last one allowed."""
        return attempts_so_far + 1 >= self.max_attempts


class FailureBackoff:
    """The growing pause between consecutive failures of one thing (a sink, the database, the
    listener, a supervised task); reset by the first success."""

    def __init__(self, initial: float = 0.1, maximum: float = 30.0) -> None:
        self._backoff = Backoff(initial, maximum)
        self._failures = 0

    def failed(self) -> float:
        self._failures += 1
        return self._backoff.delay(self._failures)

    def succeeded(self) -> None:
        self._failures = 0

    @property
    def failing(self) -> bool:
        return self._failures > 0
