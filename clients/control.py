"""Typed Python clients for the Outbox Relay control plane (gRPC ControlService).

    with ControlClient() as control:                      # config from OUTBOX_CONTROL_* env vars
        print(control.status().dead_letter_count)
        control.pause("orders.*", reason="broker maintenance", ttl=timedelta(minutes=30))

    async with AsyncControlClient("relay-control:50051", token=token, tls_ca="ca.pem") as control:
        page = await control.dead_letters(topic="orders", page_size=50)

Both clients return plain frozen dataclasses (aware ``datetime``, ``timedelta``, ``UUID``), never
protobuf messages, and raise one exception hierarchy, ``ControlError``, whose text is the server's
message. The bearer token is kept out of every ``str()``/``repr()`` of clients and errors.

Configuration: each argument of the constructors falls back to an environment variable. The client
certificate has its own names, OUTBOX_CONTROL_CLIENT_CERT/_KEY: the server's OUTBOX_CONTROL_TLS_CERT/_KEY
are not read, so the client can run in the server's environment (but OUTBOX_CONTROL_ADDR is shared):

    OUTBOX_CONTROL_ADDR             host:port of the control plane (default 127.0.0.1:50051)
    OUTBOX_CONTROL_TOKEN            bearer token (read or admin), or
    OUTBOX_CONTROL_TOKEN_FILE       a file holding it
    OUTBOX_CONTROL_TLS_CA           PEM CA bundle that signed the server's certificate: enables TLS
    OUTBOX_CONTROL_CLIENT_CERT/_KEY PEM client certificate and key, for mTLS (enables TLS)
    OUTBOX_CONTROL_TLS_SERVER_NAME  expected name in the server certificate, if not the address host
    OUTBOX_CONTROL_TLS              "true": TLS verified against the system CAs (no CA file needed)
    OUTBOX_CONTROL_TIMEOUT          per-call deadline in seconds (default 10)
    OUTBOX_CONTROL_OPERATOR         who is acting, recorded in the audit log (default: the OS user)

Deadlines and retries: every call has a deadline (``timeout``, default 10 s) that covers all of its
attempts. Calls that are safe to repeat are retried on UNAVAILABLE with exponential backoff and
jitter (``retries`` more attempts, default 3) as long as the deadline leaves time for it:

* every Get/List call (status, locks, pauses, stuck, dead_letters, dead_letter, audit);
* ``replay``: the server deduplicates by request_id, and a retry sends the same request_id, so a
  replay whose first attempt got through returns that attempt's result and replays nothing more;
* ``purge`` with ``dry_run=True`` (it changes nothing);
* ``pause``: an upsert of the pattern's row, so repeating it converges on the same pause (a ``ttl``
  is measured from the attempt that lands last, i.e. at most the backoff later);
* ``resume``: a delete of the pattern's row, so repeating it converges too; if a first attempt did
  remove the pause but its answer was lost, the retry reports "nothing was paused" (``None``).

A retried pause or resume writes one audit row per attempt that reached the server.

Never retried, because a repeat after a lost answer would fail, misreport or act again: ``release_lock`` (a
compare-and-release whose repeat fails with FailedPrecondition), ``park`` (whose repeat finds the
event gone), and ``purge`` without dry_run. Those raise ``Unavailable`` and leave it to the caller
to check the state (``locks()``, ``dead_letters()``) before trying again.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc

from control._generated.outbox.control.v1 import control_pb2 as pb
from control._generated.outbox.control.v1 import control_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_ADDR",
    "DEFAULT_TIMEOUT",
    "AsyncControlClient",
    "AuditEntry",
    "ControlClient",
    "ControlConfig",
    "ControlError",
    "DeadLetter",
    "DeadLetterSummary",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Instance",
    "InvalidArgument",
    "Lock",
    "NotFound",
    "Page",
    "Pause",
    "PermissionDenied",
    "PurgeResult",
    "ReplayRecord",
    "ReplayResult",
    "Status",
    "StuckEvent",
    "TopicBacklog",
    "Unauthenticated",
    "Unavailable",
]

T = TypeVar("T")

DEFAULT_ADDR = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 3
ALL_TOPICS = "*"
_ENV = "OUTBOX_CONTROL_"
_BACKOFF_INITIAL = 0.1
_BACKOFF_MAX = 2.0
_REDACTED = "***"


# --- errors ------------------------------------------------------------------------------------


class ControlError(Exception):
    """A control-plane call failed. ``str()`` is the server's message (or the client's, for local
    problems); ``code`` is the gRPC status code when the server or transport gave one."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, method: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.method = method

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class Unavailable(ControlError):
    """The control plane cannot be reached (connection refused, TLS handshake failed, server gone)."""


class DeadlineExceeded(Unavailable):
    """No answer within the call's deadline."""


class Unauthenticated(ControlError):
    """Missing or wrong bearer token."""


class PermissionDenied(ControlError):
    """The token is valid but not allowed to do this (the read token on a mutating call)."""


class InvalidArgument(ControlError):
    """The request (or the client configuration) is invalid; nothing was changed."""


class NotFound(ControlError):
    """The lease, event or dead letter does not exist."""


class FailedPrecondition(ControlError):
    """The state does not allow the call (lease changed hands, event already published, ...)."""


_ERRORS: dict[grpc.StatusCode, type[ControlError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list; pass ``next_page_token`` back for the next one (None: last page)."""

    items: tuple[T, ...]
    next_page_token: str | None = None


@dataclass(frozen=True)
class Instance:
    """A relay instance that heartbeated recently and has not stopped."""

    instance_id: str
    hostname: str
    pid: int
    version: str
    started_at: datetime | None
    heartbeat_at: datetime | None
    partitions: tuple[int, ...]
    leader: bool


@dataclass(frozen=True)
class TopicBacklog:
    topic: str
    pending_count: int
    oldest_pending_age: timedelta


@dataclass(frozen=True)
class Pause:
    id: int
    topic_pattern: str
    reason: str
    paused_by: str
    created_at: datetime | None
    expires_at: datetime | None  # None: until resumed


@dataclass(frozen=True)
class Status:
    instances: tuple[Instance, ...]
    backlog: tuple[TopicBacklog, ...]
    dead_letter_count: int
    pauses: tuple[Pause, ...]
    schema_version: str
    server_time: datetime | None


@dataclass(frozen=True)
class Lock:
    name: str
    holder: str | None  # None: nobody holds the lease
    token: int
    acquired_at: datetime | None
    renewed_at: datetime | None
    expires_at: datetime | None
    expired: bool


@dataclass(frozen=True)
class StuckEvent:
    id: int
    message_id: uuid.UUID
    topic: str
    key: str | None
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    created_at: datetime | None
    partition: int


@dataclass(frozen=True)
class DeadLetterSummary:
    id: int
    outbox_id: int
    message_id: uuid.UUID
    topic: str
    key: str | None
    attempts: int
    reason: str
    last_error: str | None
    created_at: datetime | None
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    archived_at: datetime | None
    archived_by: str
    payload_size: int
    replay_count: int


@dataclass(frozen=True)
class ReplayRecord:
    request_id: str
    new_message_id: uuid.UUID | None
    forced: bool
    replayed_by: str
    replayed_at: datetime | None


@dataclass(frozen=True)
class DeadLetter:
    summary: DeadLetterSummary
    payload: bytes = field(repr=False)
    headers: Mapping[str, str]
    replays: tuple[ReplayRecord, ...]

    @property
    def id(self) -> int:
        return self.summary.id

    @property
    def payload_text(self) -> str | None:
        """The payload decoded as UTF-8, or None if it is not valid UTF-8."""
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError:
            return None


@dataclass(frozen=True)
class ReplayResult:
    request_id: str
    replayed_count: int
    skipped_already_replayed_count: int
    not_found_count: int
    replayed_ids: tuple[int, ...]
    skipped_already_replayed_ids: tuple[int, ...]
    not_found_ids: tuple[int, ...]
    ids_truncated: bool
    dry_run: bool


@dataclass(frozen=True)
class PurgeResult:
    purged_count: int
    not_found_count: int
    dry_run: bool


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime | None
    actor: str
    action: str
    arguments: Mapping[str, Any]
    result: Mapping[str, Any]
    # Verified by the server: 'cn:<CN>' of an mTLS client certificate, 'token:admin' or 'anonymous';
    # None for entries written before the server recorded it. (The operator in `actor` is declared.)
    client_identity: str | None = None


# --- configuration -----------------------------------------------------------------------------


class _Secret:
    """Holds the token; prints as *** so that no repr, log line or traceback shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return _REDACTED

    __str__ = __repr__


@dataclass(frozen=True)
class ControlConfig:
    """Where and how to reach the control plane. Build it with ``ControlConfig.resolve()``."""

    addr: str = DEFAULT_ADDR
    token: _Secret | None = field(default=None, repr=False)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    tls: bool = False
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    operator: str = ""

    def __repr__(self) -> str:
        return (
            f"ControlConfig(addr={self.addr!r}, token={'set' if self.token else 'unset'}, tls={self.tls}, "
            f"tls_ca={self.tls_ca}, tls_cert={self.tls_cert}, tls_server_name={self.tls_server_name!r}, "
            f"timeout={self.timeout}, retries={self.retries}, operator={self.operator!r})"
        )

    @classmethod
    def resolve(
        cls,
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
        env: Mapping[str, str] | None = None,
    ) -> ControlConfig:
        """Arguments win over ``OUTBOX_CONTROL_*`` variables of ``env`` (default ``os.environ``).

        Raises InvalidArgument for an unusable configuration (the message never contains the token).
        """
        env = os.environ if env is None else env

        def pick(value: Any, name: str) -> Any:
            if value is not None and value != "":
                return value
            return env.get(_ENV + name) or None

        address = str(pick(addr, "ADDR") or DEFAULT_ADDR).strip()
        if not address:
            raise InvalidArgument("addr: is empty")
        secret = _load_token(token, token_file, env)
        ca, cert, key = (
            _path(pick(v, n)) for v, n in ((tls_ca, "TLS_CA"), (tls_cert, "CLIENT_CERT"), (tls_key, "CLIENT_KEY"))
        )
        if (cert is None) != (key is None):
            raise InvalidArgument("tls: a client certificate (CLIENT_CERT) and its key (CLIENT_KEY) go together")
        use_tls = tls if tls is not None else _flag(env.get(_ENV + "TLS")) or any((ca, cert, key))
        if not use_tls and (ca or cert):
            raise InvalidArgument("tls: TLS files are given but TLS is disabled")
        raw_timeout = pick(timeout, "TIMEOUT")
        try:
            deadline = float(raw_timeout) if raw_timeout is not None else DEFAULT_TIMEOUT
        except ValueError:
            raise InvalidArgument(f"timeout: not a number of seconds: {raw_timeout!r}") from None
        if not deadline > 0:
            raise InvalidArgument(f"timeout: must be positive (got {deadline})")
        attempts = DEFAULT_RETRIES if retries is None else retries
        if attempts < 0:
            raise InvalidArgument(f"retries: must not be negative (got {attempts})")
        who = operator if operator is not None else env.get(_ENV + "OPERATOR") or _os_user()
        return cls(
            addr=address,
            token=secret,
            tls_ca=ca,
            tls_cert=cert,
            tls_key=key,
            tls_server_name=pick(tls_server_name, "TLS_SERVER_NAME"),
            tls=bool(use_tls),
            timeout=deadline,
            retries=attempts,
            operator=who[:128],
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self.token is None:
            return ()
        return (("authorization", f"Bearer {self.token.reveal()}"),)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "tls_ca"),
            private_key=_read(self.tls_key, "tls_key"),
            certificate_chain=_read(self.tls_cert, "tls_cert"),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            # Retries are ours (idempotent calls only, see the module docstring), not the channel's.
            ("grpc.enable_retries", 0),
            # Reconnect quickly after a refused connection, so that a retry can reach a restarted server
            # within a short deadline (gRPC's default first reconnect backoff is 1 s, up to 120 s).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
            options.append(("grpc.default_authority", self.tls_server_name))
        return options

    def redact(self, text: str) -> str:
        """``text`` with the token replaced by ***, in case anything ever echoes it."""
        if self.token is not None and self.token.reveal():
            text = text.replace(self.token.reveal(), _REDACTED)
        return text


def _load_token(token: str | None, token_file: str | os.PathLike[str] | None, env: Mapping[str, str]) -> _Secret | None:
    if token is not None and token_file is not None:
        raise InvalidArgument("token: give a token or a token file, not both")
    value = token
    if value is None and token_file is None:
        value = env.get(_ENV + "TOKEN") or None
        if value is None and env.get(_ENV + "TOKEN_FILE"):
            token_file = env[_ENV + "TOKEN_FILE"]
    if value is None and token_file is not None:
        try:
            value = Path(token_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"token_file: cannot read {token_file}: {exc.__class__.__name__}") from None
    if value is None:
        return None
    value = value.strip()
    if not value:
        if token_file is not None:
            raise InvalidArgument(f"token_file: {token_file} is empty")
        return None
    if not value.isascii() or not value.isprintable() or any(c.isspace() for c in value):
        raise InvalidArgument("token: must be printable ASCII without spaces")
    return _Secret(value)


def _path(value: Any) -> Path | None:
    return Path(value) if value else None


def _read(path: Path | None, name: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{name}: cannot read {path}: {exc.strerror or exc}") from None


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return ""


# --- protobuf <-> Python -------------------------------------------------------------------------


def _time(message: Any, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    value: datetime = getattr(message, name).ToDatetime(tzinfo=UTC)
    return value


def _set_timestamp(target: Any, value: datetime, name: str) -> None:
    """Sets the google.protobuf.Timestamp field `target` (a sub-message) from an aware datetime."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidArgument(f"{name}: must be a timezone-aware datetime")
    target.FromDatetime(value.astimezone(UTC))


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _optional(message: Any, name: str) -> str | None:
    return getattr(message, name) if message.HasField(name) else None


def _json(text: str) -> Mapping[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"_raw": text}
    return value if isinstance(value, dict) else {"_value": value}


def _pause(m: pb.TopicPause) -> Pause:
    return Pause(m.id, m.topic_pattern, m.reason, m.paused_by, _time(m, "created_at"), _time(m, "expires_at"))


def _instance(m: pb.RelayInstance) -> Instance:
    return Instance(
        m.instance_id, m.hostname, m.pid, m.version, _time(m, "started_at"), _time(m, "heartbeat_at"),
        tuple(m.partitions), m.leader,
    )


def _status(m: pb.GetStatusResponse) -> Status:
    return Status(
        instances=tuple(_instance(i) for i in m.instances),
        backlog=tuple(
            TopicBacklog(b.topic, b.pending_count, b.oldest_pending_age.ToTimedelta()) for b in m.backlog
        ),
        dead_letter_count=m.dead_letter_count,
        pauses=tuple(_pause(p) for p in m.pauses),
        schema_version=m.schema_version,
        server_time=_time(m, "server_time"),
    )


def _lock(m: pb.Lock) -> Lock:
    return Lock(
        m.name, m.holder or None, m.token, _time(m, "acquired_at"), _time(m, "renewed_at"),
        _time(m, "expires_at"), m.expired,
    )


def _stuck(m: pb.StuckEvent) -> StuckEvent:
    return StuckEvent(
        id=m.id,
        message_id=uuid.UUID(m.message_id),
        topic=m.topic,
        key=_optional(m, "key"),
        attempts=m.attempts,
        last_error=m.last_error or None,
        next_attempt_at=_time(m, "next_attempt_at"),
        first_attempt_at=_time(m, "first_attempt_at"),
        last_attempt_at=_time(m, "last_attempt_at"),
        created_at=_time(m, "created_at"),
        partition=m.partition,
    )


def _summary(m: pb.DeadLetterSummary) -> DeadLetterSummary:
    return DeadLetterSummary(
        id=m.id,
        outbox_id=m.outbox_id,
        message_id=uuid.UUID(m.message_id),
        topic=m.topic,
        key=_optional(m, "key"),
        attempts=m.attempts,
        reason=m.reason,
        last_error=m.last_error or None,
        created_at=_time(m, "created_at"),
        first_attempt_at=_time(m, "first_attempt_at"),
        last_attempt_at=_time(m, "last_attempt_at"),
        archived_at=_time(m, "archived_at"),
        archived_by=m.archived_by,
        payload_size=m.payload_size,
        replay_count=m.replay_count,
    )


def _dead_letter(m: pb.DeadLetter) -> DeadLetter:
    return DeadLetter(
        summary=_summary(m.summary),
        payload=bytes(m.payload),
        headers=dict(sorted(m.headers.items())),
        replays=tuple(
            ReplayRecord(r.request_id, _uuid(r.new_message_id), r.forced, r.replayed_by, _time(r, "replayed_at"))
            for r in m.replays
        ),
    )


def _replay_result(request_id: str) -> Callable[[pb.ReplayDeadLettersResponse], ReplayResult]:
    def convert(m: pb.ReplayDeadLettersResponse) -> ReplayResult:
        return ReplayResult(
            request_id=request_id,
            replayed_count=m.replayed_count,
            skipped_already_replayed_count=m.skipped_already_replayed_count,
            not_found_count=m.not_found_count,
            replayed_ids=tuple(m.replayed_ids),
            skipped_already_replayed_ids=tuple(m.skipped_already_replayed_ids),
            not_found_ids=tuple(m.not_found_ids),
            ids_truncated=m.ids_truncated,
            dry_run=m.dry_run,
        )

    return convert


def _audit_entry(m: pb.AuditEntry) -> AuditEntry:
    return AuditEntry(
        m.id, _time(m, "at"), m.actor, m.action, _json(m.arguments_json), _json(m.result_json),
        m.client_identity or None,
    )


def _page_token(value: str) -> str | None:
    return value or None


def _check_page_size(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgument(f"page_size: must not be negative (got {page_size})")
    return page_size


def _filter(
    topic: str | None,
    key: str | None,
    reason: str | None,
    archived_after: datetime | None,
    archived_before: datetime | None,
) -> pb.DeadLetterFilter | None:
    if topic is None and key is None and reason is None and archived_after is None and archived_before is None:
        return None
    message = pb.DeadLetterFilter(topic=topic or "", reason=reason or "")
    if key is not None:
        message.key = key
    if archived_after is not None:
        _set_timestamp(message.archived_after, archived_after, "archived_after")
    if archived_before is not None:
        _set_timestamp(message.archived_before, archived_before, "archived_before")
    return message


def _ids(ids: Sequence[int] | None) -> list[int] | None:
    if ids is None:
        return None
    if isinstance(ids, (str, bytes)):
        raise InvalidArgument("ids: must be a sequence of integers")
    return [int(i) for i in ids]


def _selection(ids: Sequence[int] | None, where: pb.DeadLetterFilter | None) -> dict[str, Any]:
    chosen = _ids(ids)
    if chosen is not None and where is not None:
        raise InvalidArgument("ids: give ids or filter criteria, not both")
    if chosen is None and where is None:
        raise InvalidArgument("ids: ids or at least one filter criterion is required")
    if chosen is not None and not chosen:
        raise InvalidArgument("ids: is empty")
    return {"ids": chosen} if chosen is not None else {"filter": where}


# --- the calls ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One RPC: its stub method, request, whether repeating it is safe, and the result conversion."""

    method: str
    request: Any
    idempotent: bool
    convert: Callable[[Any], T]


class _Calls:
    """Builds every call; shared by the async and the sync client so that both behave the same."""

    def __init__(self, config: ControlConfig) -> None:
        self.config = config

    def _operator(self, operator: str | None) -> str:
        return (operator if operator is not None else self.config.operator)[:128]

    def status(self) -> _Call[Status]:
        return _Call("GetStatus", pb.GetStatusRequest(), True, _status)

    def locks(self) -> _Call[list[Lock]]:
        return _Call("ListLocks", pb.ListLocksRequest(), True, lambda m: [_lock(x) for x in m.locks])

    def release_lock(
        self, name: str, expected_holder: str | None, expected_token: int | None, operator: str | None
    ) -> _Call[Lock]:
        if expected_holder is None and expected_token is None:
            raise InvalidArgument("expected_holder: expected_holder or expected_token is required")
        request = pb.ReleaseLockRequest(name=name, operator=self._operator(operator))
        if expected_holder is not None:
            request.expected_holder = expected_holder
        if expected_token is not None:
            request.expected_token = expected_token
        return _Call("ReleaseLock", request, False, lambda m: _lock(m.lock))

    def pause(
        self,
        pattern: str,
        reason: str,
        ttl: timedelta | float | None,
        expires_at: datetime | None,
        operator: str | None,
    ) -> _Call[Pause]:
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
            _set_timestamp(request.expires_at, expires_at, "expires_at")
        return _Call("Pause", request, True, lambda m: _pause(m.pause))

    def resume(self, pattern: str, operator: str | None) -> _Call[Pause | None]:
        request = pb.ResumeRequest(operator=self._operator(operator))
        if pattern == ALL_TOPICS:
            request.all_topics = True
        else:
            request.topic_pattern = pattern
        return _Call("Resume", request, True, lambda m: _pause(m.pause) if m.resumed else None)

    def pauses(self, include_expired: bool) -> _Call[list[Pause]]:
        request = pb.ListPausesRequest(include_expired=include_expired)
        return _Call("ListPauses", request, True, lambda m: [_pause(p) for p in m.pauses])

    def stuck(self, topic: str | None, page_size: int, page_token: str | None) -> _Call[Page[StuckEvent]]:
        request = pb.ListStuckRequest(
            topic=topic or "", page_size=_check_page_size(page_size), page_token=page_token or ""
        )
        return _Call(
            "ListStuck", request, True,
            lambda m: Page(tuple(_stuck(e) for e in m.events), _page_token(m.next_page_token)),
        )

    def park(self, event: int | str | uuid.UUID, reason: str, operator: str | None) -> _Call[DeadLetterSummary]:
        request = pb.DeadLetterNowRequest(reason=reason, operator=self._operator(operator))
        outbox_id, message_id = parse_event_ref(event)
        if outbox_id is not None:
            request.outbox_id = outbox_id
        else:
            request.message_id = str(message_id)
        return _Call("DeadLetterNow", request, False, lambda m: _summary(m.dead_letter))

    def dead_letters(
        self, where: pb.DeadLetterFilter | None, page_size: int, page_token: str | None
    ) -> _Call[Page[DeadLetterSummary]]:
        request = pb.ListDeadLettersRequest(page_size=_check_page_size(page_size), page_token=page_token or "")
        if where is not None:
            request.filter.CopyFrom(where)
        return _Call(
            "ListDeadLetters", request, True,
            lambda m: Page(tuple(_summary(d) for d in m.dead_letters), _page_token(m.next_page_token)),
        )

    def dead_letter(self, dead_letter_id: int) -> _Call[DeadLetter]:
        request = pb.GetDeadLetterRequest(id=int(dead_letter_id))
        return _Call("GetDeadLetter", request, True, lambda m: _dead_letter(m.dead_letter))

    def replay(
        self,
        request_id: str | None,
        ids: Sequence[int] | None,
        where: pb.DeadLetterFilter | None,
        force: bool,
        dry_run: bool,
        operator: str | None,
    ) -> _Call[ReplayResult]:
        rid = request_id or str(uuid.uuid4())
        request = pb.ReplayDeadLettersRequest(
            request_id=rid, force=force, dry_run=dry_run, operator=self._operator(operator),
            **_selection(ids, where),
        )
        return _Call("ReplayDeadLetters", request, True, _replay_result(rid))

    def purge(
        self,
        ids: Sequence[int] | None,
        where: pb.DeadLetterFilter | None,
        dry_run: bool,
        operator: str | None,
        all_dead_letters: bool = False,
    ) -> _Call[PurgeResult]:
        if all_dead_letters:
            if ids is not None or where is not None:
                raise InvalidArgument("all_dead_letters: give ids, filter criteria or all_dead_letters, not several")
            selection: dict[str, Any] = {"all_dead_letters": True}
        else:
            selection = _selection(ids, where)
        request = pb.PurgeDeadLettersRequest(dry_run=dry_run, operator=self._operator(operator), **selection)
        return _Call(
            "PurgeDeadLetters", request, dry_run,
            lambda m: PurgeResult(m.purged_count, m.not_found_count, m.dry_run),
        )

    def audit(self, action: str | None, page_size: int, page_token: str | None) -> _Call[Page[AuditEntry]]:
        request = pb.ListAuditRequest(
            action=action or "", page_size=_check_page_size(page_size), page_token=page_token or ""
        )
        return _Call(
            "ListAudit", request, True,
            lambda m: Page(tuple(_audit_entry(e) for e in m.entries), _page_token(m.next_page_token)),
        )


def parse_event_ref(event: int | str | uuid.UUID) -> tuple[int | None, uuid.UUID | None]:
    """An outbox id (int, or a string of digits) or a message id (UUID or its text)."""
    if isinstance(event, bool):
        raise InvalidArgument("event: must be an outbox id or a message UUID")
    if isinstance(event, int):
        if event <= 0:
            raise InvalidArgument(f"outbox_id: must be positive (got {event})")
        return event, None
    if isinstance(event, uuid.UUID):
        return None, event
    text = str(event).strip()
    if text.isdigit():
        return parse_event_ref(int(text))
    try:
        return None, uuid.UUID(text)
    except ValueError:
        raise InvalidArgument(f"event: {text[:64]!r} is neither an outbox id nor a message UUID") from None


# --- transport ---------------------------------------------------------------------------------


class _Attempts:
    """Deadline and backoff bookkeeping for one call and its retries."""

    def __init__(self, config: ControlConfig, call: _Call[Any]) -> None:
        self.config = config
        self.call = call
        self.deadline = time.monotonic() + config.timeout
        self.number = 0
        self._backoff = _BACKOFF_INITIAL

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
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
        if time.monotonic() + delay >= self.deadline:
            return None
        return delay

    def error(self, error: grpc.RpcError) -> ControlError:
        code = _code(error)
        details = _details(error)
        cls = _ERRORS.get(code, ControlError) if code is not None else ControlError
        method = self.call.method
        if cls is Unavailable:
            tries = f" ({self.number} attempts)" if self.number > 1 else ""
            message = f"cannot reach the control plane at {self.config.addr}{tries}: {details}"
        elif cls is DeadlineExceeded:
            message = f"{method}: no answer from {self.config.addr} within {self.config.timeout:g}s ({details})"
        else:
            message = details or (code.name if code is not None else "unknown error")
        return cls(self.config.redact(message), code=code, method=method)


def _code(error: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    return code() if callable(code) else None


def _details(error: grpc.RpcError) -> str:
    details = getattr(error, "details", None)
    text = details() if callable(details) else None
    return str(text or "").strip() or "no details"


class _ClientBase:
    def __init__(self, config: ControlConfig | None, kwargs: dict[str, Any]) -> None:
        if config is not None and any(v is not None for v in kwargs.values()):
            raise InvalidArgument("config: give a ControlConfig or individual settings, not both")
        self.config = config or ControlConfig.resolve(**kwargs)
        self._calls = _Calls(self.config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def _channel_args(self) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
        return self.config.credentials(), self.config.channel_options()


class AsyncControlClient(_ClientBase):
    """asyncio client. Use as ``async with`` or call ``await close()``; the channel opens on first use.

    Every argument falls back to its ``OUTBOX_CONTROL_*`` variable (see the module docstring).
    """

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
        super().__init__(config, {
            "addr": addr, "token": token, "token_file": token_file, "tls_ca": tls_ca, "tls_cert": tls_cert,
            "tls_key": tls_key, "tls_server_name": tls_server_name, "tls": tls, "timeout": timeout,
            "retries": retries, "operator": operator,
        })
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    async def __aenter__(self) -> AsyncControlClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    def _get_stub(self) -> Any:
        if self._stub is None:
            credentials, options = self._channel_args()
            if credentials is None:
                self._channel = grpc.aio.insecure_channel(self.config.addr, options=options)
            else:
                self._channel = grpc.aio.secure_channel(self.config.addr, credentials, options=options)
            self._stub = pb_grpc.ControlServiceStub(self._channel)
        return self._stub

    async def _run(self, call: _Call[T]) -> T:
        attempts = _Attempts(self.config, call)
        method = getattr(self._get_stub(), call.method)
        metadata = self.config.metadata()
        while True:
            timeout = attempts.timeout()
            try:
                response = await method(call.request, timeout=timeout, metadata=metadata, wait_for_ready=False)
            except grpc.RpcError as error:
                outcome = attempts.after(error)
            else:
                return call.convert(response)
            if isinstance(outcome, ControlError):
                # Raised outside the except block: the RpcError is not even kept as __context__.
                raise outcome
            await asyncio.sleep(outcome)

    # -- reads --

    async def status(self) -> Status:
        """Live instances, backlog per topic, dead-letter count, active pauses, schema version."""
        return await self._run(self._calls.status())

    async def locks(self) -> list[Lock]:
        """Every lease in distributed_locks."""
        return await self._run(self._calls.locks())

    async def pauses(self, *, include_expired: bool = False) -> list[Pause]:
        return await self._run(self._calls.pauses(include_expired))

    async def stuck(
        self, topic: str | None = None, *, page_size: int = 0, page_token: str | None = None
    ) -> Page[StuckEvent]:
        """Unpublished events that failed at least once, in outbox id order (page_size 0: server default)."""
        return await self._run(self._calls.stuck(topic, page_size, page_token))

    async def dead_letters(
        self,
        *,
        topic: str | None = None,
        key: str | None = None,
        reason: str | None = None,
        archived_after: datetime | None = None,
        archived_before: datetime | None = None,
        page_size: int = 0,
        page_token: str | None = None,
    ) -> Page[DeadLetterSummary]:
        """Dead letters matching every criterion given, oldest first, without payloads."""
        where = _filter(topic, key, reason, archived_after, archived_before)
        return await self._run(self._calls.dead_letters(where, page_size, page_token))

    async def dead_letter(self, dead_letter_id: int) -> DeadLetter:
        """One dead letter with payload, headers and replay history."""
        return await self._run(self._calls.dead_letter(dead_letter_id))

    async def audit(
        self, *, action: str | None = None, page_size: int = 0, page_token: str | None = None
    ) -> Page[AuditEntry]:
        """The audit log, newest first."""
        return await self._run(self._calls.audit(action, page_size, page_token))

    # -- mutations (admin token) --

    async def release_lock(
        self,
        name: str,
        *,
        expected_holder: str | None = None,
        expected_token: int | None = None,
        operator: str | None = None,
    ) -> Lock:
        """Frees a lease if it is still held as expected. Not retried (see the module docstring)."""
        return await self._run(self._calls.release_lock(name, expected_holder, expected_token, operator))

    async def pause(
        self,
        pattern: str = ALL_TOPICS,
        *,
        reason: str,
        ttl: timedelta | float | None = None,
        expires_at: datetime | None = None,
        operator: str | None = None,
    ) -> Pause:
        """Pauses topics matching a shell glob ('*': every topic); replaces an existing pause of the pattern."""
        return await self._run(self._calls.pause(pattern, reason, ttl, expires_at, operator))

    async def resume(self, pattern: str = ALL_TOPICS, *, operator: str | None = None) -> Pause | None:
        """Removes the pause of exactly this pattern; returns it, or None if it was not paused."""
        return await self._run(self._calls.resume(pattern, operator))

    async def park(
        self, event: int | str | uuid.UUID, *, reason: str, operator: str | None = None
    ) -> DeadLetterSummary:
        """Moves an unpublished event (outbox id or message id) to the dead-letter archive now."""
        return await self._run(self._calls.park(event, reason, operator))

    async def replay(
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
    ) -> ReplayResult:
        """Replays dead letters chosen by ids or by filter criteria. ``request_id`` (default: a new
        uuid4, returned in the result) makes the call idempotent: repeat it with the same id."""
        where = _filter(topic, key, reason, archived_after, archived_before)
        return await self._run(self._calls.replay(request_id, ids, where, force, dry_run, operator))

    async def purge(
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
    ) -> PurgeResult:
        """Deletes dead letters chosen by ids or by filter criteria, or every one with
        ``all_dead_letters=True`` (dry_run: only count them)."""
        where = _filter(topic, key, reason, archived_after, archived_before)
        return await self._run(self._calls.purge(ids, where, dry_run, operator, all_dead_letters))


class ControlClient(_ClientBase):
    """Blocking client, same methods and behaviour as AsyncControlClient. Use as ``with`` or ``close()``."""

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
        super().__init__(config, {
            "addr": addr, "token": token, "token_file": token_file, "tls_ca": tls_ca, "tls_cert": tls_cert,
            "tls_key": tls_key, "tls_server_name": tls_server_name, "tls": tls, "timeout": timeout,
            "retries": retries, "operator": operator,
        })
        self._channel: grpc.Channel | None = None
        self._stub: Any = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            channel.close()

    def _get_stub(self) -> Any:
        if self._stub is None:
            credentials, options = self._channel_args()
            if credentials is None:
                self._channel = grpc.insecure_channel(self.config.addr, options=options)
            else:
                self._channel = grpc.secure_channel(self.config.addr, credentials, options=options)
            self._stub = pb_grpc.ControlServiceStub(self._channel)
        return self._stub

    def _run(self, call: _Call[T]) -> T:
        attempts = _Attempts(self.config, call)
        method = getattr(self._get_stub(), call.method)
        metadata = self.config.metadata()
        while True:
            timeout = attempts.timeout()
            try:
                response = method(call.request, timeout=timeout, metadata=metadata, wait_for_ready=False)
            except grpc.RpcError as error:
                outcome = attempts.after(error)
            else:
                return call.convert(response)
            if isinstance(outcome, ControlError):
                # Raised outside the except block: the RpcError is not even kept as __context__.
                raise outcome
            time.sleep(outcome)

    # -- reads --

    def status(self) -> Status:
        """Live instances, backlog per topic, dead-letter count, active pauses, schema version."""
        return self._run(self._calls.status())

    def locks(self) -> list[Lock]:
        """Every lease in distributed_locks."""
        return self._run(self._calls.locks())

    def pauses(self, *, include_expired: bool = False) -> list[Pause]:
        return self._run(self._calls.pauses(include_expired))

    def stuck(self, topic: str | None = None, *, page_size: int = 0, page_token: str | None = None) -> Page[StuckEvent]:
        """Unpublished events that failed at least once, in outbox id order (page_size 0: server default)."""
        return self._run(self._calls.stuck(topic, page_size, page_token))

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
    ) -> Page[DeadLetterSummary]:
        """Dead letters matching every criterion given, oldest first, without payloads."""
        where = _filter(topic, key, reason, archived_after, archived_before)
        return self._run(self._calls.dead_letters(where, page_size, page_token))

    def dead_letter(self, dead_letter_id: int) -> DeadLetter:
        """One dead letter with payload, headers and replay history."""
        return self._run(self._calls.dead_letter(dead_letter_id))

    def audit(self, *, action: str | None = None, page_size: int = 0, page_token: str | None = None) -> Page[AuditEntry]:
        """The audit log, newest first."""
        return self._run(self._calls.audit(action, page_size, page_token))

    # -- mutations (admin token) --

    def release_lock(
        self,
        name: str,
        *,
        expected_holder: str | None = None,
        expected_token: int | None = None,
        operator: str | None = None,
    ) -> Lock:
        """Frees a lease if it is still held as expected. Not retried (see the module docstring)."""
        return self._run(self._calls.release_lock(name, expected_holder, expected_token, operator))

    def pause(
        self,
        pattern: str = ALL_TOPICS,
        *,
        reason: str,
        ttl: timedelta | float | None = None,
        expires_at: datetime | None = None,
        operator: str | None = None,
    ) -> Pause:
        """Pauses topics matching a shell glob ('*': every topic); replaces an existing pause of the pattern."""
        return self._run(self._calls.pause(pattern, reason, ttl, expires_at, operator))

    def resume(self, pattern: str = ALL_TOPICS, *, operator: str | None = None) -> Pause | None:
        """Removes the pause of exactly this pattern; returns it, or None if it was not paused."""
        return self._run(self._calls.resume(pattern, operator))

    def park(self, event: int | str | uuid.UUID, *, reason: str, operator: str | None = None) -> DeadLetterSummary:
        """Moves an unpublished event (outbox id or message id) to the dead-letter archive now."""
        return self._run(self._calls.park(event, reason, operator))

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
    ) -> ReplayResult:
        """Replays dead letters chosen by ids or by filter criteria. ``request_id`` (default: a new
        uuid4, returned in the result) makes the call idempotent: repeat it with the same id."""
        where = _filter(topic, key, reason, archived_after, archived_before)
        return self._run(self._calls.replay(request_id, ids, where, force, dry_run, operator))

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
    ) -> PurgeResult:
        """Deletes dead letters chosen by ids or by filter criteria, or every one with
        ``all_dead_letters=True`` (dry_run: only count them)."""
        where = _filter(topic, key, reason, archived_after, archived_before)
        return self._run(self._calls.purge(ids, where, dry_run, operator, all_dead_letters))

