"""Bearer-token authentication and role checks, as a grpc.aio server interceptor.

Two roles: the read token may call Get*/List* RPCs; the admin token may call everything. Health and
reflection stay open so that probes and tooling work without credentials. Tokens are compared with
hmac.compare_digest and never logged. With no token configured at all, every caller is 'anonymous'
with admin rights; the server only allows that on loopback (see control.server).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from pydantic import SecretStr

from control.errors import ControlError, PermissionDenied, Unauthenticated, status_for

log = logging.getLogger(__name__)

CONTROL_SERVICE = "outbox.control.v1.ControlService"
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})
READ_ONLY_PREFIXES = ("Get", "List")
_BEARER = "bearer "


@dataclass(frozen=True)
class Principal:
    name: str
    can_mutate: bool
    # What the server verified about the caller, for the audit log (see client_identity); set per call.
    identity: str = ""
    # Which of the role's tokens the caller presented, when the role has several: 'admin#2'.
    token_label: str = ""


ADMIN = Principal("admin", can_mutate=True)
READER = Principal("read", can_mutate=False)
ANONYMOUS = Principal("anonymous", can_mutate=True)

_current: ContextVar[Principal | None] = ContextVar("control_principal", default=None)


def current_principal() -> Principal:
    """The caller of the RPC being served; set by AuthInterceptor around every protected handler."""
    principal = _current.get()
    if principal is None:
        raise RuntimeError("no authenticated principal: is AuthInterceptor installed?")
    return principal


@dataclass(frozen=True, repr=False)
class Tokens:
    """The accepted bearer tokens of each role. Several per role allow rotation without downtime:
    every one is accepted; the audit log tells them apart by position (`token:admin#2`), never by value."""

    reads: tuple[bytes, ...] = ()
    admins: tuple[bytes, ...] = ()

    @property
    def read(self) -> bytes | None:
        return self.reads[0] if self.reads else None

    @property
    def admin(self) -> bytes | None:
        return self.admins[0] if self.admins else None

    @property
    def enabled(self) -> bool:
        return bool(self.reads or self.admins)

    def __repr__(self) -> str:
        return f"Tokens(read={_count(self.reads)}, admin={_count(self.admins)})"


def _count(tokens: tuple[bytes, ...]) -> str:
    return "unset" if not tokens else "set" if len(tokens) == 1 else f"{len(tokens)} set"


def load_tokens(
    read: SecretStr | None = None,
    read_file: Path | None = None,
    admin: SecretStr | None = None,
    admin_file: Path | None = None,
    *,
    reads: SecretStr | None = None,
    admins: SecretStr | None = None,
) -> Tokens:
    """The tokens of OUTBOX_CONTROL_{READ,ADMIN}_TOKEN (or its _FILE: one token per line, blank lines
    and '#' comments skipped) followed by those of OUTBOX_CONTROL_{READ,ADMIN}_TOKENS (comma-separated)."""
    tokens = Tokens(
        reads=_tokens("read_token", read, read_file, reads),
        admins=_tokens("admin_token", admin, admin_file, admins),
    )
    if set(tokens.reads) & set(tokens.admins):
        raise ValueError("OUTBOX_CONTROL_READ_TOKEN: must differ from the admin token")
    return tokens


def _tokens(name: str, value: SecretStr | None, path: Path | None, more: SecretStr | None) -> tuple[bytes, ...]:
    variable = f"OUTBOX_CONTROL_{name.upper()}"
    found = list(_token(name, value, path))
    extra = more.get_secret_value() if more is not None else ""
    found += [item.strip().encode() for item in extra.replace("\n", ",").split(",") if item.strip()]
    for token in found:
        if not token.isascii() or any(c in b" \t\r\n" for c in token):
            raise ValueError(f"{variable}: a token must be ASCII without spaces")
    if len(set(found)) != len(found):
        raise ValueError(f"{variable}: the same token is given twice (OUTBOX_CONTROL_{name.upper()}S / _FILE)")
    return tuple(found)


def _token(name: str, value: SecretStr | None, path: Path | None) -> list[bytes]:
    # Each message names the variable (OUTBOX_CONTROL_<NAME>) and never the token.
    variable = f"OUTBOX_CONTROL_{name.upper()}"
    if value is not None and path is not None:
        raise ValueError(f"{variable}: set together with {variable}_FILE; set one, not both")
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"{variable}_FILE: cannot read {name}_file {path} ({error.strerror})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{variable}_FILE: {path} is not UTF-8 text") from None
        lines = [line.strip() for line in text.splitlines()]
        tokens = [line.encode() for line in lines if line and not line.startswith("#")]
        if not tokens:
            raise ValueError(f"{variable}_FILE: {path} is empty")
        return tokens
    text = value.get_secret_value().strip() if value is not None else ""
    return [text.encode()] if text else []


def is_read_only(method: str) -> bool:
    return method.startswith(READ_ONLY_PREFIXES)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: Tokens) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        service, _, method = details.method.lstrip("/").partition("/")
        if service in OPEN_SERVICES:
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        try:
            principal = self.authenticate(details.invocation_metadata or ())
            self.authorize(principal, service, method)
        except ControlError as denied:
            log.info("denied %s: %s", details.method, denied)
            return _deny(handler, denied)
        return _with_principal(handler, principal)

    def authenticate(self, metadata: Sequence[Any]) -> Principal:
        if not self._tokens.enabled:
            return ANONYMOUS
        presented = _bearer_token(metadata)
        # Compare against every token every time so timing does not tell which one was close.
        admin = _match_index(presented, self._tokens.admins)
        read = _match_index(presented, self._tokens.reads)
        if admin is not None:
            return _numbered(ADMIN, admin, len(self._tokens.admins))
        if read is not None:
            return _numbered(READER, read, len(self._tokens.reads))
        raise Unauthenticated("invalid bearer token")

    @staticmethod
    def authorize(principal: Principal, service: str, method: str) -> None:
        read_only = service == CONTROL_SERVICE and is_read_only(method)
        if not read_only and not principal.can_mutate:
            raise PermissionDenied(f"{method} needs the admin token; the read token allows Get* and List* only")


def _bearer_token(metadata: Sequence[Any]) -> bytes:
    values = [value for key, value in metadata if key == "authorization"]
    if not values:
        raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if len(values) > 1 or not value[: len(_BEARER)].lower() == _BEARER:
        raise Unauthenticated("the authorization metadata must be a single 'Bearer <token>'")
    return value[len(_BEARER) :].strip().encode()


def _match_index(presented: bytes, expected: tuple[bytes, ...]) -> int | None:
    """The position of the token that matches (compared with each of them, in constant time)."""
    found = None
    for index, token in enumerate(expected):
        if hmac.compare_digest(presented, token) and found is None:
            found = index
    return found


def _numbered(role: Principal, index: int, count: int) -> Principal:
    """The role's principal; with several tokens for the role, labelled by the token's position (1-based)."""
    return role if count == 1 else replace(role, token_label=f"{role.name}#{index + 1}")


def _with_principal(handler: grpc.RpcMethodHandler, principal: Principal) -> grpc.RpcMethodHandler:
    if handler.unary_unary is None:
        # Every ControlService RPC is unary; refuse rather than pass an unchecked kind through.
        return _deny(handler, PermissionDenied("streaming RPCs are not supported by the control plane"))
    behavior = handler.unary_unary

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        token = _current.set(replace(principal, identity=client_identity(principal, context)))
        try:
            return await behavior(request, context)
        finally:
            _current.reset(token)

    return grpc.unary_unary_rpc_method_handler(
        call, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def client_identity(principal: Principal, context: grpc.aio.ServicerContext) -> str:
    """Who the transport and the token prove the caller is, unlike the self-declared operator:
    'cn:<subject CN>' when the caller presented a client certificate the server verified (mTLS: the
    server only asks for one, and gRPC only reports it, when OUTBOX_CONTROL_TLS_CLIENT_CA is set),
    else 'token:<role>' of the bearer token ('token:<role>#<n>', the token's position, when the role has
    several tokens), or 'anonymous' when authentication is off."""
    try:
        names = context.auth_context().get("x509_common_name") or []
    except Exception:  # a context without transport details (e.g. in-process tests): no certificate
        names = []
    if names:
        name = names[0]
        text = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        return "cn:" + "".join(c if c.isprintable() else "?" for c in text)[:200]
    if principal is ANONYMOUS or principal.name == ANONYMOUS.name:
        return "anonymous"
    return f"token:{principal.token_label or principal.name}"


def _deny(handler: grpc.RpcMethodHandler, error: ControlError) -> grpc.RpcMethodHandler:
    code, message = status_for(error)

    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return factory(
        abort, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
