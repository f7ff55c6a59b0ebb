"""ControlClient: carries out the shared calls (clients.control.calls) on a blocking grpc channel."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc

from clients.control.calls import Call, Calls, ClientBase, Sleep, attempts, describe

__all__ = ["ControlClient"]

P = ParamSpec("P")
T = TypeVar("T")


def _rpc(
    build: Callable[Concatenate[Calls, P], Call[T]],
) -> Callable[Concatenate[ControlClient, P], T]:
    """The client method of the call that ``build`` describes."""

    def method(self: ControlClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(build(self._calls, *args, **kwargs))

    describe(method, build, "ControlClient")
    return method


class ControlClient(ClientBase):
    """Blocking client, same methods and behaviour as AsyncControlClient. Use as ``with`` or ``close()``."""

    _channel: grpc.Channel | None = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            channel.close()

    def _open_channel(self, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]) -> Any:
        if credentials is None:
            self._channel = grpc.insecure_channel(self.config.addr, options=options)
        else:
            self._channel = grpc.secure_channel(self.config.addr, credentials, options=options)
        return self._channel

    def _run(self, call: Call[T]) -> T:
        steps = attempts(self.config, call)
        method = getattr(self._get_stub(), call.method)
        metadata = self.config.metadata()
        outcome: Any = None
        while True:
            try:
                step = steps.send(outcome)
            except StopIteration as done:
                result: T = done.value
                return result
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
                outcome = None
                continue
            try:
                outcome = method(call.request, timeout=step.timeout, metadata=metadata, wait_for_ready=False)
            except grpc.RpcError as error:
                outcome = error

    # -- reads --
    status = _rpc(Calls.status)
    locks = _rpc(Calls.locks)
    pauses = _rpc(Calls.pauses)
    stuck = _rpc(Calls.stuck)
    dead_letters = _rpc(Calls.dead_letters)
    dead_letter = _rpc(Calls.dead_letter)
    audit = _rpc(Calls.audit)

    # -- mutations (admin token) --
    release_lock = _rpc(Calls.release_lock)
    pause = _rpc(Calls.pause)
    resume = _rpc(Calls.resume)
    park = _rpc(Calls.park)
    replay = _rpc(Calls.replay)
    purge = _rpc(Calls.purge)
