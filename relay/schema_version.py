"""Which schema revisions this version knows, read from its migration scripts without importing them.

A running relay only compares the schema's revision with these. Alembic and SQLAlchemy, which apply
the migrations (relay.migrate), would add about 24 MiB and half a second to every relay process for
that, so the scripts' `revision` and `down_revision` are read from their source instead."""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


class RevisionHistoryError(RuntimeError):
    """The migration scripts do not form one line of revisions (a packaging or development bug)."""


@dataclass(frozen=True)
class Revisions:
    head: str
    known: frozenset[str]

    def state(self, revision: str | None) -> str:
        """'current', 'behind' (an older revision we know, or none), or 'ahead' (a revision this
        version does not know: a newer release migrated it, as during a rolling upgrade)."""
        if revision == self.head:
            return "current"
        if revision is None or revision in self.known:
            return "behind"
        return "ahead"


def read_revisions(versions: Traversable) -> Revisions:
    """The head and every revision of the scripts in `versions`, which must form one line."""
    parents: dict[str, str | None] = {}
    for script in versions.iterdir():
        if script.name.endswith(".py"):
            revision, down = _script_revisions(script.name, script.read_text(encoding="utf-8"))
            if revision in parents:
                raise RevisionHistoryError(f"revision {revision!r} is defined twice (again in {script.name})")
            parents[revision] = down
    children = {down for down in parents.values() if down is not None}
    missing = sorted(children - set(parents))
    if missing:
        raise RevisionHistoryError(f"down_revision {missing} has no script")
    heads = sorted(set(parents) - children)
    if len(heads) != 1:
        raise RevisionHistoryError(f"expected one head revision, found {heads or 'none'}")
    return Revisions(heads[0], frozenset(parents))


def _script_revisions(name: str, source: str) -> tuple[str, str | None]:
    values: dict[str, object] = {}
    for node in ast.parse(source, filename=name).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in ("revision", "down_revision"):
                    values[target.id] = node.value.value
    revision, down = values.get("revision"), values.get("down_revision")
    if not isinstance(revision, str) or not (down is None or isinstance(down, str)):
        raise RevisionHistoryError(f"{name}: no literal `revision` and `down_revision` (one revision each)")
    return revision, down


@functools.cache
def shipped_revisions() -> Revisions:
    return read_revisions(resources.files("relay") / "migrations" / "versions")


def head_revision() -> str:
    return shipped_revisions().head


def schema_state(revision: str | None) -> str:
    """`Revisions.state` for the scripts this version ships."""
    return shipped_revisions().state(revision)
