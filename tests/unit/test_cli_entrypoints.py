"""`outbox-relay` and `outboxctl`: --version (from the launchers and from the commands themselves),
shell completion, and the one line naming a missing extra."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay.shared import launch
from relay.shared.version import __version__

ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False
    )


@pytest.mark.parametrize(
    ("argv", "prog"),
    [
        (("-m", "outbox_relay", "--version"), "outbox-relay"),  # the launcher (outbox_relay.console)
        (("-m", "outbox_relay", "-V"), "outbox-relay"),
        (("-m", "clients.console", "--version"), "outboxctl"),
        (
            ("-c", "from outbox_relay.cli import main; main()", "--version"),
            "outbox-relay",
        ),  # the commands' own option
        (("-c", "from clients.cli import main; main()", "--version"), "outboxctl"),
    ],
)
def test_version(argv: tuple[str, ...], prog: str) -> None:
    result = _run(*argv)
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, f"{prog} {__version__}", "")


@pytest.mark.parametrize(
    ("argv", "function"),
    [
        (("-m", "clients.console", "--show-completion", "bash"), "_outboxctl_completion"),
        (("-m", "outbox_relay", "--show-completion", "bash"), "_outbox_relay_completion"),
    ],
)
def test_shell_completion(argv: tuple[str, ...], function: str) -> None:
    result = _run(*argv)
    assert result.returncode == 0, result.stderr
    # The script names the function bash calls, which asks the command itself for completions.
    assert function in result.stdout and "complete " in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("module", "prog"), [("clients.console", "outboxctl"), ("outbox_relay", "outbox-relay")]
)
@pytest.mark.parametrize(
    ("shell", "marker"),
    [
        ("zsh", "#compdef {prog}"),
        ("fish", "complete --command {prog}"),
        ("powershell", "Register-ArgumentCompleter"),
    ],
)
def test_show_completion_prints_the_named_shells_script_not_the_detected_ones(
    module: str, prog: str, shell: str, marker: str
) -> None:
    """This test runs under bash or under no shell at all (CI): the shell named is the one whose script is printed."""
    result = _run("-m", module, "--show-completion", shell)
    assert result.returncode == 0, result.stderr
    assert marker.format(prog=prog) in result.stdout, result.stdout[:300]


def test_help_mentions_completion_and_output_formats() -> None:
    result = _run("-m", "clients.console", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--install-completion" in text and "--version" in text and "--output" in text


def test_a_missing_extra_is_named_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(launch.EXTRAS, "relay", ("grpc", "no_such_module_outbox_17", "no_such_pkg_17.sub"))
    loaded: list[bool] = []
    with pytest.raises(SystemExit) as exit_info:
        launch.launch("outbox-relay", "relay", lambda: lambda: loaded.append(True), argv=["run", "--migrate"])
    assert exit_info.value.code == 1 and not loaded
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "error: outbox-relay run needs the 'relay' extra, which is not installed (missing: no_such_module_outbox_17,"
        " no_such_pkg_17.sub); install it with: pip install 'outbox-relay[relay]'"
    ]


def test_installed_extras_run_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    ran: list[bool] = []
    launch.launch("outboxctl", "cli", lambda: lambda: ran.append(True), argv=["status"])
    assert ran == [True]
    assert os.environ["GRPC_VERBOSITY"] == "ERROR"  # set before the command imports grpc


@pytest.mark.parametrize(
    ("module", "unused"),
    [
        ("relay.service", ("alembic", "sqlalchemy")),
        ("outbox_relay.cli", ("alembic", "sqlalchemy")),
        ("clients.cli", ("alembic", "sqlalchemy", "pydantic")),
    ],
)
def test_each_process_loads_only_the_libraries_it_uses(module: str, unused: tuple[str, ...]) -> None:
    """Alembic and SQLAlchemy cost a relay process about 24 MiB and half a second at start: only
    `outbox-relay migrate` and `run --migrate` load them. `outboxctl` needs no settings library, and
    pydantic would add a sixth to its start-up (an operator runs it many times in a row)."""
    probe = f"import sys, {module}\nprint(sorted(m for m in {unused!r} if m in sys.modules))"
    loaded = _run("-c", probe)
    assert (loaded.returncode, loaded.stdout.strip()) == (0, "[]"), loaded
