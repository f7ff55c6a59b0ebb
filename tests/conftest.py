"""Shared fixtures: one real stack per session (embedded, or external servers named by env vars),
and a freshly migrated schema per test so tests never see each other's rows."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from pydantic import SecretStr

from devtools.embedded import StackEndpoints, external_or_embedded
from relay import migrate
from relay.config import DatabaseSettings


@pytest.fixture(scope="session")
def stack() -> Iterator[StackEndpoints]:
    """Real PostgreSQL, Kafka-API broker and Redis. Set OUTBOX_TEST_DATABASE_URL,
    OUTBOX_TEST_KAFKA_BOOTSTRAP or OUTBOX_TEST_REDIS_URL to use external servers instead."""
    endpoints, embedded = external_or_embedded("OUTBOX_TEST_")
    try:
        yield endpoints
    finally:
        if embedded is not None:
            embedded.stop()


@pytest.fixture
def database_url(stack: StackEndpoints) -> str:
    return stack.database_url


def settings_for(database_url: str, schema: str) -> DatabaseSettings:
    return DatabaseSettings(database_url=SecretStr(database_url), schema_name=schema)


@pytest.fixture
def schema(database_url: str) -> Iterator[str]:
    """A new schema, migrated to head, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    migrate.upgrade(settings_for(database_url, name))
    try:
        yield name
    finally:
        _drop_schema(database_url, name)


def _drop_schema(database_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()
