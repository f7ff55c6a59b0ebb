"""What every peer runner shares: the command line, the environment, the workload and the output.

    python -m bench.peers.<peer>_runner setup                  # the peer's own table (its documented DDL)
    python -m bench.peers.<peer>_runner relay                  # its relay until SIGTERM; prints {"ready": true}
    python -m bench.peers.<peer>_runner backlog COUNT SIZE     # COUNT events in one transaction
    python -m bench.peers.<peer>_runner write RATE SECONDS TASKS [WARM]  # open-loop single-event commits

Environment: PEER_DSN (postgresql://...), PEER_BOOTSTRAP (Kafka), PEER_TOPIC, PEER_SCHEMA (a fresh
schema the harness created and drops). Every command prints one JSON object on its last stdout line.
Events are the bench's own (bench.workload): payload n of `size` bytes (or with the wall-clock time for
`write`), key `k<n % 1000>`, header content-type: application/json. `write` also reports how long the
writer's own commits took (commit_p50_ms, commit_p99_ms), events before WARM left out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from bench import workload
from bench.pacing import paced
from bench.stats import latency_summary

Send = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class Env:
    dsn: str
    bootstrap: str
    topic: str
    schema: str

    @classmethod
    def from_environ(cls) -> Env:
        missing = [
            n for n in ("PEER_DSN", "PEER_BOOTSTRAP", "PEER_TOPIC", "PEER_SCHEMA") if not os.environ.get(n)
        ]
        if missing:
            raise SystemExit(f"missing environment: {', '.join(missing)}")
        schema = os.environ["PEER_SCHEMA"]
        if not schema.isidentifier():
            raise SystemExit(f"PEER_SCHEMA must be a plain identifier, not {schema!r}")
        return cls(os.environ["PEER_DSN"], os.environ["PEER_BOOTSTRAP"], os.environ["PEER_TOPIC"], schema)

    def sqlalchemy_url(self) -> str:
        """The DSN for SQLAlchemy's asyncpg dialect."""
        dsn = self.dsn
        for prefix in ("postgresql://", "postgres://"):
            if dsn.startswith(prefix):
                return "postgresql+asyncpg://" + dsn[len(prefix) :]
        return dsn


class Peer(Protocol):
    """One peer, set up the way its own documentation says."""

    async def setup(self) -> None: ...

    async def relay(self, ready: Callable[[], None], stop: asyncio.Event) -> None: ...

    async def backlog(self, count: int, size: int) -> float:
        """Writes `count` events in one transaction; returns the wall-clock time its commit returned."""
        ...

    def writer(self, tasks: int) -> contextlib.AbstractAsyncContextManager[Send]: ...


def event(n: int, size: int, timed: bool) -> tuple[str, bytes]:
    """(key, payload) of event n: the bench's own keys and payload bytes."""
    return workload.key(n), workload.timed_payload(n, size) if timed else workload.payload(n, size)


def emit(**values: object) -> None:
    print(json.dumps(values), flush=True)


async def _relay(peer: Peer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await peer.relay(lambda: emit(ready=True), stop)


async def _write(peer: Peer, rate: int, seconds: float, tasks: int, warm: int) -> None:
    async with peer.writer(tasks) as send:
        commits = CommitTimes(send, warm)
        began = time.monotonic()
        committed = await paced(rate, seconds, tasks, commits.send)
        emit(committed=committed, seconds=time.monotonic() - began, **commits.summary())


class CommitTimes:
    """Times each send: from just before the event is made (each runner's `send` first makes it, so
    its payload's time) until the writer's commit returned. That is the writer's share of the pickup."""

    def __init__(self, send: Send, warm: int, clock: Callable[[], float] = time.time) -> None:
        self._send, self._warm, self._clock = send, warm, clock
        self.seconds: list[float] = []

    async def send(self, n: int) -> None:
        began = self._clock()
        await self._send(n)
        if n >= self._warm:
            self.seconds.append(self._clock() - began)

    def summary(self) -> dict[str, float]:
        times = latency_summary(self.seconds)
        return {"commit_p50_ms": times["p50"], "commit_p99_ms": times["p99"]}


async def _backlog(peer: Peer, count: int, size: int) -> None:
    began = time.time()
    committed_at = await peer.backlog(count, size)
    emit(committed_at=committed_at, insert_seconds=committed_at - began)


def main(make: Callable[[Env], Peer], argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    usage = "usage: setup | relay | backlog COUNT SIZE | write RATE SECONDS TASKS [WARM]"
    if not args:
        raise SystemExit(usage)
    peer = make(Env.from_environ())
    command, rest = args[0], args[1:]
    if command == "setup" and not rest:
        asyncio.run(peer.setup())
        emit(ok=True)
    elif command == "relay" and not rest:
        asyncio.run(_relay(peer))
    elif command == "backlog" and len(rest) == 2:
        asyncio.run(_backlog(peer, int(rest[0]), int(rest[1])))
    elif command == "write" and len(rest) in (3, 4):
        warm = int(rest[3]) if len(rest) == 4 else 0
        asyncio.run(_write(peer, int(rest[0]), float(rest[1]), int(rest[2]), warm))
    else:
        raise SystemExit(usage)
