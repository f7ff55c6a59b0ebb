"""Whether this instance's own sinks work: what it reports in its heartbeat and on /readyz.

An instance is *unhealthy* while one of its sinks has been unavailable, without a single success,
for longer than OUTBOX_SINK_HANDOVER_AFTER (0: never). The coordinator reports that in the
heartbeat, and the partitions are then split over the healthy instances only (see
`relay.coordinator.fair_share`): an instance that alone lost its broker hands its partitions over
instead of sitting on them. The outage itself is learnt by publishing (relay.availability); an
instance that handed everything over publishes nothing, so it probes its down sinks instead."""

from __future__ import annotations

from relay.sinks.base import Sink
from relay.sinks.router import Router


class SinkHealth:
    def __init__(self, router: Router, handover_after: float) -> None:
        self._router = router
        self.handover_after = handover_after

    def outages(self) -> dict[str, str]:
        """Every sink in an outage now, however short: kind -> 'unavailable for 12s (reason)'."""
        availability = self._router.availability
        found = {}
        for kind in sorted(k.value for k in self._router.sinks):
            down = availability.sink_down_for(kind)
            if down > 0:
                reason = availability.sink_outage_reason(kind) or "unknown"
                found[kind] = f"unavailable for {down:.0f}s ({reason})"
        return found

    def unhealthy_sinks(self) -> dict[str, str]:
        """The sinks down for longer than the handover delay (none when the handover is disabled)."""
        if self.handover_after <= 0:
            return {}
        availability = self._router.availability
        return {
            kind: text
            for kind, text in self.outages().items()
            if availability.sink_down_for(kind) > self.handover_after
        }

    def unhealthy_reason(self) -> str | None:
        """What the heartbeat records: None when healthy."""
        sinks = self.unhealthy_sinks()
        return "; ".join(f"sink {kind} {text}" for kind, text in sinks.items()) or None

    @staticmethod
    def not_connected_reason(sink: Sink) -> str:
        """/readyz's reason for a sink that is not connected: why connecting fails when that is not
        the network (wrong credentials, TLS, an unsupported broker), which no retry will fix."""
        error = sink.connection.error
        return f"cannot connect: {error}" if error else "not connected"

    async def probe(self) -> bool:
        """Asks the sinks in an outage whether they answer again (clearing the outages of those
        that do); True when none is in an outage any more."""
        await self._router.probe_down_sinks()
        return not self.outages()
