"""Where and how to reach the control plane: arguments, OUTBOX_CONTROL_* variables, the bearer
token (kept out of every ``str()``/``repr()``) and the TLS files."""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from clients.control.errors import InvalidArgument

__all__ = ["DEFAULT_ADDR", "DEFAULT_RETRIES", "DEFAULT_TIMEOUT", "ControlConfig"]

DEFAULT_ADDR = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 3
ENV_PREFIX = "OUTBOX_CONTROL_"
SECRETS_DIR = "OUTBOX_SECRETS_DIR"
REDACTED = "***"


class Secret:
    """Holds the token; prints as *** so that no repr, log line or traceback shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return REDACTED

    __str__ = __repr__


@dataclass(frozen=True)
class ControlConfig:
    """Where and how to reach the control plane. Build it with ``ControlConfig.resolve()``."""

    addr: str = DEFAULT_ADDR
    token: Secret | None = field(default=None, repr=False)
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
            return env.get(ENV_PREFIX + name) or None

        address = str(pick(addr, "ADDR") or DEFAULT_ADDR).strip()
        if not address:
            raise InvalidArgument("addr: is empty")
        secret = _load_token(token, token_file, env)
        ca, cert, key = (
            _path(pick(v, n)) for v, n in ((tls_ca, "TLS_CA"), (tls_cert, "CLIENT_CERT"), (tls_key, "CLIENT_KEY"))
        )
        if (cert is None) != (key is None):
            raise InvalidArgument("tls: a client certificate (CLIENT_CERT) and its key (CLIENT_KEY) go together")
        use_tls = tls if tls is not None else _flag(env.get(ENV_PREFIX + "TLS")) or any((ca, cert, key))
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
        who = operator if operator is not None else env.get(ENV_PREFIX + "OPERATOR") or _os_user()
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
            text = text.replace(self.token.reveal(), REDACTED)
        return text


def _load_token(token: str | None, token_file: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Secret | None:
    if token is not None and token_file is not None:
        raise InvalidArgument("token: give a token or a token file, not both")
    value = token
    if value is None and token_file is None:
        value = env.get(ENV_PREFIX + "TOKEN") or None
        from_file = env.get(ENV_PREFIX + "TOKEN_FILE") or None
        if value is not None and from_file is not None:
            raise InvalidArgument(
                f"token: {ENV_PREFIX}TOKEN is set together with {ENV_PREFIX}TOKEN_FILE; set one, not both"
            )
        if value is None and from_file is None and env.get(SECRETS_DIR):
            # A file named OUTBOX_CONTROL_TOKEN in the secrets directory (Docker/Kubernetes secrets).
            candidate = Path(env[SECRETS_DIR]) / (ENV_PREFIX + "TOKEN")
            from_file = str(candidate) if candidate.is_file() else None
        token_file = from_file
    if value is None and token_file is not None:
        try:
            value = Path(token_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc.__class__.__name__
            raise InvalidArgument(f"token_file: cannot read {token_file}: {reason}") from None
    if value is None:
        return None
    value = value.strip()
    if not value:
        if token_file is not None:
            raise InvalidArgument(f"token_file: {token_file} is empty")
        return None
    if not value.isascii() or not value.isprintable() or any(c.isspace() for c in value):
        raise InvalidArgument("token: must be printable ASCII without spaces")
    return Secret(value)


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
