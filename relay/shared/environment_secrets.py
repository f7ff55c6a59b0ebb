"""The secrets the environment holds, remembered for redact() before any setting is parsed.

Both command-line tools call `remember_environment_secrets()` first, so that even an error raised
before validation (or a path nobody thought of) cannot print a password or a token. It needs no
settings library: `outboxctl` does not load pydantic for it."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from relay.shared.redaction import remember_secret, url_password

_MAX_TOKEN_FILE = 64 * 1024
_DSN_PASSWORD = re.compile(r"(?<!\w)(?:ssl)?password\s*=\s*(?P<value>'(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def remember_environment_secrets(
    environ: Mapping[str, str] | None = None, prefixes: Iterable[str] = ("OUTBOX_",)
) -> None:
    """Remember (for redact()) every secret the environment holds before any setting is parsed: values of
    *PASSWORD*/*TOKEN*/*SECRET* variables (each comma-separated item too), the contents of the files of
    their *_FILE variables and of *_URL_FILE / *_DSN_FILE, the files of OUTBOX_SECRETS_DIR, and the
    passwords of URLs, so that even an error raised before validation (or a path nobody thought of)
    cannot print them."""
    environ = os.environ if environ is None else environ
    for name, value in environ.items():
        upper = name.upper()
        if not (upper.startswith(tuple(prefixes)) or upper == "PGPASSWORD") or not value:
            continue
        if upper == "OUTBOX_SECRETS_DIR":
            with contextlib.suppress(OSError):
                for path in Path(value).iterdir():
                    if path.name.upper().startswith("OUTBOX_"):
                        _remember_file(path, _is_url(path.name.upper()))
        elif upper.endswith("_FILE") and _is_secret_name(upper.removesuffix("_FILE")):
            _remember_file(Path(value), _is_url(upper.removesuffix("_FILE")))
        elif any(word in upper for word in ("PASSWORD", "PASSWD", "TOKEN", "SECRET")):
            _remember_text(value)
        elif _is_url(upper):
            _remember_url(value)


def _is_url(upper: str) -> bool:
    return upper.endswith(("_URL", "_DSN"))


def _is_secret_name(upper: str) -> bool:
    return any(word in upper for word in ("PASSWORD", "PASSWD", "TOKEN", "SECRET")) or _is_url(upper)


def _remember_file(path: Path, url: bool) -> None:
    with contextlib.suppress(OSError, ValueError):
        if path.is_file() and path.stat().st_size <= _MAX_TOKEN_FILE:
            text = path.read_text(encoding="utf-8", errors="replace")
            _remember_url(text) if url else _remember_text(text)


def _remember_text(value: str) -> None:
    """The value, and each of its lines and comma-separated items (several tokens, for rotation)."""
    remember_secret(value.strip())
    for item in value.replace("\n", ",").split(","):
        item = item.strip()
        if item and not item.startswith("#"):
            remember_secret(item)


def _remember_url(value: str) -> None:
    """The password of a URL, or of a keyword DSN."""
    remember_secret(url_password(value.strip()))
    for match in _DSN_PASSWORD.finditer(value):  # a keyword DSN: password=... or password='...'
        remember_secret(match["value"].strip("'").replace("\\'", "'"))
