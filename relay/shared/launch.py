"""What both console scripts (`outbox-relay`, `outboxctl`) do before importing their commands: answer
--version, name a missing extra in one line, and keep gRPC core's own log lines off the terminal.

The base install is what writing events needs (the standard library and the caller's driver); each
command or library beyond that names the extra that brings its imports (pyproject.toml's
[project.optional-dependencies], docs/installing.md). Standard library only: this runs before any
third-party import.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Sequence

from relay.shared.version import __version__

__all__ = ["EXTRAS", "install_hint", "launch", "missing_extra_message", "missing_modules"]

# The top-level modules each extra must make importable.
EXTRAS: dict[str, tuple[str, ...]] = {
    "control": ("grpc", "google.protobuf"),
    "cli": ("grpc", "google.protobuf", "pydantic", "typer", "rich", "yaml"),
    "relay": (
        "grpc",
        "google.protobuf",
        "grpc_health",
        "grpc_reflection",
        "asyncpg",
        "aiokafka",
        "redis",
        "pydantic",
        "pydantic_settings",
        "alembic",
        "sqlalchemy",
        "psycopg",
        "opentelemetry.sdk",
        "opentelemetry.exporter.prometheus",
        "prometheus_client",
        "typer",
        "rich",
    ),
    "consumer": ("aiokafka", "redis", "asyncpg"),
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a dotted name whose parent package is missing
        return False


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (empty: the extra is installed)."""
    return [module for module in EXTRAS[extra] if not _importable(module)]


def install_hint(extra: str) -> str:
    return f"pip install 'outbox-relay[{extra}]'"


def missing_extra_message(what: str, extra: str) -> str | None:
    """One line saying that ``what`` needs ``extra`` and how to install it; None when it is installed."""
    missing = missing_modules(extra)
    if not missing:
        return None
    return (
        f"{what} needs the '{extra}' extra, which is not installed (missing: {', '.join(missing)}); "
        f"install it with: {install_hint(extra)}"
    )


# The shells typer writes completion scripts for.
COMPLETION_SHELLS = ("bash", "zsh", "fish", "powershell", "pwsh")


def _show_completion_for_named_shell(prog: str, args: Sequence[str]) -> None:
    """`--show-completion SHELL` prints SHELL's script. Typer's own option ignores the name and
    prints the script of the shell it detects among the parent processes, or fails with "Shell  not
    supported" where it finds none (a Dockerfile's RUN, a CI job, cron); click's completion
    variable names the shell outright."""
    if len(args) == 2 and args[0] == "--show-completion" and args[1] in COMPLETION_SHELLS:
        os.environ[f"_{prog.replace('-', '_').upper()}_COMPLETE"] = f"source_{args[1]}"


def launch(
    prog: str,
    extra: str,
    load: Callable[[], Callable[[], None]],
    argv: Sequence[str] | None = None,
    error_prefix: str = "error: ",
) -> None:
    """Prints ``prog version`` for --version/-V; exits 1 with one line when ``extra`` is missing;
    otherwise imports the command line (``load()``) and runs it."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["--version"], ["-V"]):
        print(f"{prog} {__version__}")
        return
    command = next((arg for arg in args if not arg.startswith("-")), "")
    problem = missing_extra_message(f"{prog} {command}".strip(), extra)
    if problem is not None:
        print(f"{error_prefix}{problem}", file=sys.stderr)
        sys.exit(1)
    # gRPC core logs TLS handshake failures and the like on stderr, outside Python's logging; keep
    # only its errors (an explicit GRPC_VERBOSITY wins). Must happen before grpc is imported.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    _show_completion_for_named_shell(prog, args)
    load()()
