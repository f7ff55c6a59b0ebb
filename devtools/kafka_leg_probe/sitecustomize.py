"""Times each Kafka record's way through the relay's own producer path, per record: waiting in its
partition's open batch for the batch before it (append -> hand-over), waiting in aiokafka's queue
for the broker connection (hand-over -> drained into a produce request), and the request itself
(drained -> acknowledged). Only for measurements (devtools/latency_ab.py puts this directory on the
relay's PYTHONPATH): it wraps private parts of relay.sinks.kafka_batches and aiokafka, and says so
loudly if they are gone rather than measure nothing.

Active in an `outbox-relay` process whose environment names a directory in KAFKA_LEG_PROBE_DIR;
the process writes `<pid>.txt` there when it exits (one line per record: three durations in s)."""

from __future__ import annotations

import atexit
import os
import sys
import time
from pathlib import Path
from typing import Any

_OUT = os.environ.get("KAFKA_LEG_PROBE_DIR")


def _install(out: Path) -> None:
    from aiokafka.producer.message_accumulator import MessageBatch

    from relay.sinks.kafka_batches import SharedBatches

    appended: dict[int, list[float]] = {}  # id(builder) -> monotonic time of each record's append
    records: list[tuple[float, float, float]] = []
    append, drain_ready, done = SharedBatches.append, MessageBatch.drain_ready, MessageBatch.done
    failure = MessageBatch.failure
    for name in ("_ctime", "_builder"):  # instance attributes read below
        if name not in MessageBatch.__init__.__code__.co_names:
            raise AttributeError(f"aiokafka's MessageBatch no longer sets {name}")

    def timed_append(self: SharedBatches, *args: Any, **kwargs: Any) -> Any:
        batch = append(self, *args, **kwargs)
        appended.setdefault(id(batch.builder), []).append(time.monotonic())
        return batch

    def timed_drain_ready(self: Any) -> Any:
        self._probe_drained = time.monotonic()
        return drain_ready(self)

    def timed_done(self: Any, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        drained = getattr(self, "_probe_drained", now)
        handed = self._ctime  # aiokafka stamps a MessageBatch when it is queued (send_batch)
        for at in appended.pop(id(self._builder), ()):
            records.append((max(handed - at, 0.0), drained - max(handed, at), now - drained))
        return done(self, *args, **kwargs)

    def untimed_failure(self: Any, *args: Any, **kwargs: Any) -> Any:
        # A failed batch's appends are dropped, or a later builder at the same id would inherit them.
        appended.pop(id(self._builder), None)
        return failure(self, *args, **kwargs)

    def write() -> None:
        lines = (f"{a:.6f} {b:.6f} {c:.6f}\n" for a, b, c in records)
        (out / f"{os.getpid()}.txt").write_text("".join(lines))

    SharedBatches.append = timed_append  # type: ignore[method-assign]
    MessageBatch.drain_ready = timed_drain_ready
    MessageBatch.done = timed_done
    MessageBatch.failure = untimed_failure
    atexit.register(write)


if _OUT and any("outbox-relay" in arg for arg in sys.argv[:1]):
    try:
        _install(Path(_OUT))
    except (ImportError, AttributeError) as exc:  # the internals it wraps have changed
        raise SystemExit(f"kafka leg probe: cannot install ({exc!r}); update devtools/kafka_leg_probe") from exc
