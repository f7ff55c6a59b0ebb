"""Routing: the writer names a topic; configuration decides which sink carries it."""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from relay.availability import Availability
from relay.config import RelaySettings, SinkKind
from relay.events import OutboxRow, Outcome, PublishResult
from relay.sinks.base import Sink, SinkUnavailableError

log = logging.getLogger(__name__)

# Dead-letter copies waiting to be sent; past this many the newest are dropped (the archive row
# stays the record of a dead letter: the copy is a courtesy that must never hold up publishing).
DLQ_PENDING_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class Route:
    pattern: str
    sink: SinkKind


def parse_routes(spec: str) -> list[Route]:
    """`orders.*=kafka,notify.*=redis` -> routes, in order (first match wins)."""
    routes: list[Route] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        pattern, sep, sink = item.partition("=")
        if not sep or not pattern.strip():
            raise ValueError(f"OUTBOX_ROUTES item {item!r} must look like pattern=sink")
        try:
            routes.append(Route(pattern.strip(), SinkKind(sink.strip().lower())))
        except ValueError:
            raise ValueError(f"OUTBOX_ROUTES item {item!r}: sink must be one of kafka, redis") from None
    return routes


class Router:
    def __init__(
        self,
        routes: Sequence[Route],
        default: SinkKind,
        sinks: Mapping[SinkKind, Sink],
        availability: Availability | None = None,
    ) -> None:
        self._routes = list(routes)
        self._default = default
        self._sinks = dict(sinks)
        self._cache: dict[str, SinkKind] = {}
        self.availability = availability or Availability()
        self._dlq_tasks: set[asyncio.Task[None]] = set()
        self._dlq_pending = 0

    @classmethod
    def needed_sinks(cls, settings: RelaySettings) -> set[SinkKind]:
        return {settings.default_sink} | {route.sink for route in parse_routes(settings.routes)}

    @property
    def sinks(self) -> Mapping[SinkKind, Sink]:
        return self._sinks

    def sink_kind_for(self, topic: str) -> SinkKind:
        kind = self._cache.get(topic)
        if kind is None:
            kind = next(
                (r.sink for r in self._routes if fnmatch.fnmatchcase(topic, r.pattern)), self._default
            )
            if len(self._cache) < 100_000:
                self._cache[topic] = kind
        return kind

    def destination(self, row: OutboxRow) -> tuple[str, str, int | None]:
        """Where `row` goes, for its span: the sink kind, the destination's name and its partition
        (None when unknown: a keyless event, a topic whose metadata has not arrived)."""
        kind = self.sink_kind_for(row.topic)
        name, partition = self._sinks[kind].destination(row)
        return kind.value, name, partition

    async def publish(self, rows: Sequence[OutboxRow]) -> list[PublishResult]:
        """Publishes each row to its sink, sinks in parallel; one result per row, in order. Rows
        whose sink or topic is backing off from an outage are not sent (UNAVAILABLE at once)."""
        groups: dict[SinkKind, list[int]] = {}
        results: list[PublishResult] = [_BACKING_OFF] * len(rows)
        for index, row in enumerate(rows):
            kind = self.sink_kind_for(row.topic)
            if not self.availability.blocked(kind.value, row.topic):
                groups.setdefault(kind, []).append(index)
        if len(groups) == 1:  # the usual case: no task to run it beside another sink's
            ((kind, indexes),) = groups.items()
            outcomes = [await self._publish_group(kind, [rows[i] for i in indexes])]
        else:
            outcomes = await asyncio.gather(
                *(self._publish_group(kind, [rows[i] for i in indexes]) for kind, indexes in groups.items())
            )
        for (kind, indexes), group_results in zip(groups.items(), outcomes, strict=True):
            for index, result in zip(indexes, group_results, strict=True):
                results[index] = result
            self._learn(kind, [rows[i] for i in indexes], group_results)
        return results

    def _learn(self, kind: SinkKind, rows: Sequence[OutboxRow], results: Sequence[PublishResult]) -> None:
        """Tells the availability tracker what this publish showed, once per topic."""
        seen: set[str] = set()
        for row, result in zip(rows, results, strict=True):
            if row.topic in seen:
                continue
            if result.ok:
                self.availability.available(kind.value, row.topic)
                seen.add(row.topic)
            elif result.outcome is Outcome.UNAVAILABLE:
                self.availability.unavailable(
                    kind.value, row.topic, result.reason, topic_scoped=result.topic_scoped
                )
                seen.add(row.topic)

    async def _publish_group(self, kind: SinkKind, rows: list[OutboxRow]) -> list[PublishResult]:
        try:
            return await self._sinks[kind].publish(rows)
        except SinkUnavailableError as exc:
            return [PublishResult(Outcome.UNAVAILABLE, "broker_unavailable", str(exc))] * len(rows)

    async def probe_down_sinks(self) -> None:
        """Asks each sink that is in an outage whether it answers again, and clears the outage if
        so. For an instance that handed its partitions over, and so publishes nothing to learn from."""
        for kind, sink in self._sinks.items():
            if self.availability.sink_down_for(kind.value) > 0 and await sink.probe():
                self.availability.sink_answers(kind.value)

    def copy_dead_letters(self, letters: Sequence[tuple[OutboxRow, str]]) -> None:
        """Sends copies to '<topic>.dlq' in the background, in one batch per sink."""
        if self._dlq_pending + len(letters) > DLQ_PENDING_LIMIT:
            log.warning("dead-letter copies backed up; %s not copied (they stay in the archive)", len(letters))
            return
        groups: dict[SinkKind, list[tuple[OutboxRow, str]]] = {}
        for row, reason in letters:
            groups.setdefault(self.sink_kind_for(row.topic), []).append((row, reason))
        for kind, group in groups.items():
            self._dlq_pending += len(group)
            task = asyncio.create_task(self._copy(kind, group), name=f"dlq-copy-{kind.value}")
            self._dlq_tasks.add(task)
            task.add_done_callback(self._dlq_tasks.discard)

    async def _copy(self, kind: SinkKind, letters: list[tuple[OutboxRow, str]]) -> None:
        try:
            await asyncio.wait_for(self._sinks[kind].publish_dead_letters(letters), timeout=60)
        except Exception as exc:  # the archive row is the record; the DLQ copy is a courtesy
            log.warning("could not copy %s dead letters to '<topic>.dlq': %s", len(letters), exc)
        finally:
            self._dlq_pending -= len(letters)

    async def stop(self) -> None:
        """Waits briefly for dead-letter copies still on their way."""
        if self._dlq_tasks:
            await asyncio.wait(set(self._dlq_tasks), timeout=5)


_BACKING_OFF = PublishResult(Outcome.UNAVAILABLE, "backing_off", "the sink or topic is backing off from an outage")
