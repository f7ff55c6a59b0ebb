"""The one call layer both clients share: every RPC is described once here (request builder,
response conversion, retry policy), and so are deadlines, retries with backoff and error mapping.

A client only carries the steps out: it invokes the stub (blocking or awaiting) and sleeps between
attempts. See the package docstring for which calls are retried and why.
"""

from __future__ import annotations

import inspect
import os
import random
import time
import uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

import grpc

from clients.control import convert
from clients.control.errors import ERRORS, ControlError, DeadlineExceeded, InvalidArgument, Unavailable
from clients.control.results import (
    AuditEntry,
    DeadLetter,
    DeadLetterSummary,
    Lock,
    Page,
    Pause,
    PurgeResult,
    ReplayResult,
    Status,
    StuckEvent,
)
from clients.control.settings import ControlConfig
from control._generated.outbox.control.v1 import control_pb2 as pb
from control._generated.outbox.control.v1 import control_pb2_grpc as pb_grpc

T = TypeVar("T")

ALL_TOPICS = "*"
BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 2.0


@dataclass(frozen=True)
class Call(Generic[T]):
    """One RPC: its stub method, request, whether repeating it is safe, and the result conversion."""

    method: str
    request: Any
    idempotent: bool
    convert: Callable[[Any], T]


class Calls:
    """Builds every call from the public arguments of the client method of the same name (the
    clients' methods are made from these, so the signatures and docstrings here are the API)."""

    def __init__(self, config: ControlConfig) -> None:
        self.config = config

    def _operator(self, operator: str | None) -> str:
        return (operator if operator is not None else self.config.operator)[:128]

    # -- reads --

    def status(self) -> Call[Status]:
        """Live instances, backlog per topic, dead-letter count, active pauses, schema version."""
        return Call("GetStatus", pb.GetStatusRequest(), True, convert.status)

    def locks(self) -> Call[list[Lock]]:
        """Every lease in distributed_locks."""
        return Call("ListLocks", pb.ListLocksRequest(), True, lambda m: [convert.lock(x) for x in m.locks])

    def pauses(self, *, include_expired: bool = False) -> Call[list[Pause]]:
        """Active pauses (and expired ones with ``include_expired=True``)."""
        request = pb.ListPausesRequest(include_expired=include_expired)
        return Call("ListPauses", request, True, lambda m: [convert.pause(p) for p in m.pauses])

    def stuck(
        self, topic: str | None = None, *, page_size: int = 0, page_token: str | None = None
    ) -> Call[Page[StuckEvent]]:
        """Unpublished events that failed at least once, in outbox id order (page_size 0: server default)."""
        request = pb.ListStuckRequest(
            topic=topic or "", page_size=convert.page_size(page_size), page_token=page_token or ""
        )
        return Call(
            "ListStuck", request, True,
            lambda m: Page(tuple(convert.stuck_event(e) for e in m.events), convert.page_token(m.next_page_token)),
        )

    def dead_letters(
        self,
        *,
        topic: str | None = None,
        key: str | None = None,
        reason: str | None = None,
        archived_after: datetime | None = None,
        archived_before: datetime | None = None,
        page_size: int = 0,
        page_token: str | None = None,
    ) -> Call[Page[DeadLetterSummary]]:
        """Dead letters matching every criterion given, oldest first, without payloads."""
        where = convert.dead_letter_filter(topic, key, reason, archived_after, archived_before)
        request = pb.ListDeadLettersRequest(page_size=convert.page_size(page_size), page_token=page_token or "")
        if where is not None:
            request.filter.CopyFrom(where)
        return Call(
            "ListDeadLetters", request, True,
            lambda m: Page(tuple(convert.summary(d) for d in m.dead_letters), convert.page_token(m.next_page_token)),
        )

    def dead_letter(self, dead_letter_id: int) -> Call[DeadLetter]:
        """One dead letter with payload, headers and replay history."""
        request = pb.GetDeadLetterRequest(id=int(dead_letter_id))
        return Call("GetDeadLetter", request, True, lambda m: convert.dead_letter(m.dead_letter))

    def audit(
        self, *, action: str | None = None, page_size: int = 0, page_token: str | None = None
    ) -> Call[Page[AuditEntry]]:
        """The audit log, newest first."""
        request = pb.ListAuditRequest(
            action=action or "", page_size=convert.page_size(page_size), page_token=page_token or ""
        )
        return Call(
            "ListAudit", request, True,
            lambda m: Page(tuple(convert.audit_entry(e) for e in m.entries), convert.page_token(m.next_page_token)),
        )

    # -- mutations (admin token) --

    def release_lock(
        self,
        name: str,
        *,
        expected_holder: str | None = None,
        expected_token: int | None = None,
        operator: str | None = None,
    ) -> Call[Lock]:
        """Frees a lease if it is still held as expected. Not retried (see the module docstring)."""
        if expected_holder is None and expected_token is None:
            raise InvalidArgument("expected_holder: expected_holder or expected_token is required")
        request = pb.ReleaseLockRequest(name=name, operator=self._operator(operator))
        if expected_holder is not None:
            request.expected_holder = expected_holder
        if expected_token is not None:
            request.expected_token = expected_token
        return Call("ReleaseLock", request, False, lambda m: convert.lock(m.lock))

    def pause(
        self,
        pattern: str = ALL_TOPICS,
        *,
        reason: str,
        ttl: timedelta | float | None = None,
        expires_at: datetime | None = None,
        operator: str | None = None,
    ) -> Call[Pause]:
        """Pauses topics matching a shell glob ('*': every topic); replaces an existing pause of the pattern."""
        request = pb.PauseRequest(reason=reason, operator=self._operator(operator))
        if pattern == ALL_TOPICS:
            request.all_topics = True
        else:
            request.topic_pattern = pattern
        if ttl is not None and expires_at is not None:
            raise InvalidArgument("ttl: give ttl or expires_at, not both")
        if ttl is not None:
            delta = ttl if isinstance(ttl, timedelta) else timedelta(seconds=ttl)
            if delta <= timedelta(0):
                raise InvalidArgument("ttl: must be positive")
            request.ttl.FromTimedelta(delta)
        if expires_at is not None:
            convert.set_timestamp(request.expires_at, expires_at, "expires_at")
        return Call("Pause", request, True, lambda m: convert.pause(m.pause))

    def resume(self, pattern: str = ALL_TOPICS, *, operator: str | None = None) -> Call[Pause | None]:
        """Removes the pause of exactly this pattern; returns it, or None if it was not paused."""
        request = pb.ResumeRequest(operator=self._operator(operator))
        if pattern == ALL_TOPICS:
            request.all_topics = True
        else:
            request.topic_pattern = pattern
        return Call("Resume", request, True, lambda m: convert.pause(m.pause) if m.resumed else None)

    def park(
        self, event: int | str | uuid.UUID, *, reason: str, operator: str | None = None
    ) -> Call[DeadLetterSummary]:
        """Moves an unpublished event (outbox id or message id) to the dead-letter archive now."""
        request = pb.DeadLetterNowRequest(reason=reason, operator=self._operator(operator))
        outbox_id, message_id = convert.parse_event_ref(event)
        if outbox_id is not None:
            request.outbox_id = outbox_id
        else:
            request.message_id = str(message_id)
        return Call("DeadLetterNow", request, False, lambda m: convert.summary(m.dead_letter))

    def replay(
        self,
        request_id: str | None = None,
        *,
        ids: Sequence[int] | None = None,
        topic: str | None = None,
        key: str | None = None,
        reason: str | None = None,
        archived_after: datetime | None = None,
        archived_before: datetime | None = None,
        force: bool = False,
        dry_run: bool = False,
        operator: str | None = None,
    ) -> Call[ReplayResult]:
        """Replays dead letters chosen by ids or by filter criteria. ``request_id`` (default: a new
        uuid4, returned in the result) makes the call idempotent: repeat it with the same id."""
        where = convert.dead_letter_filter(topic, key, reason, archived_after, archived_before)
        rid = request_id or str(uuid.uuid4())
        request = pb.ReplayDeadLettersRequest(
            request_id=rid, force=force, dry_run=dry_run, operator=self._operator(operator),
            **convert.selection(ids, where),
        )
        return Call("ReplayDeadLetters", request, True, convert.replay_result(rid))

    def purge(
        self,
        *,
        ids: Sequence[int] | None = None,
        topic: str | None = None,
        key: str | None = None,
        reason: str | None = None,
        archived_after: datetime | None = None,
        archived_before: datetime | None = None,
        dry_run: bool = False,
        operator: str | None = None,
        all_dead_letters: bool = False,
    ) -> Call[PurgeResult]:
        """Deletes dead letters chosen by ids or by filter criteria, or every one with
        ``all_dead_letters=True`` (dry_run: only count them)."""
        where = convert.dead_letter_filter(topic, key, reason, archived_after, archived_before)
        if all_dead_letters:
            if ids is not None or where is not None:
                raise InvalidArgument("all_dead_letters: give ids, filter criteria or all_dead_letters, not several")
            selection: dict[str, Any] = {"all_dead_letters": True}
        else:
            selection = convert.selection(ids, where)
        request = pb.PurgeDeadLettersRequest(dry_run=dry_run, operator=self._operator(operator), **selection)
        # Only a dry run is safe to repeat.
        return Call("PurgeDeadLetters", request, dry_run, convert.purge_result)


# --- attempts: deadline, retries, error mapping -------------------------------------------------


@dataclass(frozen=True)
class Invoke:
    """Step: invoke the stub method once with this timeout, and send back its response or RpcError."""

    timeout: float


@dataclass(frozen=True)
class Sleep:
    """Step: wait this long before the next attempt (send back None)."""

    seconds: float


Step = Invoke | Sleep


def attempts(config: ControlConfig, call: Call[T]) -> Generator[Step, Any, T]:
    """The whole life of one call as steps for a client to carry out; returns the converted result
    or raises the ControlError. The error is raised here, outside any except block, so that the
    RpcError (whose text may hold more than the message) is not even kept as ``__context__``."""
    tries = _Attempts(config, call)
    while True:
        outcome = yield Invoke(tries.timeout())
        if not isinstance(outcome, grpc.RpcError):
            return call.convert(outcome)
        delay = tries.after(outcome)
        if isinstance(delay, ControlError):
            raise delay
        yield Sleep(delay)


class _Attempts:
    """Deadline and backoff bookkeeping for one call and its retries."""

    def __init__(self, config: ControlConfig, call: Call[Any]) -> None:
        self.config = config
        self.call = call
        self.deadline = time.monotonic() + config.timeout
        self.number = 0
        self._backoff = BACKOFF_INITIAL

    def timeout(self) -> float:
        """Seconds the next attempt may take; DeadlineExceeded once none are left."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(
                f"{self.call.method}: deadline of {self.config.timeout:g}s exceeded",
                code=grpc.StatusCode.DEADLINE_EXCEEDED, method=self.call.method,
            )
        self.number += 1
        return left

    def after(self, error: grpc.RpcError) -> float | ControlError:
        """Seconds to wait before the next attempt, or the error to raise."""
        delay = self.retry_delay(error)
        return self.error(error) if delay is None else delay

    def retry_delay(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before retrying after `error`, or None if the call must not be retried."""
        if not self.call.idempotent or _code(error) != grpc.StatusCode.UNAVAILABLE:
            return None
        if self.number > self.config.retries:
            return None
        delay = random.uniform(self._backoff / 2, self._backoff)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        if time.monotonic() + delay >= self.deadline:
            return None
        return delay

    def error(self, error: grpc.RpcError) -> ControlError:
        code = _code(error)
        details = _details(error)
        cls = ERRORS.get(code, ControlError) if code is not None else ControlError
        method = self.call.method
        if cls is Unavailable:
            tries = f" ({self.number} attempts)" if self.number > 1 else ""
            if _database_unavailable(error):  # the control plane answered: its database did not
                message = f"the control plane at {self.config.addr} cannot reach the database{tries}: {details}"
            else:
                message = f"cannot reach the control plane at {self.config.addr}{tries}: {details}"
        elif cls is DeadlineExceeded:
            message = f"{method}: no answer from {self.config.addr} within {self.config.timeout:g}s ({details})"
        else:
            message = details or (code.name if code is not None else "unknown error")
        return cls(self.config.redact(message), code=code, method=method)


def _code(error: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    return code() if callable(code) else None


def _database_unavailable(error: grpc.RpcError) -> bool:
    """Whether the server marked this UNAVAILABLE as its database's (control.errors.DATABASE_UNAVAILABLE)."""
    trailing = getattr(error, "trailing_metadata", None)
    try:
        metadata = trailing() if callable(trailing) else None
    except Exception:  # no metadata: a transport error
        return False
    return any(tuple(item) == ("outbox-unavailable", "database") for item in metadata or ())


def _details(error: grpc.RpcError) -> str:
    details = getattr(error, "details", None)
    text = details() if callable(details) else None
    return str(text or "").strip() or "no details"


# --- what both clients share --------------------------------------------------------------------


class ClientBase:
    """Configuration, the call builders and the stub of a client; subclasses open the channel and
    carry out the steps of ``attempts()``."""

    def __init__(
        self,
        addr: str | None = None,
        *,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_server_name: str | None = None,
        tls: bool | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        operator: str | None = None,
        config: ControlConfig | None = None,
    ) -> None:
        settings: dict[str, Any] = {
            "addr": addr, "token": token, "token_file": token_file, "tls_ca": tls_ca, "tls_cert": tls_cert,
            "tls_key": tls_key, "tls_server_name": tls_server_name, "tls": tls, "timeout": timeout,
            "retries": retries, "operator": operator,
        }
        if config is not None and any(v is not None for v in settings.values()):
            raise InvalidArgument("config: give a ControlConfig or individual settings, not both")
        self.config = config or ControlConfig.resolve(**settings)
        self._calls = Calls(self.config)
        self._stub: Any = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def _get_stub(self) -> Any:
        """The ControlService stub, on a channel opened on first use."""
        if self._stub is None:
            channel = self._open_channel(self.config.credentials(), self.config.channel_options())
            self._stub = pb_grpc.ControlServiceStub(channel)
        return self._stub

    def _open_channel(self, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]) -> Any:
        raise NotImplementedError


def describe(method: Callable[..., Any], build: Callable[..., Any], owner: str) -> None:
    """Gives a client method made from a builder of Calls the builder's name, docstring and
    signature, with the result type in place of ``Call[...]``."""
    method.__name__ = build.__name__
    method.__qualname__ = f"{owner}.{build.__name__}"
    method.__module__ = f"clients.control.{'aio' if owner.startswith('Async') else 'sync'}"
    method.__doc__ = build.__doc__
    signature = inspect.signature(build)
    returns = signature.return_annotation
    if isinstance(returns, str) and returns.startswith("Call[") and returns.endswith("]"):
        signature = signature.replace(return_annotation=returns[len("Call[") : -1])
    method.__signature__ = signature  # type: ignore[attr-defined]
