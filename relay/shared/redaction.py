"""Redaction: a password, token or secret never reaches a log line, an error or a CLI message."""

from __future__ import annotations

import re
import threading
from urllib.parse import unquote

REDACTED = "***"

# The password runs to the last '@' of the authority, since a raw '@' may appear inside it. This covers
# postgresql://user:pw@host, redis://:pw@host and rediss://user:pw@host alike.
_PASSWORD_IN_URL = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^/\s]*@", re.IGNORECASE)
# key=value settings: keyword DSNs (`password=pw`, `password = 'p w'`), PGPASSWORD=pw,
# OUTBOX_KAFKA_SASL_PASSWORD=pw, OUTBOX_CONTROL_ADMIN_TOKEN=t, and ?password=pw or &sslpassword=pw in a URL.
_SECRET_KEY = r"\w*(?:password|passwd|secret)\w*|\w+_token"
_QUOTED = r"'(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?"
_PASSWORD_IN_QUERY = re.compile(rf"(?P<lead>[?&](?:{_SECRET_KEY})=)(?P<value>[^&#\s]*)", re.IGNORECASE)
_SECRET_ASSIGNMENT = re.compile(
    rf"(?P<lead>(?<![\w?&])(?:{_SECRET_KEY})\s*=\s*)(?P<value>{_QUOTED}|[^\s'\"]\S*)", re.IGNORECASE
)
# The same as a JSON member or a Python dict item: "password": "pw", 'admin_token': 't'.
_SECRET_ITEM = re.compile(
    rf"(?P<lead>(?P<q>['\"])(?:{_SECRET_KEY})(?P=q)\s*:\s*)(?P<value>{_QUOTED}|[^\s,}}\]]+)", re.IGNORECASE
)

# Secret values this process knows (database password, tokens...), redacted wherever they appear.
_KNOWN: set[str] = set()
_KNOWN_LOCK = threading.Lock()
_MIN_KNOWN = 6  # shorter values would mangle every message; the patterns above still catch them
_PUBLIC_TEXT = "postgresql postgres redis rediss kafka outbox relay localhost"  # not worth hiding


def remember_secret(value: str | bytes | None) -> None:
    """Redact `value` from every later redact() result of this process (settings call this)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not value:
        return
    candidates = {value, value.strip(), unquote(value)}
    with _KNOWN_LOCK:
        _KNOWN.update(c for c in candidates if len(c) >= _MIN_KNOWN and c.lower() not in _PUBLIC_TEXT)


def forget_secrets() -> None:
    """Forget every remembered value (for tests)."""
    with _KNOWN_LOCK:
        _KNOWN.clear()


def url_password(url: str) -> str | None:
    """The password part of a URL (as written, not unquoted), if it has one; never raises."""
    match = re.match(r"[a-z][a-z0-9+.-]*://[^:/@\s]*:(?P<pw>[^/\s]*)@", url.strip(), re.IGNORECASE)
    return match["pw"] if match else None


def _quoted_value(match: re.Match[str]) -> str:
    value = match["value"]
    quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{match['lead']}{quote}{REDACTED}{quote}"


def redact(text: str) -> str:
    """`text` without secrets: URL passwords (postgresql://, redis://, rediss://...), password query
    parameters, keyword-DSN and variable assignments of passwords, secrets and tokens, and every value
    given to remember_secret(), each replaced with ***."""
    text = _PASSWORD_IN_URL.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    text = _PASSWORD_IN_QUERY.sub(lambda m: f"{m['lead']}{REDACTED}", text)
    text = _SECRET_ASSIGNMENT.sub(_quoted_value, text)
    text = _SECRET_ITEM.sub(_quoted_value, text)
    if _KNOWN:
        with _KNOWN_LOCK:
            known = sorted(_KNOWN, key=len, reverse=True)
        for secret in known:
            if secret in text:
                text = text.replace(secret, REDACTED)
    return text
