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
    read: bytes | None = None
    admin: bytes | None = None

    @property
    def enabled(self) -> bool:
        return self.read is not None or self.admin is not None

    def __repr__(self) -> str:
        return f"Tokens(read={'set' if self.read else 'unset'}, admin={'set' if self.admin else 'unset'})"


def load_tokens(
    read: SecretStr | None = None,
    read_file: Path | None = None,
    admin: SecretStr | None = None,
    admin_file: Path | None = None,
) -> Tokens:
    tokens = Tokens(
        read=_token("read_token", read, read_file),
        admin=_token("admin_token", admin, admin_file),
    )
    if tokens.read is not None and tokens.read == tokens.admin:
        raise ValueError("OUTBOX_CONTROL_READ_TOKEN: must differ from the admin token")
    return tokens


def _token(name: str, value: SecretStr | None, path: Path | None) -> bytes | None:
    # Each message names the variable (OUTBOX_CONTROL_<NAME>) and never the token.
    variable = f"OUTBOX_CONTROL_{name.upper()}"
    if value is not None and path is not None:
        raise ValueError(f"{variable}: set {variable} or {variable}_FILE, not both")
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ValueError(f"{variable}_FILE: cannot read {name}_file {path} ({error.strerror})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{variable}_FILE: {name}_file {path} is not UTF-8 text") from None
        if not text:
            raise ValueError(f"{variable}_FILE: {name}_file {path} is empty")
        return text.encode()
    text = value.get_secret_value().strip() if value is not None else ""
    return text.encode() if text else None


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
        # Compare against both tokens every time so timing does not tell which one was close.
        is_admin = _matches(presented, self._tokens.admin)
        is_read = _matches(presented, self._tokens.read)
        if is_admin:
            return ADMIN
        if is_read:
            return READER
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


def _matches(presented: bytes, expected: bytes | None) -> bool:
    return expected is not None and hmac.compare_digest(presented, expected)


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
    else 'token:<role>' of the bearer token, or 'anonymous' when authentication is off."""
    try:
        names = context.auth_context().get("x509_common_name") or []
    except Exception:  # a context without transport details (e.g. in-process tests): no certificate
        names = []
    if names:
        name = names[0]
        text = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        return "cn:" + "".join(c if c.isprintable() else "?" for c in text)[:200]
    return "anonymous" if principal is ANONYMOUS or principal.name == ANONYMOUS.name else f"token:{principal.name}"


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
