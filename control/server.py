"""The gRPC control-plane server: ControlService plus grpc.health.v1 and reflection, on grpc.aio."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import signal
import time
from pathlib import Path
from typing import Self

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import metrics
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from control._generated.outbox.control.v1 import control_pb2 as pb
from control._generated.outbox.control.v1 import control_pb2_grpc as pb_grpc
from control.auth import CONTROL_SERVICE, AuthInterceptor, Tokens, load_tokens
from control.limits import CallLimits
from control.metrics import MetricsInterceptor
from control.servicer import ControlServicer
from control.store import ControlStore, ReplayPacing
from relay.shared.database import DatabaseSettings
from relay.shared.dburl import plain_postgres_url
from relay.shared.redaction import remember_secret
from relay.shared.secret_files import SecretFilesMixin

log = logging.getLogger(__name__)


class InsecureConfigurationError(ValueError):
    """The server would be reachable from other hosts without authentication."""


class ControlSettings(SecretFilesMixin, BaseSettings):
    """Everything the control plane reads. Each field is the env var `OUTBOX_CONTROL_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="OUTBOX_CONTROL_", extra="ignore", env_ignore_empty=True)

    addr: str = Field("127.0.0.1:50051", description="host:port to listen on (port 0: any free port).")
    read_token: SecretStr | None = Field(None, description="Bearer token for Get*/List* RPCs. Never logged.")
    admin_token: SecretStr | None = Field(None, description="Bearer token for every RPC. Never logged.")
    read_token_file: Path | None = Field(
        None, description="File holding the read token (or several, one per line), instead of read_token."
    )
    admin_token_file: Path | None = Field(
        None, description="File holding the admin token (or several, one per line, for rotation)."
    )
    read_tokens: SecretStr | None = Field(
        None, description="More read tokens, comma-separated, all accepted (rotation). Never logged."
    )
    admin_tokens: SecretStr | None = Field(
        None, description="More admin tokens, comma-separated, all accepted (rotation). Never logged."
    )
    tls_cert: Path | None = Field(
        None, description="PEM server certificate (chain); enables TLS with tls_key."
    )
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle; requires client certificates (mTLS)."
    )
    allow_insecure: bool = Field(False, description="Serve on a non-loopback address without tokens.")
    replay_rate: int = Field(5000, ge=1, description="Dead letters replayed per second at most.")
    replay_batch_size: int = Field(1000, ge=1, le=10_000, description="Dead letters per replay transaction.")
    max_page_size: int = Field(1000, ge=1, le=1000, description="Largest page_size a List RPC accepts.")
    instance_timeout: float = Field(
        30.0, gt=0, description="Seconds without heartbeat before an instance is gone."
    )
    pool_size: int = Field(
        4, ge=1, description="Database connections of the control plane's own pool (also inside `run`)."
    )
    statement_timeout: float = Field(
        5.0, gt=0, description="Seconds a control-plane SQL statement may run before the database cancels it."
    )
    lock_timeout: float = Field(2.0, gt=0, description="Seconds a control-plane statement waits for a row lock.")
    idle_in_transaction_timeout: float = Field(
        10.0, gt=0, description="Seconds a control-plane transaction may sit idle before the database ends it."
    )
    max_concurrent_rpcs: int = Field(
        16, ge=1, description="ControlService calls served at once; more are refused with RESOURCE_EXHAUSTED."
    )
    max_deadline: float = Field(
        30.0, gt=0, description="Longest a call may run, whatever deadline the client sets (or none)."
    )
    status_cache_ttl: float = Field(
        2.0, ge=0, description="Seconds GetStatus reuses its backlog and dead-letter figures (0: per call)."
    )
    count_limit: int = Field(
        1_000_000, ge=1, description="Rows GetStatus counts at most for the backlog and for dead letters."
    )
    shutdown_grace: float = Field(5.0, ge=0, description="Seconds in-flight RPCs get on stop.")
    # The same variable as the relay's (`run`): how long a starting process waits for its database.
    startup_timeout: float = Field(
        300.0,
        ge=0,
        alias="OUTBOX_STARTUP_TIMEOUT",
        description="Seconds `control` waits for the database at start before giving up (0: forever).",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        # Messages name the variables, never their values (relay.shared.config_errors prints them).
        for token in (self.read_token, self.admin_token, self.read_tokens, self.admin_tokens):
            if token is not None:
                remember_secret(token.get_secret_value())
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "OUTBOX_CONTROL_TLS_KEY" if self.tls_key is None else "OUTBOX_CONTROL_TLS_CERT"
            raise ValueError(
                f"{missing}: is not set; OUTBOX_CONTROL_TLS_CERT and OUTBOX_CONTROL_TLS_KEY go together"
            )
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(
                "OUTBOX_CONTROL_TLS_CLIENT_CA: needs OUTBOX_CONTROL_TLS_CERT and OUTBOX_CONTROL_TLS_KEY"
            )
        self.tokens()  # token mistakes surface as a configuration error, before anything starts
        return self

    def tokens(self) -> Tokens:
        tokens = load_tokens(
            self.read_token,
            self.read_token_file,
            self.admin_token,
            self.admin_token_file,
            reads=self.read_tokens,
            admins=self.admin_tokens,
        )
        for token in (*tokens.reads, *tokens.admins):
            remember_secret(token)  # also when read from a file: redacted from any later message
        return tokens


def is_loopback(addr: str) -> bool:
    """Whether a gRPC listen address is reachable only from this host."""
    if addr.startswith(("unix:", "unix-abstract:")):
        return True
    host = addr.rsplit(":", 1)[0] if ":" in addr else addr
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(addr: str, tokens: Tokens, allow_insecure: bool) -> None:
    if is_loopback(addr) or tokens.enabled or allow_insecure:
        return
    raise InsecureConfigurationError(
        f"refusing to serve the control plane on non-loopback address {addr} without tokens: set "
        "OUTBOX_CONTROL_ADMIN_TOKEN (and OUTBOX_CONTROL_READ_TOKEN), or OUTBOX_CONTROL_ALLOW_INSECURE=true"
    )


def server_credentials(settings: ControlSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


async def create_control_pool(settings: ControlSettings, database: DatabaseSettings) -> asyncpg.Pool:
    """The control plane's own small pool, never the relay's: however busy the control plane is, the
    relay's lease renewals and claims do not wait behind it for a connection. The database enforces the
    limits on every connection, whatever the statement."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        plain_postgres_url(database.database_url.get_secret_value()),
        min_size=1,
        max_size=settings.pool_size,
        statement_cache_size=getattr(database, "statement_cache_size", 100),
        server_settings={
            "application_name": "outbox-relay-control",
            "statement_timeout": _millis(settings.statement_timeout),
            "lock_timeout": _millis(settings.lock_timeout),
            "idle_in_transaction_session_timeout": _millis(settings.idle_in_transaction_timeout),
        },
    )
    return pool


def _millis(seconds: float) -> str:
    return str(max(1, round(seconds * 1000)))


class ControlServer:
    """Owns the grpc.aio server and, unless one is given, its asyncpg pool.

    Inside `outbox-relay run` it still opens a pool of its own (see create_control_pool)."""

    def __init__(
        self,
        settings: ControlSettings | None = None,
        database: DatabaseSettings | None = None,
        *,
        pool: asyncpg.Pool | None = None,
        meter: metrics.Meter | None = None,
    ) -> None:
        self.settings = settings or ControlSettings()
        self._meter = meter
        self.database = database or DatabaseSettings()
        self._pool = pool
        self._owns_pool = pool is None
        self._server: grpc.aio.Server | None = None
        self._limits: CallLimits | None = None
        self._health: health.aio.HealthServicer | None = None
        self._port = 0

    @property
    def port(self) -> int:
        """The bound port (useful with port 0); 0 before start()."""
        return self._port

    @property
    def address(self) -> str:
        if self.settings.addr.startswith("unix"):
            return self.settings.addr
        host = self.settings.addr.rsplit(":", 1)[0]
        return f"{host}:{self._port}"

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("ControlServer is already started")
        tokens = self.settings.tokens()
        check_exposure(self.settings.addr, tokens, self.settings.allow_insecure)
        credentials = server_credentials(self.settings)
        if tokens.enabled and credentials is None and not is_loopback(self.settings.addr):
            log.warning(
                "control plane on %s without TLS: bearer tokens cross the network in clear text",
                self.settings.addr,
            )
        if self._pool is None:
            self._pool = await create_control_pool(self.settings, self.database)
        try:
            await self._start_grpc(tokens, credentials)
        except BaseException:
            await self._close_pool()
            raise
        log.info(
            "control plane listening on %s (tls=%s, client certificates=%s, auth=%s)",
            self.address,
            credentials is not None,
            self.settings.tls_client_ca is not None,
            tokens,
        )

    async def _start_grpc(self, tokens: Tokens, credentials: grpc.ServerCredentials | None) -> None:
        assert self._pool is not None
        store = ControlStore(
            self._pool,
            self.database.schema_name,
            pacing=ReplayPacing(self.settings.replay_rate, self.settings.replay_batch_size),
            instance_timeout=self.settings.instance_timeout,
            status_cache_ttl=self.settings.status_cache_ttl,
            count_limit=self.settings.count_limit,
        )
        # After authentication, so that callers without a valid token never take a slot.
        self._limits = CallLimits(
            self.settings.max_concurrent_rpcs, self.settings.max_deadline, on_mutation=store.invalidate_status
        )
        interceptors: list[grpc.aio.ServerInterceptor] = [AuthInterceptor(tokens), self._limits]
        if self._meter is not None:
            # Outermost, so denied calls are counted with their status too.
            interceptors.insert(0, MetricsInterceptor(self._meter))
        server = grpc.aio.server(
            interceptors=interceptors,
            # so_reuseport off: a second server on a taken port must fail instead of sharing it.
            options=[("grpc.so_reuseport", 0)],
            # A backstop for what CallLimits does not count (health checks, reflection, unauthenticated
            # calls): gRPC refuses calls beyond it with RESOURCE_EXHAUSTED.
            maximum_concurrent_rpcs=max(64, 4 * self.settings.max_concurrent_rpcs),
        )
        pb_grpc.add_ControlServiceServicer_to_server(
            ControlServicer(store, max_page_size=self.settings.max_page_size), server
        )
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [
                pb.DESCRIPTOR.services_by_name["ControlService"].full_name,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        if credentials is None:
            self._port = server.add_insecure_port(self.settings.addr)
        else:
            self._port = server.add_secure_port(self.settings.addr, credentials)
        await server.start()
        self._server = server
        await self._health.set(health.OVERALL_HEALTH, health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(CONTROL_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, lets in-flight RPCs finish for `grace` seconds, closes an owned pool."""
        server, self._server = self._server, None
        if server is not None:
            if self._health is not None:
                await self._health.enter_graceful_shutdown()
            await server.stop(self.settings.shutdown_grace if grace is None else grace)
        await self._close_pool()

    async def _close_pool(self) -> None:
        if self._owns_pool and self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class DatabaseUnreachableError(Exception):
    """The database did not answer within OUTBOX_STARTUP_TIMEOUT at start."""


# SQLSTATE classes that say "not now" rather than "never": connection (08), authentication (28: a
# password being rotated), resources (53: too many connections), operator intervention (57: starting up).
_WAIT_SQLSTATE_CLASSES = ("08", "28", "53", "57")
_WAIT_INITIAL = 0.5
_WAIT_MAX = 10.0


def _database_not_ready(error: BaseException) -> bool:
    if isinstance(error, (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
        return True
    sqlstate = getattr(error, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate[:2] in _WAIT_SQLSTATE_CLASSES


async def wait_for_database(
    settings: ControlSettings, database: DatabaseSettings, stop: asyncio.Event
) -> asyncpg.Pool | None:
    """The control plane's pool once the database answers, like `run` at start: retried with backoff
    (0.5 s doubling to 10 s), each failure logged, for OUTBOX_STARTUP_TIMEOUT seconds (0: forever),
    then DatabaseUnreachableError. None when `stop` is set meanwhile. Other errors (a wrong database
    name, say) are raised at once."""
    limit = settings.startup_timeout
    deadline = time.monotonic() + limit if limit else math.inf
    delay = _WAIT_INITIAL
    while True:
        try:
            return await create_control_pool(settings, database)
        except Exception as error:
            if not _database_not_ready(error):
                raise
            problem = f"{type(error).__name__}: {error}"
            left = deadline - time.monotonic()
            if left <= 0:
                raise DatabaseUnreachableError(
                    f"database not reachable within OUTBOX_STARTUP_TIMEOUT={limit:g}s: {problem}"
                ) from None
            log.warning("database not reachable (%s); retrying in %.1fs", problem, min(delay, left))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(delay, left)):  # not wait_for: see relay.supervision
                await stop.wait()
        if stop.is_set():
            return None
        delay = min(delay * 2, _WAIT_MAX)


async def serve_forever(
    settings: ControlSettings | None = None,
    database: DatabaseSettings | None = None,
    *,
    pool: asyncpg.Pool | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serves until `stop` is set or SIGINT/SIGTERM arrives (what `outbox-relay control` runs). Without
    a `pool`, waits for the database first (wait_for_database)."""
    settings = settings or ControlSettings()
    database = database or DatabaseSettings()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
    own_pool: asyncpg.Pool | None = None
    try:
        if pool is None:
            check_exposure(settings.addr, settings.tokens(), settings.allow_insecure)  # before any wait
            pool = own_pool = await wait_for_database(settings, database, stop)
            if pool is None:
                return
        server = ControlServer(settings, database, pool=pool)
        try:
            await server.start()
            await stop.wait()
        finally:
            await server.stop()
    finally:
        if own_pool is not None:
            await own_pool.close()
        for signum in installed:
            loop.remove_signal_handler(signum)
