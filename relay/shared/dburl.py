"""Database URLs: the driver prefix each client library wants (the password stays redacted in errors)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from relay.shared.redaction import redact


def plain_postgres_url(url: str) -> str:
    """The URL asyncpg and psycopg accept: postgresql://..., whatever driver prefix it came with."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("not a valid PostgreSQL URL") from None
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {redact(url)}")
    return urlunsplit(("postgresql", *parts[1:]))


def sqlalchemy_url(url: str, driver: str = "psycopg") -> str:
    return "postgresql+" + driver + plain_postgres_url(url)[len("postgresql") :]
