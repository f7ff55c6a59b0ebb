"""Routing: the writer names a topic; configuration decides which sink carries it."""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from relay.config import RelaySettings, SinkKind
from relay.events import OutboxRow, Outcome, PublishResult
from relay.sinks.base import Sink, SinkUnavailableError


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
    def __init__(self, routes: Sequence[Route], default: SinkKind, sinks: Mapping[SinkKind, Sink]) -> None:
        self._routes = list(routes)
        self._default = default
        self._sinks = dict(sinks)
        self._cache: dict[str, SinkKind] = {}

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

    def sink_for(self, topic: str) -> Sink:
        return self._sinks[self.sink_kind_for(topic)]

    async def publish(self, rows: Sequence[OutboxRow]) -> list[PublishResult]:
        """Publishes each row to its sink, sinks in parallel; one result per row, in order."""
        groups: dict[SinkKind, list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(self.sink_kind_for(row.topic), []).append(index)
        outcomes = await asyncio.gather(
            *(self._publish_group(kind, [rows[i] for i in indexes]) for kind, indexes in groups.items())
        )
        results: list[PublishResult] = [PublishResult(Outcome.UNAVAILABLE)] * len(rows)
        for indexes, group_results in zip(groups.values(), outcomes, strict=True):
            for index, result in zip(indexes, group_results, strict=True):
                results[index] = result
        return results

    async def _publish_group(self, kind: SinkKind, rows: list[OutboxRow]) -> list[PublishResult]:
        try:
            return await self._sinks[kind].publish(rows)
        except SinkUnavailableError as exc:
            return [PublishResult(Outcome.UNAVAILABLE, "broker_unavailable", str(exc))] * len(rows)
