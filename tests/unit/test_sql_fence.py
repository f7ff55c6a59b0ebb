"""The lease fence is written once (block `lease_fence` in queries.sql) and inlined into every write
on the relay path; no statement spells it out by hand, so the copies cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import relay
from relay.sql import queries

# Every statement on the relay path that writes to outbox or dead_letter_archive.
FENCED_WRITES = (
    "claim_batch",
    "settle_delete",
    "settle_retain",
    "settle_delete_and_claim",
    "settle_retain_and_claim",
    "record_failures",
    "dead_letter",
)

# The shape of a hand-written fence: a lookup of the lease by holder and token.
HAND_WRITTEN_FENCE = re.compile(r"distributed_locks\s+l\s+WHERE\s+l\.name\s*=\s*\$\d+.*?l\.token\s*=", re.S)


def normalized(sql: str) -> str:
    return " ".join(sql.split())


def sql_files() -> list[Path]:
    repo = Path(relay.__file__).resolve().parent.parent
    return sorted(p for top in ("relay", "control") for p in (repo / top).rglob("*.sql"))


def blocks(text: str) -> dict[str, str]:
    parts = re.split(r"^-- ([a-z_]+) --$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.mark.parametrize("name", FENCED_WRITES)
def test_every_relay_write_carries_the_lease_fence(name: str) -> None:
    q = queries("outbox")
    fence = normalized("\n".join(s for s in q["lease_fence"].splitlines() if not s.startswith("--")))
    assert fence.startswith("EXISTS (") and "$2" in fence and "$3" in fence and "$4" in fence
    assert fence in normalized(q[name]), f"{name} is not fenced by the lease_fence fragment"
    assert "{fragment:" not in q[name]


def test_the_fence_is_written_by_hand_nowhere_but_in_its_fragment() -> None:
    files = sql_files()
    assert any(p.name == "queries.sql" for p in files)
    for path in files:
        for name, body in blocks(path.read_text(encoding="utf-8")).items():
            if name == "lease_fence":
                continue
            assert not HAND_WRITTEN_FENCE.search(body), (
                f"{path.name}: block {name} spells out the lease fence; use {{fragment:lease_fence}}"
            )
    raw = [blocks(p.read_text(encoding="utf-8")) for p in files]
    for name in FENCED_WRITES:
        assert any(uses_fence(name, written) for written in raw), (
            f"{name} does not use {{fragment:lease_fence}}"
        )


def uses_fence(name: str, written: dict[str, str]) -> bool:
    """Whether block `name` uses {fragment:lease_fence}, itself or through fragments it uses."""
    body = written.get(name, "")
    return "{fragment:lease_fence}" in body or any(
        uses_fence(fragment, written)
        for fragment in re.findall(r"\{fragment:([a-z_]+)\}", body)
        if fragment != "lease_fence"
    )


def test_inlined_fragments_keep_the_statement_indentation() -> None:
    settle = queries("outbox")["settle_delete"].splitlines()
    fence_line = next(i for i, line in enumerate(settle) if line.strip() == "AND EXISTS (")
    indent = len(settle[fence_line]) - len(settle[fence_line].lstrip())
    assert settle[fence_line + 1].startswith(" " * (indent + 4) + "SELECT 1 FROM")
