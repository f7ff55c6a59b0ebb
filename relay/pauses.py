"""Pause state, written by the control plane into the pauses table and obeyed here."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from relay.store import RelayStore

log = logging.getLogger(__name__)


def glob_to_like(pattern: str) -> str:
    """`*` and `?` become SQL LIKE `%` and `_`; LIKE's own wildcards are escaped; every other character,
    `[` and `]` included, matches itself. This is what a pause pattern means everywhere: the control
    plane refuses `[`/`]` in new pauses (LIKE has no character classes, so the relay could not honour
    `[...]`), and `glob_matches` below is the same match in Python."""
    out = []
    for char in pattern:
        if char in "%_\\":
            out.append("\\" + char)
        elif char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        else:
            out.append(char)
    return "".join(out)


def glob_matches(topic: str, pattern: str) -> bool:
    """Whether `topic` matches the pause `pattern` exactly as the claim's LIKE (glob_to_like) decides."""
    parts = ("." if c == "?" else ".*" if c == "*" else re.escape(c) for c in pattern)
    return re.fullmatch("".join(parts), topic, re.DOTALL) is not None


class PauseState:
    """The current pauses, refreshed by polling (cheap: one indexed read every interval)."""

    def __init__(self, store: RelayStore, interval: float = 0.5, on_change: Callable[[], None] | None = None):
        self._store = store
        self._interval = interval
        self._on_change = on_change
        self._patterns: tuple[str, ...] = ()
        self.like_patterns: tuple[str, ...] = ()

    @property
    def interval(self) -> float:
        """Seconds between refreshes. The service runs `refresh` as a supervised ticker: while it
        fails, the last known pauses are obeyed (relay.supervision logs, counts and retries)."""
        return self._interval

    @property
    def patterns(self) -> tuple[str, ...]:
        return self._patterns

    @property
    def globally_paused(self) -> bool:
        return "*" in self._patterns

    def is_paused(self, topic: str) -> bool:
        return any(glob_matches(topic, pattern) for pattern in self._patterns)

    async def refresh(self) -> None:
        patterns = tuple(sorted(await self._store.active_pause_patterns()))
        if patterns != self._patterns:
            added = set(patterns) - set(self._patterns)
            removed = set(self._patterns) - set(patterns)
            self._patterns = patterns
            self.like_patterns = tuple(glob_to_like(p) for p in patterns)
            log.info("pauses changed", extra={"paused": sorted(added), "resumed": sorted(removed)})
            if self._on_change is not None:
                self._on_change()
