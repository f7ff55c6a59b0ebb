"""ControlService: validates each request, calls the store, converts the answer. No SQL, no broker code."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeAlias, TypeVar

import grpc

from control import convert, paging, validation
from control._generated.outbox.control.v1 import control_pb2 as pb
from control._generated.outbox.control.v1 import control_pb2_grpc as pb_grpc
from control.auth import current_principal
from control.errors import DATABASE_UNAVAILABLE, is_expected, status_for
from control.model import Audit
from control.store import ControlStore, Deadline

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")
Context: TypeAlias = grpc.aio.ServicerContext
Handler = Callable[[Any, Request, Context], Awaitable[Response]]


def rpc(method: Handler[Request, Response]) -> Handler[Request, Response]:
    """Turns every exception into a gRPC status through control.errors' table."""

    @functools.wraps(method)
    async def handle(self: Any, request: Request, context: Context) -> Response:
        try:
            return await method(self, request, context)
        except Exception as error:
            code, message = status_for(error)
            if not is_expected(error):
                log.exception("ControlService/%s failed", method.__name__)
            # Every UNAVAILABLE of the status table is the database's: say so, so that the client tells
            # "cannot reach the database" from "cannot reach the control plane" (the transport's).
            trailing = (DATABASE_UNAVAILABLE,) if code == grpc.StatusCode.UNAVAILABLE else ()
            await context.abort(code, message, trailing_metadata=trailing)
            raise AssertionError("context.abort returned") from error

    return handle


def _deadline(context: Context) -> Deadline:
    return Deadline(context.time_remaining())


def _audit(action: str, operator: str, arguments: dict[str, Any]) -> Audit:
    """`actor` is the role plus the operator the caller declares; `client_identity` is what the server
    verified (the mTLS certificate's CN, else the token's role): see control.auth.client_identity."""
    principal = current_principal()
    name = validation.operator(operator)
    return Audit(
        actor=f"{principal.name}:{name}" if name else principal.name,
        action=action,
        arguments=arguments,
        client_identity=principal.identity or None,
    )


class ControlServicer(pb_grpc.ControlServiceServicer):
    def __init__(self, store: ControlStore, *, max_page_size: int = 1000) -> None:
        self._store = store
        self._max_page_size = max_page_size

    @rpc
    async def GetStatus(self, request: pb.GetStatusRequest, context: Context) -> pb.GetStatusResponse:
        return convert.status(await self._store.status(_deadline(context)))

    @rpc
    async def ListLocks(self, request: pb.ListLocksRequest, context: Context) -> pb.ListLocksResponse:
        locks = await self._store.locks(_deadline(context))
        return pb.ListLocksResponse(locks=[convert.lock(lock) for lock in locks])

    @rpc
    async def ReleaseLock(self, request: pb.ReleaseLockRequest, context: Context) -> pb.ReleaseLockResponse:
        name, holder, token = validation.release_lock(request)
        audit = _audit(
            "ReleaseLock", request.operator, {"name": name, "expected_holder": holder, "expected_token": token}
        )
        lock = await self._store.release_lock(name, holder, token, audit, _deadline(context))
        return pb.ReleaseLockResponse(lock=convert.lock(lock))

    @rpc
    async def Pause(self, request: pb.PauseRequest, context: Context) -> pb.PauseResponse:
        pattern, reason, expires_at, ttl = validation.pause(request, datetime.now(UTC))
        arguments = {
            "topic_pattern": pattern,
            "reason": reason,
            "expires_at": expires_at.isoformat() if expires_at else None,
            "ttl_seconds": ttl.total_seconds() if ttl else None,
        }
        audit = _audit("Pause", request.operator, arguments)
        pause = await self._store.pause(pattern, reason, expires_at, ttl, audit, _deadline(context))
        return pb.PauseResponse(pause=convert.pause(pause))

    @rpc
    async def Resume(self, request: pb.ResumeRequest, context: Context) -> pb.ResumeResponse:
        pattern = validation.pause_target(request)
        audit = _audit("Resume", request.operator, {"topic_pattern": pattern})
        removed = await self._store.resume(pattern, audit, _deadline(context))
        if removed is None:
            return pb.ResumeResponse(resumed=False)
        return pb.ResumeResponse(resumed=True, pause=convert.pause(removed))

    @rpc
    async def ListPauses(self, request: pb.ListPausesRequest, context: Context) -> pb.ListPausesResponse:
        pauses = await self._store.pauses(request.include_expired, _deadline(context))
        return pb.ListPausesResponse(pauses=[convert.pause(p) for p in pauses])

    @rpc
    async def ListStuck(self, request: pb.ListStuckRequest, context: Context) -> pb.ListStuckResponse:
        topic, after, limit = validation.list_stuck(request, self._max_page_size)
        page = await self._store.stuck(topic, after, limit, _deadline(context))
        token = paging.encode_token("stuck", page.items[-1].id) if page.has_more else ""
        return pb.ListStuckResponse(events=[convert.stuck(e) for e in page.items], next_page_token=token)

    @rpc
    async def DeadLetterNow(self, request: pb.DeadLetterNowRequest, context: Context) -> pb.DeadLetterNowResponse:
        outbox_id, message_id, reason = validation.dead_letter_now(request)
        arguments = {
            "outbox_id": outbox_id,
            "message_id": str(message_id) if message_id else None,
            "reason": reason,
        }
        audit = _audit("DeadLetterNow", request.operator, arguments)
        archived = await self._store.dead_letter_now(outbox_id, message_id, reason, audit, _deadline(context))
        return pb.DeadLetterNowResponse(dead_letter=convert.summary(archived))

    @rpc
    async def ListDeadLetters(
        self, request: pb.ListDeadLettersRequest, context: Context
    ) -> pb.ListDeadLettersResponse:
        where, after, limit = validation.list_dead_letters(request, self._max_page_size)
        page = await self._store.dead_letters(where, after, limit, _deadline(context))
        token = paging.encode_token("dead_letters", page.items[-1].id) if page.has_more else ""
        return pb.ListDeadLettersResponse(
            dead_letters=[convert.summary(d) for d in page.items], next_page_token=token
        )

    @rpc
    async def GetDeadLetter(self, request: pb.GetDeadLetterRequest, context: Context) -> pb.GetDeadLetterResponse:
        dead_letter_id = validation.positive_id(request.id, "id")
        found = await self._store.dead_letter(dead_letter_id, _deadline(context))
        return pb.GetDeadLetterResponse(dead_letter=convert.dead_letter(found))

    @rpc
    async def ReplayDeadLetters(
        self, request: pb.ReplayDeadLettersRequest, context: Context
    ) -> pb.ReplayDeadLettersResponse:
        replay = validation.replay(request)
        audit = _audit("ReplayDeadLetters", request.operator, replay.audit_arguments())
        result = await self._store.replay(replay, audit, _deadline(context))
        return convert.replay_result(result)

    @rpc
    async def PurgeDeadLetters(
        self, request: pb.PurgeDeadLettersRequest, context: Context
    ) -> pb.PurgeDeadLettersResponse:
        selection = validation.purge_selection(request)
        audit = _audit("PurgeDeadLetters", request.operator, selection.as_json())
        result = await self._store.purge(selection, request.dry_run, audit, _deadline(context))
        return convert.purge_result(result)

    @rpc
    async def ListAudit(self, request: pb.ListAuditRequest, context: Context) -> pb.ListAuditResponse:
        action, before, limit = validation.list_audit(request, self._max_page_size)
        page = await self._store.audit_entries(action, before, limit, _deadline(context))
        token = paging.encode_token("audit", page.items[-1].id) if page.has_more else ""
        return pb.ListAuditResponse(entries=[convert.audit_entry(e) for e in page.items], next_page_token=token)
