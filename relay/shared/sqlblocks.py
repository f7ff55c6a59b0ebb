"""Files of named SQL blocks, loaded into a name -> statement mapping (relay/sql/queries.sql for the relay,
control/queries.sql for the control plane): one place to read every statement a package runs.

The format, documented again at the top of each file:
- A block starts at a `-- name --` line and runs to the next one; a name defined twice is an error.
- `{fragment:name}` inlines block `name`: a clause written once and used by several statements (the
  relay's lease fence, the control plane's dead-letter filter). The fragment's leading comment lines
  are dropped, its further lines indented as far as the placeholder's line, a trailing `;` removed.
  A fragment may use other fragments (never itself), and comes from the same file; it stays in the
  mapping too.
- `{schema}` becomes the quoted schema name (bind_schema).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from importlib import resources

from relay.shared.identifiers import quote_schema

_BLOCK = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)
FRAGMENT = re.compile(r"\{fragment:([a-z_]+)\}")


def read_blocks(text: str) -> dict[str, str]:
    """The blocks of one file as written (fragments not inlined, {schema} not bound)."""
    found: dict[str, str] = {}
    parts = _BLOCK.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in found:
            raise RuntimeError(f"SQL block {name!r} is defined twice")
        found[name] = body.strip()
    return found


def inline_fragments(blocks: Mapping[str, str]) -> dict[str, str]:
    """Every block with each `{fragment:x}` replaced by block x, itself with its fragments inlined."""
    return {name: _inline(name, body, blocks, ()) for name, body in blocks.items()}


def _inline(name: str, body: str, blocks: Mapping[str, str], using: tuple[str, ...]) -> str:
    def inline(match: re.Match[str]) -> str:
        fragment = match.group(1)
        if fragment not in blocks:
            raise RuntimeError(f"SQL block {name!r} uses unknown fragment {fragment!r}")
        if fragment in using or fragment == name:
            raise RuntimeError(f"SQL fragment {fragment!r} uses itself (through {' -> '.join(using)})")
        text = _inline(fragment, blocks[fragment], blocks, (*using, name))
        lines = text.splitlines()
        while lines and lines[0].lstrip().startswith("--"):
            lines.pop(0)
        line_start = body.rfind("\n", 0, match.start()) + 1
        line = body[line_start : match.start()]
        indent = line[: len(line) - len(line.lstrip())]
        return ("\n" + indent).join(lines).rstrip(";")

    return FRAGMENT.sub(inline, body)


@cache
def load_blocks(package: str, filename: str) -> Mapping[str, str]:
    """The blocks of `filename` in `package`, fragments inlined, `{schema}` still to bind."""
    text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
    return inline_fragments(read_blocks(text))


def bind_schema(blocks: Mapping[str, str], schema: str) -> dict[str, str]:
    """`blocks` with `{schema}` replaced by the quoted, validated schema name."""
    quoted = quote_schema(schema)
    return {name: body.replace("{schema}", quoted) for name, body in blocks.items()}
