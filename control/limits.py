"""What keeps the control plane from hurting publishing: a cap on concurrent ControlService calls
(beyond it, RESOURCE_EXHAUSTED at once instead of a queue), a server-side cap on every call's deadline,
and a short-lived, shared copy of GetStatus's expensive figures so that N concurrent calls cost one query.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import grpc

from control.auth import CONTROL_SERVICE, is_read_only

log = logging.getLogger(__name__)

T = TypeVar("T")

# The monotonic time by which the current call must be done (set per call by CallLimits); store.Deadline
# never runs past it, whatever deadline the client sent (or did not send).
_call_cap: contextvars.ContextVar[float | None] = contextvars.ContextVar("control_call_cap", default=None)


def call_cap() -> float | None:
    """The monotonic time the current call must end by, or None outside a limited call."""
    return _call_cap.get()


class CallLimits(grpc.aio.ServerInterceptor):
    """At most `max_concurrent` ControlService calls at once, each for at most `max_deadline` seconds.

    A call beyond the limit is refused with RESOURCE_EXHAUSTED without waiting: a client that keeps
    calling gets fast refusals, not a queue that grows until every caller times out. Health checks and
    reflection are not limited. After a mutating call, `on_mutation` runs (it drops cached figures).
    """

    def __init__(
        self,
        max_concurrent: int,
        max_deadline: float,
        on_mutation: Callable[[], None] | None = None,
    ) -> None:
        self._max_concurrent = max_concurrent
        self._max_deadline = max_deadline
        self._on_mutation = on_mutation
        self._in_flight = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        service, _, method = details.method.lstrip("/").partition("/")
        if handler is None or handler.unary_unary is None or service != CONTROL_SERVICE:
            return handler
        behavior = handler.unary_unary
        mutating = not is_read_only(method)

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self._in_flight >= self._max_concurrent:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the control plane is serving {self._in_flight} calls already "
                    f"(OUTBOX_CONTROL_MAX_CONCURRENT_RPCS); retry later with backoff",
                )
            self._in_flight += 1
            token = _call_cap.set(time.monotonic() + self._max_deadline)
            try:
                async with asyncio.timeout(self._max_deadline):
                    return await behavior(request, context)
            except TimeoutError:
                # Only the cap's own timeout gets here: the servicer turns its errors into statuses.
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the call ran into the server's limit of {self._max_deadline:g}s (OUTBOX_CONTROL_MAX_DEADLINE)",
                )
            finally:
                _call_cap.reset(token)
                self._in_flight -= 1
                if mutating and self._on_mutation is not None:
                    self._on_mutation()

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


class SharedResult(Generic[T]):
    """The result of an expensive read, shared by concurrent callers and reused for `ttl` seconds, or
    for COST_FACTOR times as long as the read took if that is longer: however slow the read becomes,
    callers keep the database busy with it for at most 1/COST_FACTOR of the time.

    One load runs at a time; callers arriving meanwhile wait for it (each no longer than its own
    deadline) instead of starting their own. `invalidate()` forgets the result, and a load that was
    running when it was called is not kept.
    """

    COST_FACTOR = 10.0

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._fresh_for = ttl
        self._value: T | None = None
        self._loaded_at = 0.0
        self._loading: asyncio.Task[T] | None = None
        self._generation = 0

    def invalidate(self) -> None:
        self._generation += 1
        self._value = None
        self._loading = None

    async def get(self, load: Callable[[], Awaitable[T]], timeout: float | None) -> T:
        if self._value is not None and time.monotonic() - self._loaded_at < self._fresh_for:
            return self._value
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._load(load, self._generation))
            # Nobody may be left waiting when it fails: retrieve the exception so it is not logged as lost.
            self._loading.add_done_callback(lambda t: t.cancelled() or t.exception())
        # shield: a caller that gives up (deadline, cancellation) does not cancel the others' load.
        return await asyncio.wait_for(asyncio.shield(self._loading), timeout)

    async def _load(self, load: Callable[[], Awaitable[T]], generation: int) -> T:
        started = time.monotonic()
        try:
            value = await load()
        finally:
            if generation == self._generation:
                self._loading = None
        if generation == self._generation and self._ttl > 0:
            self._value, self._loaded_at = value, time.monotonic()
            self._fresh_for = max(self._ttl, self.COST_FACTOR * (self._loaded_at - started))
        return value
