"""`outbox-relay demo`: the whole system on one machine, with live progress.

Starts the embedded stack, migrates, runs relay instances (orders.* -> Kafka, notify.* -> Redis),
writes demo events in real committed transactions, runs one inbox consumer of orders.* (a billing
handler writing an invoice per order, effectively once; now and then a few orders are published
again, as after a relay crash, and the inbox skips them), and shows the flow until everything is
published and billed."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
from pydantic import SecretStr
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from clients.consumers import ConsumerSettings, KafkaInboxConsumer, kafka_subscription
from clients.inbox import AsyncInbox, InboxMessage, InboxOutcome, InboxResult
from clients.writer import OutboxEvent, aenqueue_many
from control.server import ControlServer, ControlSettings
from devtools.embedded import EmbeddedStack, free_port
from relay import migrate
from relay.config import RelaySettings
from relay.service import RelayService

log = logging.getLogger(__name__)
SCHEMA = "outbox"


@dataclass
class Progress:
    written: int = 0
    pending: int = 0
    oldest_age: float = 0.0
    dead_letters: int = 0
    started: float = 0.0
    orders_written: int = 0
    processed: int = 0  # by the inbox consumer: handler committed with the processed mark
    duplicates: int = 0  # redeliveries the inbox skipped
    redelivered: int = 0  # copies the demo published again (as after a relay crash)
    invoices: int = 0  # the handler's business rows

    @property
    def published(self) -> int:
        return self.written - self.pending - self.dead_letters


def relay_settings(
    stack_urls: tuple[str, str, str], instance: int, control_addr: str | None = None
) -> RelaySettings:
    database_url, kafka, redis_url = stack_urls
    return RelaySettings(
        database_url=SecretStr(database_url),
        schema_name=SCHEMA,
        instance_id=f"demo-relay-{instance}",
        kafka_bootstrap=kafka,
        redis_url=SecretStr(redis_url),
        routes="orders.*=kafka,notify.*=redis",
        lease_ttl=5.0,
        shutdown_grace=5.0,
        control_addr=control_addr,
    )


async def write_events(pool: asyncpg.Pool, progress: Progress, rate: int, stop: asyncio.Event) -> None:
    """Each tick commits one transaction holding a business row's worth of events."""
    tick = 0.05
    per_tick = max(1, int(rate * tick))
    counter = itertools.count()
    while not stop.is_set():
        started = time.monotonic()
        events = []
        for _ in range(per_tick):
            n = next(counter)
            topic = "orders.created" if n % 3 else "notify.email"
            key = f"customer-{random.randrange(200)}"
            events.append(OutboxEvent(topic=topic, key=key, payload={"n": n, "customer": key}))
        async with pool.acquire() as conn, conn.transaction():
            await aenqueue_many(conn, events, schema=SCHEMA)
        progress.written += len(events)
        progress.orders_written += sum(event.topic == "orders.created" for event in events)
        await asyncio.sleep(max(0.0, tick - (time.monotonic() - started)))


async def observe(pool: asyncpg.Pool, progress: Progress) -> list[tuple[str, str, str]]:
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            f"SELECT (SELECT count(*) FROM {SCHEMA}.outbox) AS pending,"
            f" (SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM {SCHEMA}.outbox) AS age,"
            f" (SELECT count(*) FROM {SCHEMA}.dead_letter_archive) AS dead,"
            f" (SELECT count(*) FROM {SCHEMA}.demo_invoices) AS invoices"
        )
        leases = await conn.fetch(
            f"SELECT holder, count(*) FILTER (WHERE name LIKE 'partition:%') AS partitions,"
            f" bool_or(name = 'leader') AS leader FROM {SCHEMA}.distributed_locks"
            " WHERE holder IS NOT NULL AND expires_at > now() GROUP BY holder ORDER BY holder"
        )
    progress.pending, progress.oldest_age, progress.dead_letters = row["pending"], row["age"], row["dead"]
    progress.invoices = row["invoices"]
    return [(r["holder"], str(r["partitions"]), "yes" if r["leader"] else "") for r in leases]


def render(progress: Progress, holders: list[tuple[str, str, str]], phase: str) -> Group:
    elapsed = max(time.monotonic() - progress.started, 1e-9)
    flow = Table(title=f"Outbox Relay demo: {phase}", show_header=True)
    for column in ("elapsed", "written", "published", "pending", "oldest pending", "dead letters", "rate"):
        flow.add_column(column, justify="right")
    flow.add_row(
        f"{elapsed:.0f}s",
        f"{progress.written:,}",
        f"{progress.published:,}",
        f"{progress.pending:,}",
        f"{progress.oldest_age * 1000:.0f} ms",
        f"{progress.dead_letters:,}",
        f"{progress.published / elapsed:,.0f}/s",
    )
    inbox = Table(title="Inbox consumer (group demo-billing, orders.* on Kafka)", show_header=True)
    for column in ("orders written", "processed", "redelivered copies", "duplicates skipped", "invoices"):
        inbox.add_column(column, justify="right")
    inbox.add_row(
        f"{progress.orders_written:,}",
        f"{progress.processed:,}",
        f"{progress.redelivered:,}",
        f"{progress.duplicates:,}",
        f"{progress.invoices:,}",
    )
    leases = Table(title="Leases (distributed_locks)")
    for column in ("instance", "partitions", "leader"):
        leases.add_column(column)
    for holder in holders:
        leases.add_row(*holder)
    return Group(flow, inbox, leases)


class CountingInbox(AsyncInbox):
    """The inbox, tallying outcomes for the progress display and keeping the last messages it
    processed (the demo publishes some of them again, as a relay crash would)."""

    def __init__(self, progress: Progress) -> None:
        super().__init__("demo-billing", schema=SCHEMA, lock_stale_threshold=30.0)
        self.progress = progress
        self.recent: list[InboxMessage] = []

    async def process(self, conn: Any, message: InboxMessage, handler: Any) -> InboxResult:
        result = await super().process(conn, message, handler)
        if result.outcome is InboxOutcome.PROCESSED:
            self.progress.processed += 1
            self.recent = [*self.recent[-49:], message]
        elif result.outcome is InboxOutcome.DUPLICATE:
            self.progress.duplicates += 1
        return result


async def bill(conn: Any, message: InboxMessage) -> None:
    """The demo handler: one invoice per order, in the inbox's transaction (a second one for the same
    message would violate the primary key: effectively once is checked, not assumed)."""
    order = json.loads(message.payload)
    await conn.execute(
        f"INSERT INTO {SCHEMA}.demo_invoices (message_id, customer, n) VALUES ($1, $2, $3)",
        message.message_id, order["customer"], order["n"],
    )


async def redeliver(bootstrap: str, inbox: CountingInbox, progress: Progress, stop: asyncio.Event) -> None:
    """Every 2 s, publishes the last few processed orders again with their message-id: the copies a
    relay crash would cause. The inbox skips them."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)
            for message in inbox.recent[-5:]:
                headers = [(name, value.encode()) for name, value in message.headers.items()]
                headers.append(("message-id", message.message_id.encode()))
                key = message.key.encode() if message.key is not None else None
                await producer.send_and_wait(message.topic, message.payload, key=key, headers=headers)
                progress.redelivered += 1
    finally:
        await producer.stop()


async def run_demo(duration: float, rate: int, instances: int) -> int:
    console = Console()
    with EmbeddedStack() as stack:
        console.print("[bold]Starting PostgreSQL, the Kafka-API broker and Redis...[/]")
        urls = stack.start()
        settings = relay_settings((urls.database_url, urls.kafka_bootstrap, urls.redis_url), 0)
        await asyncio.to_thread(migrate.upgrade, settings)
        setup = await asyncpg.connect(urls.database_url)
        try:
            await setup.execute(
                f"CREATE TABLE IF NOT EXISTS {SCHEMA}.demo_invoices"
                " (message_id text PRIMARY KEY, customer text NOT NULL, n bigint NOT NULL)"
            )
        finally:
            await setup.close()
        console.print(
            f"Schema {SCHEMA!r} migrated. Kafka at {urls.kafka_bootstrap}, Redis at {urls.redis_url}."
        )
        stack_urls = (urls.database_url, urls.kafka_bootstrap, urls.redis_url)
        control_addr = f"127.0.0.1:{free_port()}"
        relays = [
            RelayService(relay_settings(stack_urls, i, control_addr if i == 0 else None))
            for i in range(instances)
        ]
        for relay in relays[:1]:  # the control plane inside the first relay, wired as outbox_relay.cli wires it
            relay.attach(ControlServer(ControlSettings(addr=control_addr), relay.settings, meter=relay.meter))
        for relay in relays:
            await relay.start()
        console.print(f"Control plane at {control_addr}: try `outboxctl --addr {control_addr} status`.")
        pool = await asyncpg.create_pool(urls.database_url, min_size=1, max_size=4)
        progress = Progress(started=time.monotonic())
        stop_writing = asyncio.Event()
        writer = asyncio.create_task(write_events(pool, progress, rate, stop_writing))
        inbox = CountingInbox(progress)
        consumer_settings = ConsumerSettings(
            database_url=SecretStr(urls.database_url), schema_name=SCHEMA, kafka_bootstrap=urls.kafka_bootstrap,
            kafka_metadata_max_age=2.0,
        )
        _topics, pattern = kafka_subscription("orders.*")
        consumer = KafkaInboxConsumer(consumer_settings, group="demo-billing", handler=bill, pattern=pattern,
                                      inbox=inbox)
        consuming = asyncio.create_task(consumer.run())
        stop_redelivering = asyncio.Event()
        redelivering = asyncio.create_task(redeliver(urls.kafka_bootstrap, inbox, progress, stop_redelivering))
        try:
            ok = await _show(console, pool, progress, duration, stop_writing)
        finally:
            stop_writing.set()
            stop_redelivering.set()
            with contextlib.suppress(Exception):
                await writer
            try:
                await redelivering
            except Exception:
                log.warning("the demo's redeliveries failed", exc_info=True)
            consumer.request_stop()
            with contextlib.suppress(Exception):
                await consuming
            for relay in relays:
                await relay.stop()
            await pool.close()
    summary = {
        "written": progress.written,
        "published": progress.published,
        "dead_letters": progress.dead_letters,
        "orders": progress.orders_written,
        "processed": progress.processed,
        "duplicates_skipped": progress.duplicates,
        "invoices": progress.invoices,
    }
    console.print()
    console.print(json.dumps(summary))
    console.print(
        "[green]All events published, every order billed once.[/]"
        if ok
        else "[red]Some events were not published or billed.[/]"
    )
    return 0 if ok else 1


async def _show(
    console: Console, pool: asyncpg.Pool, progress: Progress, duration: float, stop: asyncio.Event
) -> bool:
    deadline = time.monotonic() + duration if duration > 0 else float("inf")
    with Live(console=console, refresh_per_second=4) as live:
        try:
            while time.monotonic() < deadline:
                live.update(render(progress, await observe(pool, progress), "writing"))
                await asyncio.sleep(0.5)
        except (KeyboardInterrupt, asyncio.CancelledError):
            pass
        stop.set()
        drain_deadline = time.monotonic() + 60
        while time.monotonic() < drain_deadline:
            holders = await observe(pool, progress)
            live.update(render(progress, holders, "draining"))
            billed = progress.invoices == progress.orders_written
            if progress.pending == 0 and billed and (progress.duplicates or not progress.redelivered):
                live.update(render(progress, holders, "done"))
                return True
            await asyncio.sleep(0.5)
    return False
