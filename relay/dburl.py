"""Database URL helpers: driver prefixes and redaction (a password never reaches a log)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# The password runs to the last '@' of the authority, since a raw '@' may appear inside it.
_PASSWORD_IN_URL = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^/\s]*@", re.IGNORECASE)
_PASSWORD_IN_QUERY = re.compile(r"(?P<lead>[?&](?:password|sslpassword)=)[^&\s]*", re.IGNORECASE)


def redact(text: str) -> str:
    """Replace the password of every URL in `text` with ***."""
    text = _PASSWORD_IN_URL.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _PASSWORD_IN_QUERY.sub(lambda m: f"{m['lead']}***", text)


def plain_postgres_url(url: str) -> str:
    """The URL asyncpg and psycopg accept: postgresql://..., whatever driver prefix it came with."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {redact(url)}")
    return urlunsplit(("postgresql", *parts[1:]))


def sqlalchemy_url(url: str, driver: str = "psycopg") -> str:
    return "postgresql+" + driver + plain_postgres_url(url)[len("postgresql") :]
