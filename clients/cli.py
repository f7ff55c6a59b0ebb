"""`outboxctl`: operate an Outbox Relay cluster through its gRPC control plane.

Connection settings come from the global options or from the environment: OUTBOX_CONTROL_ADDR, OUTBOX_CONTROL_TOKEN (or OUTBOX_CONTROL_TOKEN_FILE), OUTBOX_CONTROL_TLS_CA, OUTBOX_CONTROL_CLIENT_CERT and OUTBOX_CONTROL_CLIENT_KEY, OUTBOX_CONTROL_TLS_SERVER_NAME, OUTBOX_CONTROL_TIMEOUT.

Output: tables, or -o json|yaml|wide (--json is -o json), given before or after the command. Shell completion: outboxctl --install-completion.

Exit codes: 0 ok, 1 other error, 2 bad argument, 3 cannot connect or deadline exceeded, 4 unauthenticated, 5 permission denied, 6 not found, 7 failed precondition.
"""

from __future__ import annotations

import base64
import functools
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar
from uuid import UUID, uuid4

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from clients.control import (
    AuditEntry,
    ControlClient,
    ControlConfig,
    ControlError,
    DeadLetter,
    DeadLetterSummary,
    FailedPrecondition,
    InvalidArgument,
    Lock,
    NotFound,
    Page,
    Pause,
    PermissionDenied,
    ReplayResult,
    Status,
    StuckEvent,
    Unauthenticated,
    Unavailable,
    parse_event_ref,
)
from relay.shared.environment_secrets import remember_environment_secrets
from relay.shared.redaction import redact
from relay.shared.version import __version__

T = TypeVar("T")

EXIT_OK = 0
EXIT_OTHER = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_UNAUTHENTICATED = 4
EXIT_PERMISSION_DENIED = 5
EXIT_NOT_FOUND = 6
EXIT_FAILED_PRECONDITION = 7

_EXIT_CODES: tuple[tuple[type[ControlError], int], ...] = (
    (InvalidArgument, EXIT_USAGE),
    (Unavailable, EXIT_UNAVAILABLE),  # DeadlineExceeded included
    (Unauthenticated, EXIT_UNAUTHENTICATED),
    (PermissionDenied, EXIT_PERMISSION_DENIED),
    (NotFound, EXIT_NOT_FOUND),
    (FailedPrecondition, EXIT_FAILED_PRECONDITION),
)
_PROG = "outboxctl"
_PAGE = 100  # the server's default page size; never above any server's maximum by default
_PREVIEW = 2000  # characters of payload shown in a table
_CELL = 80  # characters of a table cell, except with -o wide
_WIDE = 100_000  # the console width of -o wide: nothing is folded or cut
_NO_TOKEN_HINT = "no token was given: set OUTBOX_CONTROL_TOKEN (or OUTBOX_CONTROL_TOKEN_FILE, --token-file)"

# add_completion: --install-completion / --show-completion for bash, zsh, fish and PowerShell.
app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
dead_letters_app = typer.Typer(help="Inspect, replay and purge archived dead letters.", no_args_is_help=True)
app.add_typer(dead_letters_app, name="dead-letters")


# --- global options and the session -------------------------------------------------------------


class OutputFormat(StrEnum):
    TABLE = "table"
    JSON = "json"
    YAML = "yaml"
    WIDE = "wide"


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables (-o json).")]
OutputOption = Annotated[
    OutputFormat | None,
    typer.Option(
        "--output", "-o", case_sensitive=False, help="table (default), json, yaml, or wide (tables, nothing cut)."
    ),
]


@dataclass
class Options:
    addr: str | None = None
    token: str | None = None
    token_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    timeout: float | None = None
    operator: str | None = None
    output: OutputFormat = OutputFormat.TABLE
    config: ControlConfig | None = None

    def __repr__(self) -> str:  # the token stays out of any debug output
        return f"Options(addr={self.addr!r}, output={self.output.value})"

    def set_output(self, json_output: bool, output: OutputFormat | None) -> None:
        """--json / -o, given before the command or after it (the later wins)."""
        if json_output and output not in (None, OutputFormat.JSON):
            _fail(f"--json and -o {output.value} contradict each other; give one", EXIT_USAGE)
        if json_output:
            self.output = OutputFormat.JSON
        elif output is not None:
            self.output = output


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"{_PROG} {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    ctx: typer.Context,
    addr: Annotated[
        str | None, typer.Option("--addr", help="host:port of the control plane (env OUTBOX_CONTROL_ADDR, default 127.0.0.1:50051).")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="Bearer token (env OUTBOX_CONTROL_TOKEN). Prefer the env var or --token-file: "
            "command lines are visible to other users.",
            show_default=False,
        ),
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option("--token-file", help="File holding the token (env OUTBOX_CONTROL_TOKEN_FILE).")
    ] = None,
    tls_ca: Annotated[
        Path | None, typer.Option("--tls-ca", help="PEM CA of the server certificate; enables TLS (env OUTBOX_CONTROL_TLS_CA).")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="PEM client certificate for mTLS (env OUTBOX_CONTROL_CLIENT_CERT).")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="PEM key of --tls-cert (env OUTBOX_CONTROL_CLIENT_KEY).")
    ] = None,
    tls_server_name: Annotated[
        str | None,
        typer.Option("--tls-server-name", help="Name expected in the server certificate (env OUTBOX_CONTROL_TLS_SERVER_NAME)."),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Seconds per call, retries included (env OUTBOX_CONTROL_TIMEOUT, default 10).")
    ] = None,
    operator: Annotated[
        str | None, typer.Option("--operator", help="Who is acting, for the audit log (env OUTBOX_CONTROL_OPERATOR, default: your user).")
    ] = None,
    json_output: JsonOption = False,
    output: OutputOption = None,
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    options = Options(addr, token, token_file, tls_ca, tls_cert, tls_key, tls_server_name, timeout, operator)
    options.set_output(json_output, output)
    ctx.obj = options
    _ACTIVE[:] = [options]


# The options of the running command, so that even an unexpected error's text gets the token redacted.
_ACTIVE: list[Options] = []


def _options(ctx: typer.Context) -> Options:
    options = ctx.find_object(Options)
    return options if options is not None else Options()


def _output_options(command: Callable[..., None]) -> Callable[..., None]:
    """Adds --json and -o/--output to a command, so that they work after it too (`outboxctl status
    --json`), as well as before it (global options)."""
    signature = inspect.signature(command, eval_str=True)
    added = [
        inspect.Parameter("json_output", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=JsonOption),
        inspect.Parameter("output", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=OutputOption),
    ]

    @functools.wraps(command)
    def with_output(*args: Any, json_output: bool = False, output: OutputFormat | None = None, **kwargs: Any) -> None:
        ctx = kwargs.get("ctx") or next(arg for arg in args if isinstance(arg, typer.Context))
        _options(ctx).set_output(json_output, output)
        command(*args, **kwargs)

    with_output.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), *added]
    )
    with_output.__annotations__ = {
        **{name: param.annotation for name, param in signature.parameters.items()},
        **{param.name: param.annotation for param in added},
    }
    return with_output


@contextmanager
def _session(ctx: typer.Context) -> Iterator[ControlClient]:
    """A connected client; every ControlError becomes a one-line message and its exit code."""
    options = _options(ctx)
    try:
        options.config = ControlConfig.resolve(
            options.addr,
            token=options.token,
            token_file=options.token_file,
            tls_ca=options.tls_ca,
            tls_cert=options.tls_cert,
            tls_key=options.tls_key,
            tls_server_name=options.tls_server_name,
            timeout=options.timeout,
            operator=options.operator,
        )
        with ControlClient(config=options.config) as client:
            yield client
    except ControlError as error:
        message = str(error)
        if isinstance(error, Unauthenticated) and options.config is not None and options.config.token is None:
            message = f"{message} ({_NO_TOKEN_HINT})"
        _fail(message, exit_code(error), options)


def exit_code(error: ControlError) -> int:
    for cls, code in _EXIT_CODES:
        if isinstance(error, cls):
            return code
    return EXIT_OTHER


def _redact(text: str, options: Options | None) -> str:
    """`text` without the token (from --token, the environment or a file), URL/DSN passwords or any
    secret this process remembered (relay.shared.redaction.redact)."""
    if options is not None:
        if options.config is not None:
            text = options.config.redact(text)
        if options.token:
            text = text.replace(options.token, "***")
    return redact(text)


def _fail(message: str, code: int, options: Options | None = None) -> NoReturn:
    line = " ".join(_redact(message, options).split())
    typer.echo(f"{_PROG}: error: {line}", err=True)
    raise typer.Exit(code)


def _confirm(ctx: typer.Context, yes: bool, action: str, prompt: Callable[[], str] | None = None) -> None:
    """Asks before a destructive action; refuses (exit 2) without a terminal unless --yes."""
    if yes:
        return
    if not sys.stdin.isatty():
        _fail(f"refusing to {action} without confirmation: stdin is not a terminal; pass --yes", EXIT_USAGE)
    question = prompt() if prompt is not None else f"{action[0].upper()}{action[1:]}?"
    if not typer.confirm(question, default=False, err=True):
        _fail("aborted", EXIT_OTHER)


# --- parsing -------------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)", re.IGNORECASE)
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, option: str) -> timedelta:
    """'90', '90s', '30m', '2h', '1h30m', '7d'."""
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        parts = _DURATION_PART.findall(value)
        if not parts or _DURATION_PART.sub("", value).strip():
            _fail(f"{option}: {text!r} is not a duration like 90s, 30m, 2h or 1h30m", EXIT_USAGE)
        seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if seconds <= 0:
        _fail(f"{option}: must be positive (got {text!r})", EXIT_USAGE)
    return timedelta(seconds=seconds)


def parse_time(text: str | None, option: str) -> datetime | None:
    """ISO-8601 (naive means UTC), 'now', or a duration meaning that long ago ('2h': two hours ago)."""
    if text is None:
        return None
    value = text.strip()
    if value.lower() == "now":
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        if not _DURATION_PART.match(value) and not _is_number(value):
            _fail(f"{option}: {text!r} is neither an ISO-8601 time nor a duration like 2h (ago)", EXIT_USAGE)
        return datetime.now(UTC) - parse_duration(value, option)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- output --------------------------------------------------------------------------------------


def _wide() -> bool:
    return bool(_ACTIVE) and _ACTIVE[0].output is OutputFormat.WIDE


def _console() -> Console:
    if _wide():
        width: int | None = _WIDE
    else:
        width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS") or 200)
    return Console(width=width, highlight=False, soft_wrap=False)


def to_json(value: Any) -> Any:
    """Stable JSON shapes: ISO-8601 times, durations in seconds (key suffix _seconds), UUIDs as text,
    payloads as base64 plus a UTF-8 preview when the bytes are valid UTF-8."""
    if isinstance(value, DeadLetter):
        body = to_json(value.summary)
        body.update(_payload_json(value.payload))
        body["headers"] = dict(value.headers)
        body["replays"] = to_json(list(value.replays))
        return body
    if is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in fields(value):
            item = getattr(value, f.name)
            if isinstance(item, timedelta):
                out[f"{f.name}_seconds"] = item.total_seconds()
            else:
                out[f.name] = to_json(item)
        return out
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if hasattr(value, "items") and callable(value.items):
        return {str(k): to_json(v) for k, v in value.items()}
    return value


def _payload_json(payload: bytes) -> dict[str, Any]:
    try:
        text: str | None = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {"payload_base64": base64.b64encode(payload).decode("ascii"), "payload_utf8": text}


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(to_json(value), indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def _print_yaml(value: Any) -> None:
    import yaml

    sys.stdout.write(yaml.safe_dump(to_json(value), sort_keys=False, allow_unicode=True, default_flow_style=False))


def _emit(ctx: typer.Context, value: Any, human: Callable[[Console], None]) -> None:
    output = _options(ctx).output
    if output is OutputFormat.JSON:
        _print_json(value)
    elif output is OutputFormat.YAML:
        _print_yaml(value)
    else:
        human(_console())


def _t(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


def _age(value: timedelta | None) -> str:
    if value is None:
        return "-"
    seconds = int(value.total_seconds())
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{sign}{days}d{hours}h"
    if hours:
        return f"{sign}{hours}h{minutes:02d}m"
    if minutes:
        return f"{sign}{minutes}m{secs:02d}s"
    return f"{sign}{secs}s"


def _cell(value: Any, limit: int | None = _CELL) -> Text:
    text = "-" if value is None or value == "" else " ".join(str(value).split()) or "-"
    if limit is None or _wide():
        return Text(text)
    return Text(text if len(text) <= limit else text[: limit - 1] + "…")


def _table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False)
    for name in columns:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*(cell if isinstance(cell, Text) else _cell(cell) for cell in row))
    return table


def _line(console: Console, text: str) -> None:
    console.print(Text(text))


def _next_page(token: str | None) -> None:
    if token:
        typer.echo(f"more results: pass --page-token {token}", err=True)


def _collect(fetch: Callable[[int, str | None], Page[T]], limit: int, page_token: str | None) -> tuple[list[T], str | None]:
    """Pages until `limit` items (0: all) are fetched; returns them and the token of what follows."""
    if limit < 0:
        _fail(f"--limit: must not be negative (got {limit})", EXIT_USAGE)
    items: list[T] = []
    token = page_token
    while True:
        size = _PAGE if limit == 0 else min(_PAGE, limit - len(items))
        page = fetch(size, token)
        items.extend(page.items)
        token = page.next_page_token
        if token is None or (limit and len(items) >= limit):
            return items, token


# --- commands ------------------------------------------------------------------------------------

LimitOption = Annotated[int, typer.Option("--limit", help="At most this many rows (0: all).")]
PageTokenOption = Annotated[str | None, typer.Option("--page-token", help="Continue from a previous listing.")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


@app.command()
@_output_options
def status(ctx: typer.Context) -> None:
    """Relay instances, backlog per topic, dead letters, pauses and schema version."""
    with _session(ctx) as client:
        result = client.status()

    def human(console: Console) -> None:
        _show_status(console, result)

    _emit(ctx, result, human)


def _show_status(console: Console, s: Status) -> None:
    _line(console, f"schema version: {s.schema_version or '-'}    server time: {_t(s.server_time)}")
    _line(console, f"instances: {len(s.instances)}    pending: {sum(b.pending_count for b in s.backlog)}    "
                   f"dead letters: {s.dead_letter_count}    pauses: {len(s.pauses)}")
    now = s.server_time or datetime.now(UTC)
    console.print(_table("Instances", ["instance", "host", "pid", "version", "leader", "partitions", "heartbeat"], [
        (i.instance_id, i.hostname, i.pid, i.version, "yes" if i.leader else "no",
         ",".join(map(str, i.partitions)), f"{_age(now - i.heartbeat_at) if i.heartbeat_at else '-'} ago")
        for i in s.instances
    ]))
    console.print(_table("Backlog", ["topic", "pending", "oldest"], [
        (b.topic, b.pending_count, _age(b.oldest_pending_age)) for b in s.backlog
    ]))
    if s.pauses:
        console.print(_pauses_table(list(s.pauses)))


@app.command()
@_output_options
def locks(ctx: typer.Context) -> None:
    """Every lease ('partition:N', 'leader') and who holds it."""
    with _session(ctx) as client:
        result = client.locks()

    def human(console: Console) -> None:
        console.print(_locks_table(result))

    _emit(ctx, result, human)


def _locks_table(items: Sequence[Lock]) -> Table:
    return _table("Locks", ["name", "holder", "token", "acquired", "renewed", "expires", "expired"], [
        (lock.name, lock.holder, lock.token, _t(lock.acquired_at), _t(lock.renewed_at), _t(lock.expires_at),
         "yes" if lock.expired else "no")
        for lock in items
    ])


@app.command("release-lock")
@_output_options
def release_lock(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The lease, e.g. partition:3 or leader.")],
    holder: Annotated[str | None, typer.Option("--holder", help="Release only if this instance holds it.")] = None,
    token: Annotated[int | None, typer.Option("--token", help="Release only if this is the fencing token.")] = None,
    yes: YesOption = False,
) -> None:
    """Free a lease so another instance can take it (give --holder and/or --token as seen in `locks`)."""
    if holder is None and token is None:
        _fail("release-lock: give --holder or --token (as shown by `outboxctl locks`)", EXIT_USAGE)
    expected = " and ".join(
        part for part in (f"holder {holder!r}" if holder else "", f"token {token}" if token is not None else "") if part
    )
    _confirm(ctx, yes, f"release lease {name!r}", lambda: f"Release lease {name!r} (expected {expected})?")
    with _session(ctx) as client:
        result = client.release_lock(name, expected_holder=holder, expected_token=token)
    _emit(ctx, result, lambda c: _line(c, f"released lease {result.name} (fencing token {result.token})"))


@app.command()
@_output_options
def pause(
    ctx: typer.Context,
    reason: Annotated[str, typer.Option("--reason", help="Why, for the other operators.")],
    pattern: Annotated[
        str, typer.Argument(help="Topic glob: '*' any characters, '?' one character (no [...]); '*' (default) pauses every topic.")
    ] = "*",
    ttl: Annotated[str | None, typer.Option("--ttl", help="End the pause by itself after 30m, 2h, 1h30m...")] = None,
) -> None:
    """Stop publishing topics matching PATTERN (again: replaces its reason and expiry).

    PATTERN: '*' matches any characters, '?' one character, anything else itself. Character classes
    ('[...]') are refused: the relay matches pauses with SQL LIKE, which has none."""
    if "[" in pattern or "]" in pattern:
        _fail(
            f"PATTERN: {pattern!r}: '[' and ']' (character classes) are not supported in pause patterns, "
            "the relay could not honour them; use '*' (any characters) and '?' (one character)",
            EXIT_USAGE,
        )
    duration = parse_duration(ttl, "--ttl") if ttl is not None else None
    with _session(ctx) as client:
        result = client.pause(pattern, reason=reason, ttl=duration)
    until = f"until {_t(result.expires_at)}" if result.expires_at else "until resumed"
    _emit(ctx, result, lambda c: _line(c, f"paused {result.topic_pattern!r} {until}"))


@app.command()
@_output_options
def resume(
    ctx: typer.Context,
    pattern: Annotated[str, typer.Argument(help="The paused pattern, exactly as paused; default '*'.")] = "*",
) -> None:
    """Remove the pause of PATTERN."""
    with _session(ctx) as client:
        removed = client.resume(pattern)
    message = f"resumed {pattern!r}" if removed is not None else f"{pattern!r} was not paused"
    _emit(ctx, {"resumed": removed is not None, "pause": removed}, lambda c: _line(c, message))


@app.command()
@_output_options
def pauses(
    ctx: typer.Context,
    include_expired: Annotated[bool, typer.Option("--include-expired", help="Also expired, not yet cleaned up.")] = False,
) -> None:
    """List the pauses."""
    with _session(ctx) as client:
        result = client.pauses(include_expired=include_expired)
    _emit(ctx, result, lambda c: c.print(_pauses_table(result)))


def _pauses_table(items: Sequence[Pause]) -> Table:
    return _table("Pauses", ["id", "pattern", "reason", "paused by", "created", "expires"], [
        (p.id, p.topic_pattern, p.reason, p.paused_by, _t(p.created_at), _t(p.expires_at) if p.expires_at else "never")
        for p in items
    ])


@app.command()
@_output_options
def stuck(
    ctx: typer.Context,
    topic: Annotated[str | None, typer.Option("--topic", help="Only this topic.")] = None,
    limit: LimitOption = 100,
    page_token: PageTokenOption = None,
) -> None:
    """Unpublished events that failed at least once and wait for a retry."""
    with _session(ctx) as client:
        items, token = _collect(lambda size, tok: client.stuck(topic, page_size=size, page_token=tok), limit, page_token)
    _emit(ctx, items, lambda c: c.print(_stuck_table(items)))
    _next_page(token)


def _stuck_table(items: Sequence[StuckEvent]) -> Table:
    return _table("Stuck events", ["id", "message id", "topic", "key", "attempts", "next attempt", "last error"], [
        (e.id, e.message_id, e.topic, e.key, e.attempts, _t(e.next_attempt_at), e.last_error) for e in items
    ])


@app.command()
@_output_options
def park(
    ctx: typer.Context,
    event: Annotated[str, typer.Argument(metavar="ID", help="Outbox id or message UUID of an unpublished event.")],
    reason: Annotated[str, typer.Option("--reason", help="Why, kept in the dead letter.")],
    yes: YesOption = False,
) -> None:
    """Move an unpublished event to the dead-letter archive now (reason 'operator')."""
    try:
        outbox_id, message_id = parse_event_ref(event)
    except InvalidArgument as error:
        _fail(str(error), EXIT_USAGE)
    which = f"event {outbox_id}" if outbox_id is not None else f"event {message_id}"
    _confirm(ctx, yes, f"park {which}", lambda: f"Move {which} out of the outbox into the dead-letter archive?")
    with _session(ctx) as client:
        result = client.park(outbox_id if outbox_id is not None else str(message_id), reason=reason)
    _emit(ctx, result, lambda c: _line(c, f"parked {which} (topic {result.topic}) as dead letter {result.id}"))


@app.command()
@_output_options
def audit(
    ctx: typer.Context,
    action: Annotated[str | None, typer.Option("--action", help="Only this action (RPC name), e.g. Pause.")] = None,
    limit: LimitOption = 50,
    page_token: PageTokenOption = None,
) -> None:
    """The audit log of mutating calls, newest first."""
    with _session(ctx) as client:
        items, token = _collect(lambda size, tok: client.audit(action=action, page_size=size, page_token=tok), limit, page_token)
    _emit(ctx, items, lambda c: c.print(_audit_table(items)))
    _next_page(token)


def _audit_table(items: Sequence[AuditEntry]) -> Table:
    return _table("Audit log", ["id", "at", "actor", "verified as", "action", "arguments", "result"], [
        (e.id, _t(e.at), e.actor, e.client_identity, e.action, json.dumps(e.arguments, sort_keys=True),
         json.dumps(e.result, sort_keys=True))
        for e in items
    ])


# --- dead letters --------------------------------------------------------------------------------

TopicFilter = Annotated[str | None, typer.Option("--topic", help="Exact topic.")]
KeyFilter = Annotated[str | None, typer.Option("--key", help="Exact key.")]
ReasonFilter = Annotated[str | None, typer.Option("--reason", help="Exact reason, e.g. operator.")]
SinceFilter = Annotated[str | None, typer.Option("--since", help="Archived at or after: ISO-8601 (UTC if no offset) or 2h (ago).")]
UntilFilter = Annotated[str | None, typer.Option("--until", help="Archived before: ISO-8601 or 30m (ago).")]
IdsArgument = Annotated[list[int] | None, typer.Argument(metavar="[IDS]...", help="Dead letter ids.", show_default=False)]


@dataclass(frozen=True)
class _Filter:
    topic: str | None
    key: str | None
    reason: str | None
    archived_after: datetime | None
    archived_before: datetime | None

    @classmethod
    def parse(cls, topic: str | None, key: str | None, reason: str | None, since: str | None, until: str | None) -> _Filter:
        return cls(topic, key, reason, parse_time(since, "--since"), parse_time(until, "--until"))

    def kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def is_empty(self) -> bool:
        return all(v is None for v in self.kwargs().values())

    def describe(self) -> str:
        return ", ".join(f"{k}={v.isoformat() if isinstance(v, datetime) else v}" for k, v in self.kwargs().items() if v is not None)


def _selection(ids: list[int] | None, where: _Filter, *, or_all: bool = False) -> tuple[dict[str, Any], str]:
    """The client keyword arguments choosing the dead letters (IDS or the filters), and their description."""
    if ids and not where.is_empty():
        _fail("give dead letter IDS or filters (--topic/--key/--reason/--since/--until), not both", EXIT_USAGE)
    if not ids and where.is_empty():
        everything = " (or --all for every dead letter)" if or_all else ""
        _fail(
            f"give dead letter IDS or at least one filter (--topic/--key/--reason/--since/--until){everything}",
            EXIT_USAGE,
        )
    if ids:
        return {"ids": ids}, f"{len(ids)} dead letter(s) by id"
    return where.kwargs(), f"the dead letters matching {where.describe()}"


def _confirmed(
    ctx: typer.Context, yes: bool, dry_run: bool, action: str, call: Callable[[bool], T], prompt: Callable[[T], str]
) -> T:
    """`call(dry_run)`; unless it is a dry run, first asks `prompt(call(True))` (the dry run's result) via _confirm."""
    if not dry_run:
        _confirm(ctx, yes, action, lambda: prompt(call(True)))
    return call(dry_run)


@dead_letters_app.command("list")
@_output_options
def dead_letters_list(
    ctx: typer.Context,
    topic: TopicFilter = None,
    key: KeyFilter = None,
    reason: ReasonFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    limit: LimitOption = 100,
    page_token: PageTokenOption = None,
) -> None:
    """Archived dead letters, oldest first."""
    where = _Filter.parse(topic, key, reason, since, until)
    with _session(ctx) as client:
        items, token = _collect(
            lambda size, tok: client.dead_letters(**where.kwargs(), page_size=size, page_token=tok), limit, page_token
        )
    _emit(ctx, items, lambda c: c.print(_dead_letters_table(items)))
    _next_page(token)


def _dead_letters_table(items: Sequence[DeadLetterSummary]) -> Table:
    return _table(
        "Dead letters",
        ["id", "outbox id", "topic", "key", "reason", "attempts", "archived", "bytes", "replays", "last error"],
        [
            (d.id, d.outbox_id, d.topic, d.key, d.reason, d.attempts, _t(d.archived_at), d.payload_size,
             d.replay_count, d.last_error)
            for d in items
        ],
    )


@dead_letters_app.command("show")
@_output_options
def dead_letters_show(
    ctx: typer.Context, dead_letter_id: Annotated[int, typer.Argument(metavar="ID", help="Dead letter id.")]
) -> None:
    """One dead letter with payload, headers and replay history."""
    with _session(ctx) as client:
        result = client.dead_letter(dead_letter_id)
    _emit(ctx, result, lambda c: _show_dead_letter(c, result))


def _show_dead_letter(console: Console, d: DeadLetter) -> None:
    s = d.summary
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for label, value in (
        ("id", s.id), ("outbox id", s.outbox_id), ("message id", s.message_id), ("topic", s.topic),
        ("key", s.key), ("reason", s.reason), ("attempts", s.attempts), ("created", _t(s.created_at)),
        ("first attempt", _t(s.first_attempt_at)), ("last attempt", _t(s.last_attempt_at)),
        ("archived", f"{_t(s.archived_at)} by {s.archived_by}"), ("replays", s.replay_count),
        ("payload", f"{s.payload_size} bytes"), ("last error", s.last_error),
    ):
        grid.add_row(Text(label), Text("-" if value is None or value == "" else str(value)))
    console.print(grid)
    if d.headers:
        console.print(_table("Headers", ["name", "value"], sorted(d.headers.items())))
    text = d.payload_text
    if text is None:
        _line(console, f"payload (not UTF-8, base64): {base64.b64encode(d.payload).decode()[:_PREVIEW]}")
    else:
        _line(console, "payload:")
        _line(console, text if len(text) <= _PREVIEW else text[:_PREVIEW] + "…")
    if d.replays:
        console.print(_table("Replays", ["request id", "new message id", "forced", "by", "at"], [
            (r.request_id, r.new_message_id, "yes" if r.forced else "no", r.replayed_by, _t(r.replayed_at))
            for r in d.replays
        ]))


@dead_letters_app.command("replay")
@_output_options
def dead_letters_replay(
    ctx: typer.Context,
    ids: IdsArgument = None,
    topic: TopicFilter = None,
    key: KeyFilter = None,
    reason: ReasonFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    force: Annotated[bool, typer.Option("--force", help="Also replay dead letters replayed before.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be replayed; change nothing.")] = False,
    request_id: Annotated[
        str | None, typer.Option("--request-id", help="Idempotency key: repeating it replays nothing twice (default: new).")
    ] = None,
    yes: YesOption = False,
) -> None:
    """Put dead letters (IDS or those matching the filters) back into the outbox as new events.

    The request id (--request-id, or a new one) is printed on stderr before anything is replayed and
    again with any error: a replay cut off part-way (timeout, lost connection, Ctrl-C) is finished,
    without replaying anything twice, by running the same command with --request-id ID."""
    selection, what = _selection(ids, _Filter.parse(topic, key, reason, since, until))
    rid = request_id or str(uuid4())

    def question(p: ReplayResult) -> str:
        skipped = f", {p.skipped_already_replayed_count} already replayed would be skipped" if p.skipped_already_replayed_count else ""
        return f"Replay {p.replayed_count} dead letter(s) ({what}{skipped})?"

    def call(dry: bool) -> ReplayResult:
        if dry:
            return client.replay(rid, **selection, force=force, dry_run=True)
        retry = f"--request-id {rid}"
        typer.echo(f"{_PROG}: replay request id: {rid} (if this fails, rerun with {retry})", err=True)
        try:
            return client.replay(rid, **selection, force=force, dry_run=False)
        except ControlError as error:
            # Still one error line (printed by _session), now naming the id to finish the request with.
            raise type(error)(
                f"{error.message} (replay request id {rid}: what was done stays done; rerun with {retry} "
                "to finish it without replaying anything twice)",
                code=error.code, method=error.method,
            ) from error
        except BaseException:
            typer.echo(f"{_PROG}: replay request id {rid} was cut off: rerun with {retry} to finish it", err=True)
            raise

    with _session(ctx) as client:
        result = _confirmed(ctx, yes, dry_run, f"replay {what}", call, question)
    _emit(ctx, result, lambda c: _show_replay(c, result))


def _show_replay(console: Console, r: ReplayResult) -> None:
    verb = "would replay" if r.dry_run else "replayed"
    _line(console, f"{verb} {r.replayed_count}, skipped (already replayed) {r.skipped_already_replayed_count}, "
                   f"not found {r.not_found_count}    request id: {r.request_id}")
    for label, ids in (("replayed", r.replayed_ids), ("skipped", r.skipped_already_replayed_ids),
                       ("not found", r.not_found_ids)):
        if ids:
            _line(console, f"  {label}: {' '.join(map(str, ids))}{' …' if r.ids_truncated else ''}")


@dead_letters_app.command("purge")
@_output_options
def dead_letters_purge(
    ctx: typer.Context,
    ids: IdsArgument = None,
    topic: TopicFilter = None,
    key: KeyFilter = None,
    reason: ReasonFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be deleted; delete nothing.")] = False,
    everything: Annotated[
        bool, typer.Option("--all", help="Every dead letter in the archive (instead of IDS or filters).")
    ] = False,
    yes: YesOption = False,
) -> None:
    """Delete dead letters (IDS, those matching the filters, or --all) from the archive, for good.

    Runs in batches of at most 1000 rows; if it is cut off, the batches done stay done."""
    where = _Filter.parse(topic, key, reason, since, until)
    if everything:
        if ids or not where.is_empty():
            _fail("give dead letter IDS, filters or --all, not several", EXIT_USAGE)
        selection: dict[str, Any] = {"all_dead_letters": True}
        what = "ALL dead letters in the archive"
    else:
        selection, what = _selection(ids, where, or_all=True)
    with _session(ctx) as client:
        result = _confirmed(
            ctx, yes, dry_run, f"purge {what}",
            lambda dry: client.purge(**selection, dry_run=dry),
            lambda p: f"Delete {p.purged_count} dead letter(s) ({what}) permanently?",
        )

    def human(console: Console) -> None:
        verb = "would purge" if result.dry_run else "purged"
        _line(console, f"{verb} {result.purged_count} dead letter(s), not found {result.not_found_count}")

    _emit(ctx, result, human)


# --- entry point ---------------------------------------------------------------------------------


def _click_exception(name: str) -> type[Exception]:
    """click's exception classes, whether typer vendors click or depends on it."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


def main(argv: Sequence[str] | None = None) -> None:
    """The `outboxctl` console script: runs one command and exits with its exit code."""
    usage_error = _click_exception("UsageError")
    remember_environment_secrets()  # OUTBOX_CONTROL_TOKEN(_FILE): redacted even before it is parsed
    try:
        result = app(args=list(argv) if argv is not None else None, prog_name=_PROG, standalone_mode=False)
    except usage_error as error:
        if type(error).__name__ == "NoArgsIsHelpError":
            typer.echo(error.format_message(), err=True)  # type: ignore[attr-defined]
            code = EXIT_USAGE
        else:
            context = getattr(error, "ctx", None)
            hint = f" (see '{context.command_path} --help')" if context is not None else ""
            message = " ".join(error.format_message().split())  # type: ignore[attr-defined]
            message = _redact(message, _ACTIVE[0] if _ACTIVE else None)  # e.g. a bad --token value
            typer.echo(f"{_PROG}: error: {message}{hint}", err=True)
            code = EXIT_USAGE
    except typer.Abort:
        typer.echo(f"{_PROG}: aborted", err=True)
        code = EXIT_OTHER
    except KeyboardInterrupt:
        typer.echo(f"{_PROG}: interrupted", err=True)
        code = 130
    except Exception as error:  # one line, never a traceback that could hold a token
        text = " ".join(_redact(str(error), _ACTIVE[0] if _ACTIVE else None).split())
        typer.echo(f"{_PROG}: error: unexpected {type(error).__name__}: {text}", err=True)
        code = EXIT_OTHER
    else:
        code = result if isinstance(result, int) else EXIT_OK
    sys.exit(code)
