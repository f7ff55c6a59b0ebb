"""AsyncControlClient: carries out the shared calls (clients.control.calls) on a grpc.aio channel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc

from clients.control.calls import Call, Calls, ClientBase, Sleep, attempts, describe

__all__ = ["AsyncControlClient"]

P = ParamSpec("P")
T = TypeVar("T")


def _rpc(
    build: Callable[Concatenate[Calls, P], Call[T]],
) -> Callable[Concatenate[AsyncControlClient, P], Coroutine[Any, Any, T]]:
    """The client method of the call that ``build`` describes."""

    async def method(self: AsyncControlClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._run(build(self._calls, *args, **kwargs))

    describe(method, build, "AsyncControlClient")
    return method


class AsyncControlClient(ClientBase):
    """asyncio client. Use as ``async with`` or call ``await close()``; the channel opens on first use.

    Every argument falls back to its ``OUTBOX_CONTROL_*`` variable (see the module docstring).
    """

    _channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> AsyncControlClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    def _open_channel(self, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]) -> Any:
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(self.config.addr, options=options)
        else:
            self._channel = grpc.aio.secure_channel(self.config.addr, credentials, options=options)
        return self._channel

    async def _run(self, call: Call[T]) -> T:
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
                await asyncio.sleep(step.seconds)
                outcome = None
                continue
            try:
                outcome = await method(call.request, timeout=step.timeout, metadata=metadata, wait_for_ready=False)
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
