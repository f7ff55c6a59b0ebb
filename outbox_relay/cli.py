"""`outbox-relay`: migrate the schema, run a relay, serve the control plane, consume through the inbox,
clean the consumers' inbox, run the demo."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsError
from rich.markup import escape

from clients.consumers.settings import ConsumerSettings
from relay.config import DatabaseSettings, InboxCleanupSettings, RelaySettings
from relay.logs import setup_logging
from relay.shared.config_errors import config_error_lines
from relay.shared.environment_secrets import remember_environment_secrets
from relay.shared.redaction import redact
from relay.shared.version import __version__

if TYPE_CHECKING:
    from control.server import ControlServer
    from relay.service import RelayService

# add_completion: --install-completion / --show-completion for bash, zsh, fish and PowerShell.
app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_show_locals=False)
log = logging.getLogger("outbox_relay.cli")
SettingsT = TypeVar("SettingsT", bound=DatabaseSettings)

LogLevel = Annotated[
    str, typer.Option("--log-level", envvar="OUTBOX_LOG_LEVEL", help="DEBUG, INFO, WARNING...")
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    """Prints `error: <message>`, secrets redacted (URL, DSN and known passwords, tokens)."""
    typer.echo(f"error: {redact(message)}", err=True)
    return typer.Exit(code)


def _invalid(lines: list[str]) -> typer.Exit:
    """One `error: invalid configuration: VARIABLE: problem` line per problem, exit 2."""
    for line in dict.fromkeys(lines):  # once each: two settings classes may report one problem
        typer.echo(f"error: invalid configuration: {redact(line)}", err=True)
    return typer.Exit(2)


def _configuration_errors(kind: type[BaseSettings]) -> tuple[BaseSettings | None, list[str]]:
    """The settings, or the lines describing what is wrong with them (never a secret's value)."""
    try:
        return kind(), []
    except ValidationError as exc:
        return None, config_error_lines(exc, kind)
    except SettingsError as exc:  # a value pydantic-settings could not even decode
        return None, [redact(str(exc))]


def _settings(kind: type[SettingsT]) -> SettingsT:
    remember_environment_secrets()
    settings, errors = _configuration_errors(kind)
    if errors:
        raise _invalid(errors)
    assert isinstance(settings, kind)
    return settings


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"outbox-relay {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Outbox Relay: migrate the schema, run a relay, serve the control plane, run the demo."""


STATUS_EXIT_CODES = {"current": 0, "behind": 3, "ahead": 4}


@app.command()
def migrate(
    sql: Annotated[
        bool,
        typer.Option(
            "--sql",
            help="Print the SQL instead of running it (for psql -v ON_ERROR_STOP=1 -f); --revision may be"
            " FROM:TO.",
        ),
    ] = False,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
    downgrade: Annotated[
        bool, typer.Option("--downgrade", help="Downgrade to --revision (with --sql: from head).")
    ] = False,
    show_status: Annotated[
        bool,
        typer.Option(
            "--status",
            help="Print the schema's revision and this version's head, and change nothing. Exit 0 at"
            " head, 3 behind (run migrate), 4 ahead (a newer release migrated it).",
        ),
    ] = False,
    partitions: Annotated[
        int, typer.Option(envvar="OUTBOX_PARTITIONS", help="Partitions (first migration only).")
    ] = 16,
    log_level: LogLevel = "INFO",
) -> None:
    """Upgrade the schema (safe to run from many instances at once), print its SQL, or show its status."""
    from relay import migrate as migrations  # Alembic and SQLAlchemy: only the commands that migrate

    setup_logging(log_level)
    settings = _settings(DatabaseSettings)
    if show_status:
        if sql or downgrade:
            raise _fail("--status cannot be combined with --sql or --downgrade")
        _print_status(settings)
        return
    if sql:
        try:
            script = migrations.offline_sql(settings, revision, partitions=partitions, downgrade=downgrade)
        except Exception as exc:  # an unknown revision, or a range that is not one
            raise _fail(f"cannot make the SQL for --revision {revision!r}: {exc}") from None
        sys.stdout.write(script)
        return
    try:
        if downgrade:
            reached = migrations.downgrade(settings, revision)
        else:
            reached = migrations.upgrade(settings, revision, partitions=partitions)
    except migrations.MigrationLockTimeout as exc:
        raise _fail(str(exc)) from None
    except Exception as exc:  # one clear line for the operator, no traceback with a URL in it
        raise _fail(
            f"migration of schema {settings.schema_name!r} failed: {type(exc).__name__}: {exc}", 1
        ) from None
    typer.echo(f"schema {settings.schema_name!r} at revision {reached}")


def _print_status(settings: DatabaseSettings) -> None:
    from relay import migrate as migrations

    try:
        status = migrations.status(settings)
    except Exception as exc:  # one clear line for the operator, no traceback with a URL in it
        raise _fail(
            f"cannot read the revision of schema {settings.schema_name!r}: {type(exc).__name__}: {exc}", 1
        ) from None
    typer.echo(f"schema:  {status.schema}")
    typer.echo(f"current: {status.current or 'none (not migrated)'}")
    typer.echo(f"head:    {status.head}")
    if status.state == "current":
        typer.echo("state:   at head")
    elif status.state == "behind":
        typer.echo(f"state:   behind, to apply: {' '.join(status.pending)} (run outbox-relay migrate)")
    else:
        typer.echo(f"state:   ahead: {status.current} is newer than this version knows")
    raise typer.Exit(STATUS_EXIT_CODES[status.state])


def settings_help(kind: type[DatabaseSettings]) -> str:
    """Every variable a command reads, with its default, for --help (docs/configuration.md has more)."""
    lines = ["Environment (docs/configuration.md explains each):\n\n"]
    for name, field in kind.model_fields.items():
        env = field.alias or f"OUTBOX_{name.upper()}"
        if field.default_factory is not None:
            default = "computed"
        elif hasattr(field.default, "get_secret_value"):
            default = redact(field.default.get_secret_value())
        else:
            default = (
                "unset" if field.default is None else str(getattr(field.default, "value", field.default))
            )
        description = f"  {field.description}" if field.description else ""
        lines.append(escape(f"{env} (default: {default or 'empty'}){description}") + "\n\n")
    return "".join(lines)


@app.command(epilog=settings_help(RelaySettings))
def run(
    migrate_first: Annotated[
        bool, typer.Option("--migrate", help="Upgrade the schema before starting.")
    ] = False,
    log_level: LogLevel = "INFO",
) -> None:
    """Run one relay instance until SIGTERM. All settings come from OUTBOX_* env vars.

    Exits 0 only when asked to stop (SIGTERM, SIGINT); 1 when the relay stopped by itself (a task
    kept failing past OUTBOX_SUPERVISOR_GIVE_UP) or could not start, 2 on bad configuration, 3 when
    the schema is behind."""
    remember_environment_secrets()
    relay_settings, errors = _configuration_errors(RelaySettings)
    if os.environ.get("OUTBOX_CONTROL_ADDR"):  # the control plane inside `run` reads OUTBOX_CONTROL_* too
        from control.server import ControlSettings

        errors += _configuration_errors(ControlSettings)[1]
    if errors:
        raise _invalid(errors)
    assert isinstance(relay_settings, RelaySettings)
    settings = relay_settings
    setup_logging(log_level, instance_id=settings.instance_id)
    from relay.service import RelayFailedError, RelayService, SchemaBehindError, run_until_signalled

    try:
        if migrate_first or settings.run_migrations:
            from relay import migrate as migrations

            migrations.upgrade(settings, partitions=settings.partitions)
        service = RelayService(settings)
        if settings.control_addr:
            service.attach(_control_plane(settings, service))
        asyncio.run(run_until_signalled(service))
    except SchemaBehindError as exc:
        raise _fail(str(exc), 3) from None
    except RelayFailedError as exc:  # the traceback is in the log already, where the task failed
        raise _fail(f"relay stopped: {exc}", 1) from None
    except ValidationError as exc:  # str(exc) would show every input value, secrets included
        raise _invalid(config_error_lines(exc)) from None
    except ValueError as exc:
        raise _fail(str(exc)) from None
    except Exception as exc:  # one clear line for the operator, no traceback with a URL in it
        log.debug("relay failed", exc_info=True)
        raise _fail(f"relay failed: {type(exc).__name__}: {exc}", 1) from None


def _control_plane(settings: RelaySettings, service: RelayService) -> ControlServer:
    """The control plane inside `run` (OUTBOX_CONTROL_ADDR): stateless, so any relay instance can serve
    it beside its work. With a pool of its own (OUTBOX_CONTROL_POOL_SIZE connections, with statement and
    lock timeouts), a limit on concurrent calls and a cap on their deadlines: however hard it is called,
    it never takes a connection the relay's lease renewals and claims need (docs/operations.md). Its
    call metrics go to the relay's /metrics. This package is the composition root: relay/ itself never
    imports control/."""
    from control.server import ControlServer, ControlSettings

    return ControlServer(ControlSettings(addr=settings.control_addr), settings, meter=service.meter)


@app.command()
def control(log_level: LogLevel = "INFO") -> None:
    """Serve only the gRPC control plane (stateless: run as many as you like behind a load balancer).
    Settings: OUTBOX_DATABASE_URL, OUTBOX_SCHEMA and OUTBOX_CONTROL_* (see docs/configuration.md).

    Waits for the database at start like `run` (OUTBOX_STARTUP_TIMEOUT); exits 0 only when asked to
    stop, 1 when the database stayed unreachable, 2 on bad configuration."""
    setup_logging(log_level)
    from control.server import (
        ControlSettings,
        DatabaseUnreachableError,
        InsecureConfigurationError,
        serve_forever,
    )

    remember_environment_secrets()
    database, database_errors = _configuration_errors(DatabaseSettings)
    settings, control_errors = _configuration_errors(ControlSettings)
    if database_errors or control_errors:
        raise _invalid(database_errors + control_errors)
    assert isinstance(database, DatabaseSettings) and isinstance(settings, ControlSettings)
    try:
        asyncio.run(serve_forever(settings, database))
    except (InsecureConfigurationError, ValueError) as exc:
        raise _fail(str(exc)) from None
    except DatabaseUnreachableError as exc:
        raise _fail(f"control plane stopped: {exc}", 1) from None
    except Exception as exc:  # one clear line for the operator, no traceback with a URL in it
        log.debug("control plane failed", exc_info=True)
        raise _fail(f"control plane failed: {type(exc).__name__}: {exc}", 1) from None


@app.command("inbox-cleanup")
def inbox_cleanup(
    retention: Annotated[
        float | None,
        typer.Option(help="Seconds processed inbox rows are kept (default: OUTBOX_INBOX_RETENTION, else 7 days).", min=0.001),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Rows deleted per statement (default: OUTBOX_INBOX_CLEANUP_BATCH_SIZE, else 1000).",
            min=1,
            max=100_000,
        ),
    ] = None,
    pause: Annotated[float, typer.Option(help="Seconds between two batches.", min=0)] = 0.05,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be deleted and kept; delete nothing.")
    ] = False,
    log_level: LogLevel = "INFO",
) -> None:
    """Delete the consumers' processed inbox rows older than the retention, in small batches (each a
    short transaction, a pause between them) so consumers keep processing. Rows still processing or
    failed are never deleted. Safe to run while consumers and relays run, and from a cron job."""
    setup_logging(log_level)
    settings = _settings(InboxCleanupSettings)
    keep = settings.inbox_retention if retention is None else retention
    batch = settings.inbox_cleanup_batch_size if batch_size is None else batch_size
    try:
        asyncio.run(_inbox_cleanup(settings, keep, batch, pause, dry_run))
    except Exception as exc:  # one clear line for the operator, no traceback with a URL in it
        log.debug("inbox clean-up failed", exc_info=True)
        raise _fail(f"inbox clean-up failed: {type(exc).__name__}: {exc}", 1) from None


async def _inbox_cleanup(
    settings: InboxCleanupSettings, retention: float, batch: int, pause: float, dry_run: bool
) -> None:
    from relay.maintenance import cleanup_inbox
    from relay.store import RelayStore

    store = RelayStore(settings.database_url.get_secret_value(), settings.schema_name, pool_size=2)
    await store.open()
    try:
        if dry_run:
            expired, kept, processing, failed = await store.inbox_cleanup_counts(retention)
            typer.echo(
                f"dry run: {expired} processed rows older than {retention:g} s would be deleted"
                f" (in batches of {batch}); kept: {kept} processed within the retention,"
                f" {processing} processing, {failed} failed"
            )
            return
        report = await cleanup_inbox(store, retention, batch, pause=pause)
    finally:
        await store.close()
    typer.echo(
        f"deleted {report.deleted} processed inbox rows older than {retention:g} s in {report.batches} batches"
    )


@app.command(epilog=settings_help(ConsumerSettings))
def consume(
    handler: Annotated[
        str,
        typer.Argument(help="The handler, module:function (async or sync), called as handler(conn, message)."),
    ],
    group: Annotated[str, typer.Option("--group", help="Consumer group; also the inbox's consumer name.")],
    kafka: Annotated[
        str | None,
        typer.Option("--kafka", help="Kafka topics, comma-separated, or a shell-style pattern: 'orders.*'."),
    ] = None,
    redis: Annotated[str | None, typer.Option("--redis", help="Redis streams (topics), comma-separated.")] = None,
    shards: Annotated[
        int,
        typer.Option("--shards", min=0, help="Each --redis topic is sharded over streams topic:0..topic:N-1."),
    ] = 0,
    log_level: LogLevel = "INFO",
) -> None:
    """Consume the relay's messages effectively once: run HANDLER for each through the Postgres inbox
    (docs/consumers.md). Exits 0 only when asked to stop (SIGTERM, SIGINT), after the handlers in
    progress finished and committed; 2 on bad configuration or a handler that cannot be loaded, 3 when
    the schema has no inbox table (run migrate), 1 when it could not start."""
    from clients.consumers import HandlerError, kafka_subscription, load_handler

    if (kafka is None) == (redis is None):
        raise _fail("give --kafka TOPICS or --redis STREAMS (one of them)")
    if shards and redis is None:
        raise _fail("--shards applies to --redis only")
    settings = _settings(ConsumerSettings)
    setup_logging(log_level)
    if os.getcwd() not in sys.path:  # like uvicorn: the service's own package from where it runs
        sys.path.insert(0, os.getcwd())
    try:
        function = load_handler(handler)
        consumer = _consumer(settings, group, kafka, redis, shards, function, kafka_subscription)
    except HandlerError as exc:
        raise _fail(str(exc)) from None
    except ValueError as exc:  # a bad name, or an OUTBOX_INBOX_* setting
        raise _fail(str(exc)) from None
    from clients.consumers import SchemaBehindError
    from relay.tracing import TracingConfigError, configure_tracing

    try:
        configure_tracing()
    except TracingConfigError as exc:
        raise _fail(str(exc)) from None
    try:
        asyncio.run(_run_consumer(consumer, settings))
    except SchemaBehindError as exc:
        raise _fail(str(exc), 3) from None
    except Exception as exc:  # one clear line for the operator, no traceback with a URL in it
        log.debug("consumer failed", exc_info=True)
        raise _fail(f"consumer failed: {type(exc).__name__}: {exc}", 1) from None


def _consumer(
    settings: ConsumerSettings,
    group: str,
    kafka: str | None,
    redis: str | None,
    shards: int,
    handler: Callable[..., Any],
    subscription: Callable[[str], tuple[list[str], str | None]],
) -> Any:
    from clients.consumers import KafkaInboxConsumer, RedisInboxConsumer
    from clients.consumers.messages import split_names

    if kafka is not None:
        topics, pattern = subscription(kafka)
        return KafkaInboxConsumer(settings, group=group, handler=handler, topics=topics, pattern=pattern)
    assert redis is not None
    return RedisInboxConsumer(settings, group=group, handler=handler, topics=split_names(redis), shards=shards)


async def _run_consumer(consumer: Any, settings: ConsumerSettings) -> None:
    """Runs the consumer until SIGTERM/SIGINT, with /metrics, /healthz and /readyz on
    OUTBOX_METRICS_ADDR (the inbox's and the consumer's metrics)."""
    import signal

    ops = None
    if settings.metrics_addr:
        from opentelemetry import metrics
        from prometheus_client import CollectorRegistry

        from relay.ops_http import OpsServer, Readiness
        from relay.telemetry import prometheus_meter_provider

        registry = CollectorRegistry()
        metrics.set_meter_provider(prometheus_meter_provider(registry))

        async def readiness() -> Readiness:
            checks = consumer.readiness()
            return Readiness(checks, {name: "not yet" for name, ok in checks.items() if not ok})

        ops = OpsServer(settings.metrics_addr, registry, readiness)
        await ops.start()
    signalled = asyncio.Event()

    def stop() -> None:
        signalled.set()
        consumer.request_stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    try:
        await consumer.run()
    finally:
        if ops is not None:
            await ops.stop()
    if not signalled.is_set():
        raise RuntimeError("the consumer stopped by itself")


@app.command()
def demo(
    duration: Annotated[float, typer.Option(help="Seconds to write events for (0 = until Ctrl-C).")] = 20.0,
    rate: Annotated[int, typer.Option(help="Events written per second.")] = 500,
    instances: Annotated[int, typer.Option(help="Relay instances to run.")] = 2,
    log_level: LogLevel = "WARNING",
) -> None:
    """Start the embedded stack, migrate, run relays and a demo writer, show live progress.
    Runs from a source checkout only (the demo and the embedded servers live in devtools/)."""
    setup_logging(log_level, json_logs=False)
    run_demo = _checkout_demo()
    raise typer.Exit(asyncio.run(run_demo(duration=duration, rate=rate, instances=instances)))


def _checkout_demo() -> Callable[..., Coroutine[Any, Any, int]]:
    """devtools.demo.run_demo from the source checkout this relay package lives in (devtools is not
    installed, and the runtime packages never import it statically)."""
    import importlib
    from pathlib import Path

    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "devtools" / "demo.py").is_file():
        raise _fail("the demo runs from a source checkout: git clone the repository, then ./dev demo")
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    run_demo: Callable[..., Coroutine[Any, Any, int]] = importlib.import_module("devtools.demo").run_demo
    return run_demo


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app(prog_name="outbox-relay")  # also under `python -m outbox_relay`: the name shell completion is set up for


if __name__ == "__main__":
    main()
