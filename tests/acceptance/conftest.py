from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.embedded import StackEndpoints
from devtools.fleet import Fleet, relay_env, unique_name


@pytest.fixture
def topics(stack: StackEndpoints) -> dict[str, str]:
    """A fresh Kafka topic and Redis stream per test, routed by OUTBOX_ROUTES."""
    return {"kafka": unique_name("kt."), "redis": unique_name("rt.")}


@pytest.fixture
def fleet(stack: StackEndpoints, schema: str, tmp_path: Path) -> Iterator[Fleet]:
    env = relay_env(
        stack.database_url, schema, stack.kafka_bootstrap, stack.redis_url, OUTBOX_ROUTES="rt.*=redis"
    )
    fleet = Fleet(stack.database_url, schema, tmp_path, env)
    try:
        yield fleet
    finally:
        fleet.stop_all()
