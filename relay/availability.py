"""Which sinks and topics cannot take events right now, and until when the relay leaves them alone.

A sink outage (broker unreachable, Redis out of memory) or a topic outage (a topic not authorized,
unknown, without a leader) counts no attempt against the events: their rows simply stay in the
outbox. So that they do not sit at the head of every claim and hold back the healthy topics of the
same partitions, claims skip the topics of an outage until its backoff ends; the first claim after
that probes again. Shared by every partition worker of the process, so one outage is learnt once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.retry import Backoff

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Outage:
    since: float
    until: float
    reason: str
    failures: int = 1
    topics: set[str] = field(default_factory=set)  # for a sink: the topics seen waiting on it


class Availability:
    def __init__(
        self, initial: float = 0.1, maximum: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._backoff = Backoff(initial, maximum)
        self._clock = clock
        self._sinks: dict[str, Outage] = {}
        self._topics: dict[str, Outage] = {}
        self._skip: tuple[str, ...] | None = ()
        self._skip_until = float("inf")

    # -- what publishing reports --------------------------------------------------------------

    def unavailable(self, sink: str, topic: str, reason: str, *, topic_scoped: bool) -> None:
        """A publish found `topic` (or all of `sink`) unable to take events."""
        now = self._clock()
        table, name = (self._topics, topic) if topic_scoped else (self._sinks, sink)
        outage = table.get(name)
        if outage is None:
            outage = table[name] = Outage(now, now + self._backoff.delay(1), reason)
            log.warning(
                "%s unavailable: %s (%s); its events wait in the outbox, no attempt counted",
                "topic" if topic_scoped else "sink",
                name,
                reason,
            )
        elif now >= outage.until:  # a probe after the backoff failed again: wait longer
            outage.failures += 1
            outage.until = now + self._backoff.delay(outage.failures)
            outage.reason = reason
            log.warning(
                "%s still unavailable: %s (%s, for %.0fs); next try in %.1fs",
                "topic" if topic_scoped else "sink",
                name,
                reason,
                now - outage.since,
                outage.until - now,
            )
        if not topic_scoped and topic not in outage.topics:
            outage.topics.add(topic)
        self._skip = None

    def available(self, sink: str, topic: str) -> None:
        """A publish to `topic` through `sink` was acknowledged."""
        for table, name in ((self._sinks, sink), (self._topics, topic)):
            outage = table.pop(name, None)
            if outage is not None:
                log.info("%s available again after %.1fs", name, self._clock() - outage.since)
                self._skip = None

    def sink_answers(self, sink: str) -> None:
        """A probe reached `sink` (nothing published): its topics may be claimed again."""
        outage = self._sinks.pop(sink, None)
        if outage is not None:
            log.info("%s answers again after %.1fs", sink, self._clock() - outage.since)
            self._skip = None

    # -- what claiming and health checks ask ----------------------------------------------------

    def blocked(self, sink: str, topic: str) -> bool:
        """True while `topic` or its sink is in an outage's backoff: do not even try to send."""
        now = self._clock()
        for outage in (self._sinks.get(sink), self._topics.get(topic)):
            if outage is not None and now < outage.until:
                if outage is self._sinks.get(sink) and topic not in outage.topics:
                    outage.topics.add(topic)
                    self._skip = None
                return True
        return False

    def skip_topics(self) -> tuple[str, ...]:
        """Topics that claims leave alone for now (cached until the next change or expiry)."""
        now = self._clock()
        if self._skip is None or now >= self._skip_until:
            skip: set[str] = set()
            until = float("inf")
            for outage in self._sinks.values():
                if now < outage.until:
                    skip |= outage.topics
                    until = min(until, outage.until)
            for topic, outage in self._topics.items():
                if now < outage.until:
                    skip.add(topic)
                    until = min(until, outage.until)
            self._skip, self._skip_until = tuple(sorted(skip)), until
        return self._skip

    def next_probe_in(self) -> float | None:
        """Seconds until the earliest backoff ends (None when nothing is backing off)."""
        now = self._clock()
        ends = [o.until for o in (*self._sinks.values(), *self._topics.values()) if o.until > now]
        return min(ends) - now if ends else None

    def sink_down_for(self, sink: str) -> float:
        """How long `sink` has been unavailable without a single success (0 when it is fine)."""
        outage = self._sinks.get(sink)
        return 0.0 if outage is None else self._clock() - outage.since

    def sink_outage_reason(self, sink: str) -> str | None:
        outage = self._sinks.get(sink)
        return None if outage is None else outage.reason
