"""Fast takeover after a crash: the database sees at once that a process died.

Each instance holds a session-level advisory lock, keyed by `<schema>/<instance_id>`, on a small
dedicated "liveness" session (separate from the pool and from the LISTEN session, so poll-only mode
has it too). When the process dies (kill -9, an OOM kill, a segfault) the kernel closes its sockets,
its sessions end and Postgres drops the lock at once.

Every `interval` (0.2 s) the same session asks which other lease holders hold their lock. A holder
seen holding it before and not any more has died: its leases are expired and it stops counting as
live, in one statement guarded by the lock still being free; then the coordinator is poked and takes
the partitions within the second, fenced as always (a new token; the dead holder's writes fail).

What the database cannot see (a frozen process, a network partition) keeps its session and its lock,
and so still waits for the lease TTL. A holder never seen holding its lock (an instance with
OUTBOX_FAST_TAKEOVER=false, an older relay, one that died before any peer looked) waits for the TTL
too. Behind a transaction-pooling PgBouncer a session advisory lock belongs to whatever server
connection ran the statement: set OUTBOX_FAST_TAKEOVER=false there (docs/operations.md)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

import asyncpg

from relay.retry import FailureBackoff
from relay.store import TRANSIENT_DB_ERRORS, RelayStore
from relay.supervision import describe

log = logging.getLogger(__name__)


def liveness_key_prefix(schema: str) -> str:
    """What the lock key is hashed from, less the instance id (schemas sharing a database never collide)."""
    return f"{schema}/"


class PeerTracker:
    """Which lease holders died, from successive observations of their liveness locks (pure).

    A holder counts as dead only once it was seen alive (holding its lock) and then is seen without
    it: a holder that never took a lock (fast takeover off, an older relay) is left to the TTL."""

    def __init__(self) -> None:
        self._seen_alive: set[str] = set()

    def observe(self, holders: Mapping[str, bool]) -> tuple[list[str], list[str]]:
        """`holders`: every other current lease holder → whether its liveness lock is held now.
        Returns (dead, vanished), each sorted: the holders seen alive before that lost their lock
        since, and those seen alive before that hold no lease any more (released them, or a peer
        was quicker to expire them after their death: the coordinator should look at once too)."""
        dead = sorted(h for h, alive in holders.items() if not alive and h in self._seen_alive)
        vanished = sorted(self._seen_alive - set(holders))
        self._seen_alive = {h for h, alive in holders.items() if alive}
        return dead, vanished

    @property
    def seen_alive(self) -> frozenset[str]:
        return frozenset(self._seen_alive)


class LivenessWatcher:
    """Holds this instance's liveness lock on a dedicated session and watches the peers' locks.

    Transient database errors reconnect here with backoff (the lock is taken again on the new
    session); anything else propagates to the supervisor that runs `run`."""

    def __init__(
        self,
        store: RelayStore,
        instance_id: str,
        on_change: Callable[[], None],
        interval: float = 0.2,
        on_db_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._store = store
        self._instance = instance_id
        self._prefix = liveness_key_prefix(store.schema)
        self._on_change = on_change
        self._interval = interval
        self._on_db_error = on_db_error
        self.tracker = PeerTracker()
        self.locked = False

    async def run(self) -> None:
        backoff = FailureBackoff(0.2, 5.0)
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._store.connect_liveness()
                if backoff.failing:
                    log.info("liveness session back")
                backoff.succeeded()
                warned = False
                while True:
                    if not self.locked:
                        self.locked = await self._store.take_liveness_lock(
                            conn, self._prefix + self._instance
                        )
                        if not self.locked and not warned:
                            # Until it is ours, peers cannot see this process die: the TTL bounds its takeover.
                            log.warning(
                                "liveness lock of %s is held by another session (a previous process with"
                                " this instance id?); retrying",
                                self._instance,
                            )
                            warned = True
                    await self.check_once(conn)
                    await asyncio.sleep(self._interval)
            except TRANSIENT_DB_ERRORS as exc:
                if self._on_db_error is not None:
                    self._on_db_error(exc)
                delay = backoff.failed()
                log.warning("liveness session lost (%s); reconnecting in %.1fs", describe(exc), delay)
                await asyncio.sleep(delay)
            finally:
                self.locked = False
                if conn is not None and not conn.is_closed():
                    conn.terminate()

    async def check_once(self, conn: asyncpg.Connection) -> list[str]:
        """One look at the peers; expires the leases of those that died. Returns the dead."""
        holders = await self._store.liveness_peers(conn, self._prefix, self._instance)
        dead, vanished = self.tracker.observe(holders)
        for holder in dead:
            expired = await self._store.expire_dead_holder(conn, self._prefix, holder)
            log.warning(
                "instance %s died (its database session ended): %s of its leases expired at once",
                holder,
                len(expired),
                extra={"peer": holder, "leases": expired},
            )
        if dead or vanished:
            # Every survivor's share grew, or leases came free: take them now, not next round.
            self._on_change()
        return dead
