"""Control-plane metrics, as a server interceptor: calls by method and status code, and what
replays did (replayed, skipped as already replayed). Served on the relay's /metrics when the control
plane runs inside `outbox-relay run` (OUTBOX_CONTROL_ADDR with OUTBOX_METRICS_ADDR); docs/observability.md
lists them."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import metrics


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, meter: metrics.Meter) -> None:
        self._calls = meter.create_counter(
            "outbox_control_calls", unit="{call}", description="Control-plane RPCs by method and status code"
        )
        self._duration = meter.create_histogram(
            "outbox_control_call_duration", unit="s", description="Control-plane RPC duration"
        )
        self._replayed = meter.create_counter(
            "outbox_replays", unit="{event}", description="Dead letters put back into the outbox"
        )
        self._replay_skipped = meter.create_counter(
            "outbox_replay_duplicates_skipped",
            unit="{event}",
            description="Replays skipped: already replayed",
        )
        # Exported from the start (0, not "No data"): their label set is known now.
        self._replayed.add(0)
        self._replay_skipped.add(0)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        behavior = handler.unary_unary

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.monotonic()
            code = "OK"
            try:
                response = await behavior(request, context)
            except BaseException:
                code = _code_name(context, "UNKNOWN")
                raise
            else:
                code = _code_name(context, "OK")
                self._count_replays(method, response)
                return response
            finally:
                self._calls.add(1, {"method": method, "code": code})
                self._duration.record(time.monotonic() - started, {"method": method})

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _count_replays(self, method: str, response: Any) -> None:
        if method == "ReplayDeadLetters" and not response.dry_run:
            self._replayed.add(response.replayed_count)
            self._replay_skipped.add(response.skipped_already_replayed_count)


def _code_name(context: grpc.aio.ServicerContext, default: str) -> str:
    code = context.code()
    if code is None:
        return default
    return code.name if isinstance(code, grpc.StatusCode) else str(code)
