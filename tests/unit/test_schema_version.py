import re
from importlib import resources
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from relay.schema_version import (
    RevisionHistoryError,
    head_revision,
    read_revisions,
    schema_state,
    shipped_revisions,
)


def test_schema_states_for_rolling_upgrades() -> None:
    assert schema_state(head_revision()) == "current"
    assert schema_state(None) == "behind"
    older = sorted(shipped_revisions().known - {head_revision()})
    assert older and all(schema_state(rev) == "behind" for rev in older)
    # A revision this release does not know was written by a newer release: keep running.
    assert schema_state("9999_from_the_future") == "ahead"


def test_the_revisions_read_from_the_scripts_are_alembics() -> None:
    script = ScriptDirectory(str(resources.files("relay") / "migrations"))
    assert head_revision() == script.get_current_head()
    assert shipped_revisions().known == {rev.revision for rev in script.walk_revisions()}


def _scripts(folder: Path, *revisions: tuple[str, str | None], extra: str = "") -> Path:
    for revision, down in revisions:
        (folder / f"{revision}_x.py").write_text(
            f'"""A migration."""\n{extra}revision = "{revision}"\ndown_revision = {down!r}\n'
            "def upgrade() -> None:\n    revision = 'not this one'\n"
        )
    (folder / "README").write_text("not a script")
    return folder


def test_a_line_of_scripts_gives_its_last_revision_as_head(tmp_path: Path) -> None:
    revisions = read_revisions(_scripts(tmp_path, ("0002", "0001"), ("0001", None), ("0003", "0002")))
    assert (revisions.head, revisions.known) == ("0003", {"0001", "0002", "0003"})


@pytest.mark.parametrize(
    ("scripts", "problem"),
    [
        (
            (("0001", None), ("0002", "0001"), ("0003", "0001")),
            "expected one head revision, found ['0002', '0003']",
        ),
        ((("0001", None), ("0002", "0009")), "down_revision ['0009'] has no script"),
        ((("0001", "0001"),), "expected one head revision, found none"),
    ],
)
def test_scripts_that_do_not_form_one_line_are_refused(
    tmp_path: Path, scripts: tuple[tuple[str, str | None], ...], problem: str
) -> None:
    with pytest.raises(RevisionHistoryError, match=re.escape(problem)):
        read_revisions(_scripts(tmp_path, *scripts))


def test_a_script_without_literal_revisions_is_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_x.py").write_text('revision = "00" + "01"\ndown_revision = None\n')
    with pytest.raises(RevisionHistoryError, match=r"0001_x\.py: no literal `revision`"):
        read_revisions(tmp_path)
