"""`outbox-relay run --help` is where an operator looks first: it must list every variable."""

from __future__ import annotations

from typer.testing import CliRunner

from outbox_relay.cli import app
from relay.config import RelaySettings


def test_run_help_lists_every_setting_with_its_default() -> None:
    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for name, field in RelaySettings.model_fields.items():
        env = field.alias or f"OUTBOX_{name.upper()}"
        assert f"{env} (default:" in text, env
    assert "OUTBOX_BATCH_SIZE (default: 500)" in text
