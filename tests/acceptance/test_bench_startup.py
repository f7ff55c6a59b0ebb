"""The start-up bench (scenario 7) on the real stack: it times a relay until /readyz says ready,
leaves nothing running, and its baseline client really reaches all three servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.stack import Servers
from bench.startup import raw_client_seconds, relay_ready_seconds
from devtools.embedded import StackEndpoints
from devtools.fleet import Fleet


async def test_a_relay_is_timed_until_ready_then_stopped(fleet: Fleet) -> None:
    seconds = await relay_ready_seconds(fleet, "startup-probe")
    assert seconds > 0
    assert fleet.relays == []


async def test_a_relay_that_cannot_get_ready_is_reported_not_waited_for(fleet: Fleet) -> None:
    fleet.base_env["OUTBOX_KAFKA_ACKS"] = "sometimes"  # exits 2 at once: invalid configuration
    with pytest.raises(RuntimeError, match="exited before it was ready"):
        await relay_ready_seconds(fleet, "startup-broken")
    assert fleet.relays == []


async def test_the_baseline_client_reaches_every_server(stack: StackEndpoints, tmp_path: Path) -> None:
    servers = Servers(stack, None, tmp_path)
    assert await raw_client_seconds(servers) > 0
    unreachable = Servers(StackEndpoints(stack.database_url, "127.0.0.1:1", stack.redis_url), None, tmp_path)
    with pytest.raises(RuntimeError, match="the raw client failed"):
        await raw_client_seconds(unreachable)
