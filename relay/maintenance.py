"""Singleton jobs, run only by the instance holding the `leader` lease: retention clean-up in small
batches, housekeeping, and fleet-wide gauges computed once instead of once per instance."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from relay.config import RelaySettings, SettleMode
from relay.store import RelayStore

log = logging.getLogger(__name__)


@dataclass(slots=True)
class FleetGauges:
    """The leader's latest view of the backlog; read by metrics and the demo."""

    backlog: list[tuple[str, int, float]] = field(default_factory=list)  # topic, pending, oldest age (s)
    dead_letters: int = 0

    @property
    def pending(self) -> int:
        return sum(pending for _, pending, _ in self.backlog)

    @property
    def oldest_age(self) -> float:
        return max((age for _, _, age in self.backlog), default=0.0)


class Maintenance:
    def __init__(self, store: RelayStore, settings: RelaySettings, interval: float = 5.0) -> None:
        self._store = store
        self._settings = settings
        self._interval = interval
        self.gauges = FleetGauges()
        self._rounds = 0
        self._topics_seen: set[str] = set()

    @property
    def interval(self) -> float:
        """Seconds between rounds: the coordinator runs `run_once` as a supervised ticker while
        this instance is the leader (relay.supervision logs, counts and retries failures)."""
        return self._interval

    async def run_once(self) -> None:
        if self._settings.settle_mode is SettleMode.RETAIN:
            await self._cleanup_published()
        if self._rounds % 60 == 0:
            await self._store.cleanup_housekeeping()
        self._rounds += 1
        backlog = await self._store.backlog_by_topic()
        # A drained topic reports 0 rather than vanishing, so dashboards and alerts see it recover.
        self._topics_seen.update(topic for topic, _, _ in backlog)
        drained = self._topics_seen - {topic for topic, _, _ in backlog}
        backlog += [(topic, 0, 0.0) for topic in sorted(drained)][:1000]
        self.gauges = FleetGauges(backlog, await self._store.dead_letter_count())

    async def _cleanup_published(self) -> None:
        batch = self._settings.cleanup_batch_size
        for _ in range(100):  # at most 100 small batches a round, with room for the relay path between them
            if await self._store.cleanup_published(self._settings.retention, batch) < batch:
                return
            await asyncio.sleep(0.05)
