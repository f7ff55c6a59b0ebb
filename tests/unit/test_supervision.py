"""relay.supervision without a database: restarts with backoff, tracebacks for the unexpected,
quiet retries for transient database errors, give-up after a failure streak, idempotent start and
stop, and cancellation as a clean stop. Plus how the relay's `run` turns a give-up into exit 1."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable

import asyncpg
import pytest

from relay.retry import FailureBackoff
from relay.supervision import SupervisedTask, Supervisor

FAST = FailureBackoff(0.01, 0.02)


class FakeMetrics:
    def __init__(self) -> None:
        self.restarts: Counter[str] = Counter()
        self.database_errors: list[BaseException] = []

    def task_restarted(self, task: str) -> None:
        self.restarts[task] += 1

    def database_error(self, exc: BaseException) -> None:
        self.database_errors.append(exc)


class Harness:
    def __init__(self, give_up_after: float = 60.0) -> None:
        self.metrics = FakeMetrics()
        self.gave_up: list[tuple[str, BaseException]] = []
        self.supervisor = Supervisor(
            give_up_after=give_up_after,
            on_give_up=lambda n, e: self.gave_up.append((n, e)),
            metrics=self.metrics,
        )


async def eventually(condition, timeout: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    async def poll() -> None:
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


async def test_a_failing_task_is_restarted_with_backoff_and_its_traceback_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness()
    calls: list[float] = []
    loop = asyncio.get_running_loop()

    async def flaky() -> None:
        calls.append(loop.time())
        if len(calls) <= 3:
            raise ValueError("a bug")
        await asyncio.Event().wait()  # then runs until stopped

    task = h.supervisor.supervise("flaky", flaky, backoff=FailureBackoff(0.05, 1.0))
    with caplog.at_level(logging.ERROR, logger="relay.supervision"):
        task.start()
        await eventually(lambda: len(calls) == 4)
    await task.stop()

    assert h.metrics.restarts == Counter({"flaky": 3})
    assert h.gave_up == []
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert all(gap >= 0.02 for gap in gaps), gaps  # backoff: at least half the exponential value
    assert gaps[2] > gaps[0], f"the delay grows: {gaps}"
    failures = [r for r in caplog.records if "flaky failed" in r.getMessage()]
    assert len(failures) == 3
    assert all(r.exc_info and r.exc_info[0] is ValueError for r in failures)
    assert "ValueError: a bug" in failures[0].getMessage()


async def test_a_returning_long_running_task_is_restarted() -> None:
    h = Harness()
    runs = []

    async def returns() -> None:
        runs.append(1)

    task = h.supervisor.supervise("returns", returns, backoff=FAST)
    task.start()
    await eventually(lambda: len(runs) >= 3)
    await task.stop()
    assert h.metrics.restarts["returns"] >= 2


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.QueryCanceledError("canceling statement due to user request"),
        asyncpg.LockNotAvailableError("canceling statement due to lock timeout"),
        ConnectionResetError("connection lost"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_transient_database_errors_are_retried_quietly_and_never_give_up(
    error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(give_up_after=0.05)
    calls = 0

    async def tick() -> None:
        nonlocal calls
        calls += 1
        raise error

    task = h.supervisor.run_every("ticker", 1.0, tick, backoff=FAST, what="a round")
    with caplog.at_level(logging.WARNING, logger="relay.supervision"):
        task.start()
        await asyncio.sleep(0.3)  # far past the give-up window
        assert task.running
    await task.stop()

    assert calls >= 5
    assert h.gave_up == [], "a database outage must never stop the relay"
    assert h.metrics.restarts == Counter()
    assert len(h.metrics.database_errors) == calls
    records = [r for r in caplog.records if r.name == "relay.supervision"]
    assert records and all(r.levelno == logging.WARNING and not r.exc_info for r in records)
    assert f"a round failed ({type(error).__name__}" in records[0].getMessage()


async def test_a_task_failing_for_longer_than_the_window_gives_up(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(give_up_after=0.1)

    async def broken() -> None:
        raise KeyError("broken")

    task = h.supervisor.run_every("broken", 1.0, broken, backoff=FAST)
    with caplog.at_level(logging.ERROR, logger="relay.supervision"):
        task.start()
        await eventually(lambda: bool(h.gave_up))
        await eventually(lambda: not task.running)
    [(name, exc)] = h.gave_up
    assert name == "broken" and isinstance(exc, KeyError)
    assert task.gave_up
    assert h.supervisor.failure == (name, exc)
    assert any("giving up" in r.getMessage() and r.exc_info for r in caplog.records)
    await task.stop()  # stopping a task that ended is fine


async def test_a_success_resets_the_failure_streak() -> None:
    h = Harness(give_up_after=0.15)
    calls = 0

    async def every_other() -> None:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise RuntimeError("odd")

    task = h.supervisor.run_every("alternating", 0.01, every_other, backoff=FAST)
    task.start()
    await asyncio.sleep(0.5)
    assert task.running and h.gave_up == []
    await task.stop()
    assert h.metrics.restarts["alternating"] >= 5


async def ticking(interval: float) -> tuple[SupervisedTask, Callable[[], int]]:
    """A started ticker that counts its rounds, after its first round."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        ticks += 1

    task = Harness().supervisor.run_every("ticker", interval, tick)
    task.start()
    await eventually(lambda: ticks == 1)
    return task, lambda: ticks


async def test_a_ticker_runs_every_interval_and_when_poked() -> None:
    task, ticks = await ticking(10.0)
    await asyncio.sleep(0.05)
    assert ticks() == 1, "the next tick waits for the interval"
    task.poke()
    await eventually(lambda: ticks() == 2)
    await task.stop()


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
async def test_a_ticker_poked_as_it_is_stopped_still_stops(turns: int) -> None:
    """On Python 3.11, asyncio.wait_for returns the awaited result instead of raising when the
    cancellation arrives as that result does, so a ticker woken by a poke in the same turns as its
    stop() would swallow the cancel and tick on forever (a relay's shutdown hung on it)."""
    task, _ = await ticking(60.0)
    await asyncio.sleep(0.01)  # waiting for the interval or a poke
    task.poke()
    for _ in range(turns):
        await asyncio.sleep(0)
    await asyncio.wait_for(task.stop(), 2.0)
    assert not task.running


@pytest.mark.parametrize("interval", [60.0, None])
async def test_a_step_that_swallows_the_stop_still_stops_without_a_failure(
    interval: float | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A library that turns the stop's cancellation into a normal return (asyncio.wait_for on 3.11,
    around any awaited call) must not keep the task alive, nor make it look failed."""
    h = Harness(give_up_after=0.0)
    entered = asyncio.Event()

    async def swallowing() -> None:
        entered.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(60)

    task = (
        h.supervisor.run_every("swallowing", interval, swallowing)
        if interval is not None
        else h.supervisor.supervise("swallowing", swallowing)
    )
    task.start()
    await entered.wait()
    with caplog.at_level(logging.ERROR, logger="relay.supervision"):
        await asyncio.wait_for(task.stop(), 2.0)
    assert not task.running
    assert h.gave_up == [] and h.metrics.restarts == Counter()
    assert not caplog.records, caplog.text


class SkewedClock:
    """time.monotonic plus what the test adds: a step that "takes" seconds without sleeping them."""

    def __init__(self) -> None:
        self.skew = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.skew


@pytest.mark.parametrize(("step_takes", "next_in"), [(1.9, 0.5), (20.0, 0.5), (0.0, 2.0)])
async def test_a_ticker_counts_its_interval_from_the_start_of_the_last_round(
    monkeypatch: pytest.MonkeyPatch, step_takes: float, next_in: float
) -> None:
    """Interval 2 s: a round that took 1.9 s is followed by the next one 0.1 s later, but never
    sooner than a quarter interval (0.5 s), even after a round longer than the interval."""
    clock = SkewedClock()
    monkeypatch.setattr("relay.supervision.time", clock)
    h = Harness()
    starts: list[float] = []

    async def tick() -> None:
        starts.append(time.monotonic())
        clock.skew += step_takes

    task = h.supervisor.run_every("ticker", 2.0, tick)
    task.start()
    await eventually(lambda: len(starts) == 2, timeout=10)
    await task.stop()
    gap = starts[1] - starts[0]
    assert gap >= next_in - 0.05, f"waited {gap:.2f}s, at least {next_in}s expected"
    assert gap < next_in + 1.0, f"waited {gap:.2f}s, about {next_in}s expected"


async def test_start_and_stop_are_idempotent_and_a_stopped_task_can_start_again() -> None:
    h = Harness()
    started = 0
    stopped = 0

    async def forever() -> None:
        nonlocal started, stopped
        started += 1
        try:
            await asyncio.Event().wait()
        finally:
            stopped += 1

    task = h.supervisor.supervise("forever", forever)
    await task.stop()  # never started: nothing to do
    task.start()
    task.start()
    await eventually(lambda: started == 1)
    task.start()
    assert started == 1 and task.running
    await asyncio.gather(task.stop(), task.stop())  # both wait for the end
    assert stopped == 1 and not task.running
    await task.stop()
    task.start()
    await eventually(lambda: started == 2)
    await h.supervisor.stop()
    await h.supervisor.stop()
    assert stopped == 2
    assert h.metrics.restarts == Counter() and h.gave_up == []


async def test_cancellation_is_a_clean_stop() -> None:
    h = Harness(give_up_after=0.0)
    entered = asyncio.Event()

    async def busy() -> None:
        entered.set()
        await asyncio.sleep(10)

    task = h.supervisor.run_every("busy", 1.0, busy)
    task.start()
    await entered.wait()
    await task.stop()
    assert not task.running
    assert h.gave_up == [] and h.metrics.restarts == Counter()


async def test_a_cancellation_from_inside_the_step_is_a_failure_not_a_stop() -> None:
    h = Harness()
    calls = 0

    async def cancelled_inside() -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError  # e.g. an awaited future someone else cancelled

    task = h.supervisor.run_every("inner", 1.0, cancelled_inside, backoff=FAST)
    task.start()
    await eventually(lambda: calls >= 3)
    assert task.running
    await task.stop()
    assert h.metrics.restarts["inner"] >= 2


def test_task_names_are_unique() -> None:
    h = Harness()

    async def noop() -> None:
        return None

    h.supervisor.run_every("x", 1.0, noop)
    with pytest.raises(ValueError, match="exists already"):
        h.supervisor.supervise("x", noop)


# -- the process: a give-up means a non-zero exit -------------------------------------------------


class FakeService:
    """What run_until_signalled needs of a RelayService."""

    def __init__(self, fail_with: str | None) -> None:
        self._stopped = asyncio.Event()
        self.failure: str | None = None
        self._fail_with = fail_with
        self.stops = 0

    async def start(self) -> None:
        if self._fail_with is not None:
            self.failure = self._fail_with
            self.request_stop()

    def request_stop(self) -> None:
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        self.stops += 1


async def test_run_until_signalled_raises_when_the_service_stopped_by_itself() -> None:
    from relay.service import RelayFailedError, run_until_signalled

    service = FakeService("coordinator kept failing")
    with pytest.raises(RelayFailedError, match="coordinator kept failing"):
        await run_until_signalled(service)  # type: ignore[arg-type]
    assert service.stops == 1


async def test_run_until_signalled_returns_after_a_requested_stop() -> None:
    from relay.service import run_until_signalled

    service = FakeService(None)
    asyncio.get_running_loop().call_later(0.05, service.request_stop)  # what SIGTERM does
    await run_until_signalled(service)  # type: ignore[arg-type]
    assert service.stops == 1


def test_the_cli_exits_1_with_one_redacted_line_when_the_relay_gives_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    import relay.service
    from outbox_relay.cli import app

    async def gives_up(_service: object) -> None:
        raise relay.service.RelayFailedError(
            "coordinator kept failing, last with OSError: postgresql://relay:s3cr3t@db/app refused"
        )

    monkeypatch.setattr(relay.service, "run_until_signalled", gives_up)
    monkeypatch.setattr(relay.service, "RelayService", lambda settings: object())
    result = CliRunner().invoke(app, ["run"], env={"OUTBOX_DATABASE_URL": "postgresql://relay@127.0.0.1:1/x"})
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [
        "error: relay stopped: coordinator kept failing, last with OSError: postgresql://relay:***@db/app refused"
    ]
