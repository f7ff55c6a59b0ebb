"""Opaque page tokens: base64 of "<list>:<last id>", so a token only works for the list that issued it."""

from __future__ import annotations

import base64
import binascii

from control.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
_MAX_TOKEN_LENGTH = 100
_MAX_ID = 2**63 - 1


def encode_token(kind: str, last_id: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{last_id}".encode()).decode().rstrip("=")


def decode_token(token: str, kind: str, field: str = "page_token") -> int | None:
    """The last id of the previous page, or None for the first page."""
    if not token:
        return None
    problem = InvalidArgument(field, f"is not a page token returned by a previous {kind} page")
    if len(token) > _MAX_TOKEN_LENGTH:
        raise problem
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise problem from None
    prefix, _, number = text.partition(":")
    if prefix != kind or not number.isdigit() or int(number) > _MAX_ID:
        raise problem
    return int(number)


def page_size(value: int, max_size: int, field: str = "page_size") -> int:
    if value < 0:
        raise InvalidArgument(field, f"must not be negative (got {value})")
    if value > max_size:
        raise InvalidArgument(field, f"must be at most {max_size} (got {value})")
    return value or min(DEFAULT_PAGE_SIZE, max_size)
