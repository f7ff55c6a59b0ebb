"""Singleton jobs, run only by the instance holding the `leader` lease: retention clean-up in small
batches (published rows in retain mode; audit_log, replay records and dead letters past their
OUTBOX_*_RETENTION), housekeeping, and fleet-wide gauges computed once instead of once per instance."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import asyncpg

from relay.config import RelaySettings, SettleMode
from relay.store import RelayStore

log = logging.getLogger(__name__)

# Rounds between two retention passes over the control tables (one a minute at the 5 s interval):
# their rows expire by the day, so looking more often would only cost index probes.
RETENTION_EVERY = 12
# Statements per table and pass at most; what is left goes in the next pass.
RETENTION_MAX_BATCHES = 100
# Seconds a table is left alone after its DELETE was refused for lack of privilege (the least-privilege
# relay role of docs/grants.sql has none on these tables): one warning an hour, not one a minute.
RETENTION_DENIED_PAUSE = 3600.0


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
        self._denied: dict[str, float] = {}  # table -> monotonic time its clean-up was refused

    @property
    def interval(self) -> float:
        """Seconds between rounds: the coordinator runs `run_once` as a supervised ticker while
        this instance is the leader (relay.supervision logs, counts and retries failures)."""
        return self._interval

    async def run_once(self) -> None:
        if self._settings.settle_mode is SettleMode.RETAIN:
            await self._cleanup_published()
        if self._rounds % RETENTION_EVERY == 0:
            await self.run_retention()
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

    def retention_plan(self) -> list[tuple[str, int]]:
        """(queries.sql block suffix, seconds kept) for each control table with a retention; 0 keeps
        forever. Dead letters go before the replay records, which are kept while their dead letter is."""
        settings = self._settings
        plan = [
            ("audit", settings.audit_retention),
            ("dead_letters", settings.dead_letter_retention),
            ("replay_log", settings.replay_log_retention),
            ("replay_requests", settings.replay_log_retention),
        ]
        return [(table, seconds) for table, seconds in plan if seconds > 0]

    async def run_retention(self) -> dict[str, int]:
        """Deletes expired rows of the control tables in batches of OUTBOX_CLEANUP_BATCH_SIZE, each
        its own short statement (no long transaction, and the relay path's queries run between them).
        Returns the rows deleted per table."""
        batch = self._settings.cleanup_batch_size
        deleted: dict[str, int] = {}
        for table, seconds in self.retention_plan():
            refused = self._denied.get(table)
            if refused is not None and time.monotonic() - refused < RETENTION_DENIED_PAUSE:
                continue
            total = 0
            try:
                for _ in range(RETENTION_MAX_BATCHES):
                    count = await self._store.cleanup_expired(table, seconds, batch)
                    total += count
                    if count < batch:
                        break
                    await asyncio.sleep(0.05)
            except asyncpg.InsufficientPrivilegeError:
                self._denied[table] = time.monotonic()
                log.warning(
                    "retention of %s skipped: this relay's database role may not DELETE there; grant it"
                    " (docs/database.md#retention) or set its OUTBOX_*_RETENTION to 0. Retrying in an hour.",
                    table,
                    extra={"table": table},
                )
                continue
            self._denied.pop(table, None)
            if total:
                log.info("retention: deleted %d expired %s rows", total, table, extra={"table": table, "rows": total})
            deleted[table] = total
        return deleted
