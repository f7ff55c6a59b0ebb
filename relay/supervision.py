"""Supervised tasks: every long-lived loop of the relay runs as one, under one `Supervisor`.

After River's `startstop` and maintenance tickers, and procrastinate's side-task monitoring:

- `start()` and `stop()` are idempotent; `stop()` cancels and waits (every caller waits), and a
  cancellation is a clean stop, never a failure. A stopped task may be started again.
- `Supervisor.run_every(name, interval, fn)` calls `fn` every `interval` seconds, counted from the
  start of the last call (sooner when `poke()`d), so a slow call does not push every later one
  back: the coordinator renews its leases on time however long its other statements take. A call
  that outlasts the interval is followed by a pause of a quarter interval, never back to back.
  `Supervisor.supervise(name, factory)` runs a coroutine meant to run until stopped.
- Failures are classified by the fault model (relay.faults). A transient database error (a
  connection lost, a cancelled statement, a lock timeout...) is logged as a warning without a
  traceback, counted in `outbox_database_errors_total{kind}` and retried with backoff, for as long
  as it lasts: a database outage never stops the relay. Any other exception is "broken": logged
  with its traceback, counted in `outbox_task_restarts_total{task}` and retried with backoff too.
- A task that keeps failing with broken errors, without one success in between, for longer than
  the give-up window (OUTBOX_SUPERVISOR_GIVE_UP) gives up: the supervisor's `on_give_up` is called
  (the service stops with a failure and the process exits non-zero), so systemd or Kubernetes
  restarts it and the operator hears of it, instead of a relay limping on or exiting 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from relay.faults import is_transient_db_error
from relay.retry import FailureBackoff
from relay.shared.redaction import redact

log = logging.getLogger(__name__)

Step = Callable[[], Awaitable[None]]
GiveUp = Callable[[str, BaseException], None]


class SupervisionMetrics(Protocol):
    def task_restarted(self, task: str) -> None: ...

    def database_error(self, exc: BaseException) -> None: ...


def describe(exc: BaseException) -> str:
    """`TypeName: message` on one line, without a password."""
    text = str(exc).strip().replace("\n", " ")
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


class ReturnedUnexpectedly(RuntimeError):
    """A coroutine that should run until stopped returned by itself."""


class SupervisedTask:
    """One named task: `step` run in a loop, restarted with backoff when it fails."""

    def __init__(
        self,
        supervisor: Supervisor,
        name: str,
        step: Step,
        *,
        interval: float | None,
        backoff: FailureBackoff | None = None,
        what: str | None = None,
        healthy_after: float = 30.0,
    ) -> None:
        self.name = name
        self.what = what or name
        self._supervisor = supervisor
        self._step = step
        self._interval = interval  # None: `step` runs until stopped (returning is a failure)
        self._backoff = backoff or FailureBackoff(0.5, 30.0)
        # For a long-running step: a run at least this long counts as a success before it failed.
        self._healthy_after = healthy_after
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Set by stop() before it cancels: the loop ends at its next turn even if a library swallowed
        # the cancellation inside the step (asyncio.wait_for on Python 3.11 can).
        self._stop_requested = False
        self.failing_since: float | None = None  # first broken failure since the last success
        self.last_error: BaseException | None = None  # cleared by the next success
        self.gave_up = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Starts the loop unless it is running already."""
        if self.running:
            return
        self.failing_since, self.last_error, self.gave_up = None, None, False
        self._stop_requested = False
        self._backoff.succeeded()
        self._wake.clear()
        self._task = asyncio.create_task(self._run(), name=self.name)
        self._task.add_done_callback(self._ended)

    def poke(self) -> None:
        """Run the next round of a ticker now instead of after its interval."""
        self._wake.set()

    async def stop(self) -> None:
        """Cancels the loop and waits for it to end. Idempotent; safe from inside the task."""
        task = self._task
        if task is None:
            return
        self._stop_requested = True
        task.cancel()
        if task is not asyncio.current_task():
            await asyncio.wait([task])
        if self._task is task:
            self._task = None

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stop_requested:
            self._wake.clear()
            started = time.monotonic()
            failure: BaseException | None = None
            try:
                await self._step()
            except asyncio.CancelledError as exc:
                current = asyncio.current_task()
                if current is None or current.cancelling():
                    raise  # stop(), or whoever owns us, cancelled: a clean stop
                failure = exc  # a cancellation escaping from inside the step is not a stop
            except Exception as exc:
                failure = exc
            else:
                if self._interval is None:
                    failure = ReturnedUnexpectedly(f"{self.name} returned unexpectedly")
            if self._stop_requested:
                return  # the step ended (or failed) because it was stopped
            if failure is None:
                self._succeeded()
                assert self._interval is not None
                # Not asyncio.wait_for: on Python 3.11 it swallows a stop() that lands as poke() wakes it.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._until_next(started)):
                        await self._wake.wait()
                continue
            delay = self._failed(failure, time.monotonic() - started)
            if delay is None:
                return
            await asyncio.sleep(delay)

    def _until_next(self, started: float) -> float:
        """Seconds from now to the next call of a ticker whose last call started at `started`."""
        assert self._interval is not None
        return max(self._interval - (time.monotonic() - started), self._interval / 4)

    def _succeeded(self, *, quiet: bool = False) -> None:
        if self.failing_since is not None and not quiet:
            log.info("%s working again", self.what)  # after unexpected errors (transient: quiet)
        self.failing_since, self.last_error = None, None
        self._backoff.succeeded()

    def _failed(self, exc: BaseException, ran_for: float) -> float | None:
        """Logs and counts a failure; the delay before the next try, or None after giving up."""
        if self._interval is None and ran_for >= self._healthy_after:
            self._succeeded(quiet=True)  # it ran fine for a long while before failing: a new streak
        self.last_error = exc
        delay = self._backoff.failed()
        metrics = self._supervisor.metrics
        if is_transient_db_error(exc):
            if metrics is not None:
                metrics.database_error(exc)
            log.warning("%s failed (%s); retrying in %.1fs", self.what, describe(exc), delay)
            return delay
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        failing_for = now - self.failing_since
        if failing_for >= self._supervisor.give_up_after:
            log.error(
                "%s has kept failing for %.0fs (OUTBOX_SUPERVISOR_GIVE_UP=%gs); giving up",
                self.what,
                failing_for,
                self._supervisor.give_up_after,
                exc_info=exc,
            )
            self.gave_up = True
            self._supervisor.gave_up(self.name, exc)
            return None
        if metrics is not None:
            metrics.task_restarted(self.name)
        log.error("%s failed (%s); restarting in %.1fs", self.what, describe(exc), delay, exc_info=exc)
        return delay

    def _ended(self, task: asyncio.Task[None]) -> None:
        """The loop ends only when stopped or after giving up; anything else is a bug here."""
        if task.cancelled() or self.gave_up or self._stop_requested:
            return
        exc = task.exception() or ReturnedUnexpectedly(f"{self.name} ended unexpectedly")
        log.error("supervised task %s ended unexpectedly", self.name, exc_info=exc)
        self.gave_up = True
        self._supervisor.gave_up(self.name, exc)


class Supervisor:
    """Creates the relay's supervised tasks and stops them all; reports the first give-up."""

    def __init__(
        self,
        *,
        give_up_after: float,
        on_give_up: GiveUp,
        metrics: SupervisionMetrics | None = None,
    ) -> None:
        self.give_up_after = give_up_after
        self.metrics = metrics
        self._on_give_up = on_give_up
        self._tasks: dict[str, SupervisedTask] = {}
        self.failure: tuple[str, BaseException] | None = None

    def run_every(
        self,
        name: str,
        interval: float,
        fn: Step,
        *,
        backoff: FailureBackoff | None = None,
        what: str | None = None,
    ) -> SupervisedTask:
        """A ticker (not started yet): `fn` every `interval` seconds, each success resetting the
        failure streak."""
        return self._add(SupervisedTask(self, name, fn, interval=interval, backoff=backoff, what=what))

    def supervise(
        self,
        name: str,
        factory: Step,
        *,
        backoff: FailureBackoff | None = None,
        what: str | None = None,
        healthy_after: float = 30.0,
    ) -> SupervisedTask:
        """A coroutine meant to run until stopped (not started yet), restarted when it fails."""
        task = SupervisedTask(
            self, name, factory, interval=None, backoff=backoff, what=what, healthy_after=healthy_after
        )
        return self._add(task)

    def _add(self, task: SupervisedTask) -> SupervisedTask:
        if task.name in self._tasks:
            raise ValueError(f"a supervised task named {task.name!r} exists already")
        self._tasks[task.name] = task
        return task

    def get(self, name: str) -> SupervisedTask | None:
        return self._tasks.get(name)

    def gave_up(self, name: str, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = (name, exc)
            self._on_give_up(name, exc)

    async def stop(self) -> None:
        """Stops every task, the most recently created first. Idempotent."""
        for task in reversed(list(self._tasks.values())):
            await task.stop()
