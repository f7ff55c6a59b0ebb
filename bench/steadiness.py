"""How steady the machine's own speed was during a run.

A virtual machine whose host lends its cores to other guests runs the same work slower at random
moments, and no figure inside the guest shows it (no steal time, an idle load average): latency
figures then swing between identical runs. A small child process times one fixed piece of
pure-Python work every few seconds, as CPU time (so waiting for a core behind the bench's own
processes does not count) and reports the spread; the results file says how far to trust latency
figures of one repetition against another's."""

from __future__ import annotations

import multiprocessing
import statistics
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess

PROBE_WORK = 200_000  # additions: about 10 ms of CPU on a current core
UNSTEADY = 1.3  # slowest decile over fastest decile above which the run is flagged


def probe_cpu_ms(work: int = PROBE_WORK) -> float:
    """CPU milliseconds the fixed work takes this time."""
    started = time.thread_time()
    total = 0
    for n in range(work):
        total += n
    return (time.thread_time() - started) * 1000


def _sample(results: Connection, stop: Connection, interval: float) -> None:
    samples: list[float] = []
    while not stop.poll(interval):
        samples.append(probe_cpu_ms())
    results.send(samples)


@dataclass(frozen=True)
class Steadiness:
    samples: tuple[float, ...]

    @property
    def spread(self) -> float:
        """The slowest decile's CPU time over the fastest decile's (1.0: perfectly steady)."""
        if len(self.samples) < 10:
            return float("nan")
        deciles = statistics.quantiles(self.samples, n=10)
        return deciles[-1] / deciles[0]

    @property
    def unsteady(self) -> bool:
        return self.spread > UNSTEADY

    def describe(self) -> str:
        if len(self.samples) < 10:
            return f"{len(self.samples)} probes: too few to tell"
        return (
            f"{len(self.samples)} probes, median {statistics.median(self.samples):.1f} ms CPU;"
            f" slowest decile {self.spread:.2f}x the fastest"
        )


class SpeedProbe:
    """The sampling child process; `stop()` ends it and returns what it measured."""

    def __init__(self, interval: float = 5.0) -> None:
        context = multiprocessing.get_context("spawn")
        self._results, child_results = context.Pipe(duplex=False)
        child_stop, self._stop = context.Pipe(duplex=False)
        self._process: SpawnProcess = context.Process(
            target=_sample, args=(child_results, child_stop, interval), name="bench-speed-probe", daemon=True
        )
        self._process.start()

    def stop(self, timeout: float = 10.0) -> Steadiness:
        self._stop.send(None)
        samples: list[float] = self._results.recv() if self._results.poll(timeout) else []
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
        return Steadiness(tuple(samples))
