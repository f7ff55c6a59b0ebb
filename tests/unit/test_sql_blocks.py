"""relay.shared.sqlblocks, the loader of both SQL files, and the control plane's dead-letter filter: written
once (block `dead_letter_filter` in control/queries.sql) and inlined into every statement that selects
dead letters by filter, so the copies cannot drift apart."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from relay.shared.sqlblocks import bind_schema, inline_fragments, load_blocks, read_blocks

# A predicate of the filter spelled out by hand: a filter column compared with a parameter.
HAND_WRITTEN_FILTER = re.compile(r"\bd\.(?:topic|key|reason|archived_at)\s*(?:=|>=|<)\s*\$\d")
FILTER = (
    "($1::text IS NULL OR d.topic = $1)",
    "($2::text IS NULL OR d.key = $2)",
    "($3::text IS NULL OR d.reason = $3)",
    "($4::timestamptz IS NULL OR d.archived_at >= $4)",
    "($5::timestamptz IS NULL OR d.archived_at < $5)",
)
# List, Replay (and its dry run) and Purge (and its dry-run count): what DeadLetterFilter.sql_args feeds.
FILTERED = (
    "control_dead_letter_page",
    "control_replay_chunk",
    "control_replay_chunk_dry",
    "control_purge_batch",
    "control_purge_count",
)


def control_sql() -> str:
    return resources.files("control").joinpath("queries.sql").read_text(encoding="utf-8")


def test_no_control_block_spells_out_the_dead_letter_filter() -> None:
    for name, body in read_blocks(control_sql()).items():
        if name == "dead_letter_filter":
            continue
        assert not HAND_WRITTEN_FILTER.search(body), (
            f"block {name} filters dead letters by hand; use {{fragment:dead_letter_filter}}"
        )


def test_every_filtering_block_uses_the_fragment() -> None:
    raw = read_blocks(control_sql())
    users = {name for name, body in raw.items() if "{fragment:dead_letter_filter}" in body}
    assert users == set(FILTERED)
    loaded = load_blocks("control", "queries.sql")
    for name in FILTERED:
        statement = " ".join(loaded[name].split())
        assert all(predicate in statement for predicate in FILTER), name
        assert "{fragment:" not in statement


def test_the_fragment_is_the_whole_filter_in_one_order() -> None:
    fragment = " ".join(line for line in read_blocks(control_sql())["dead_letter_filter"].splitlines()
                        if not line.startswith("--"))
    assert " ".join(fragment.split()) == " AND ".join(FILTER)


def test_inlined_filter_lines_up_with_the_statement() -> None:
    page = load_blocks("control", "queries.sql")["control_dead_letter_page"].splitlines()
    first = next(i for i, line in enumerate(page) if FILTER[0] in line)
    indent = page[first].index("AND ")
    assert page[first + 1] == " " * indent + "AND " + FILTER[1]


def test_relay_and_control_statements_are_loaded_apart() -> None:
    relay_blocks = load_blocks("relay.sql", "queries.sql")
    control_blocks = load_blocks("control", "queries.sql")
    assert "claim_batch" in relay_blocks and "claim_batch" not in control_blocks
    assert "control_replay_chunk" in control_blocks and "control_replay_chunk" not in relay_blocks


def test_a_name_defined_twice_is_refused() -> None:
    with pytest.raises(RuntimeError, match="'a' is defined twice"):
        read_blocks("-- a --\nSELECT 1;\n\n-- a --\nSELECT 2;\n")


def test_unknown_and_circular_fragments_are_refused() -> None:
    with pytest.raises(RuntimeError, match="unknown fragment 'nope'"):
        inline_fragments(read_blocks("-- a --\nSELECT 1 WHERE {fragment:nope};\n"))
    circular = "-- f --\n{fragment:g}\n\n-- g --\n{fragment:f}\n\n-- a --\nSELECT 1 WHERE {fragment:g};\n"
    with pytest.raises(RuntimeError, match="uses itself"):
        inline_fragments(read_blocks(circular))


def test_a_fragment_may_use_another_and_each_lines_up_with_its_placeholder() -> None:
    text = (
        "-- f --\n-- the innermost\nx = 1\nAND y = 2\n\n"
        "-- g --\nEXISTS (\n    SELECT 1 WHERE {fragment:f})\n\n"
        "-- a --\nSELECT 1\nWHERE true\n  AND {fragment:g};\n"
    )
    assert inline_fragments(read_blocks(text))["a"] == (
        "SELECT 1\nWHERE true\n  AND EXISTS (\n      SELECT 1 WHERE x = 1\n      AND y = 2);"
    )


def test_schema_is_quoted_and_checked() -> None:
    assert bind_schema({"a": "SELECT * FROM {schema}.outbox"}, "tenant_1") == {
        "a": 'SELECT * FROM "tenant_1".outbox'
    }
    with pytest.raises(ValueError, match="lower-case SQL identifier"):
        bind_schema({"a": "SELECT 1"}, 'x"; DROP TABLE y; --')
