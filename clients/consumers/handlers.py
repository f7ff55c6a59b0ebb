"""Loading the handler a service names as `module:function`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class HandlerError(ValueError):
    """The handler cannot be loaded: the message is one line for the operator."""


def load_handler(spec: str) -> Callable[..., Any]:
    """`package.module:function` (or `module:object.attribute`): the callable, async or sync, that is
    called as handler(conn, message). A sync function runs on the event loop: it must not block, and
    may return an awaitable (say conn.execute(...)), which is awaited."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name.strip() or not attribute.strip():
        raise HandlerError(f"handler {spec!r} must be module:function, e.g. myapp.handlers:on_order")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module itself raised while importing
        raise HandlerError(f"cannot import handler module {module_name!r}: {type(exc).__name__}: {exc}") from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(target):
        raise HandlerError(f"handler {spec!r} is a {type(target).__name__}, not a callable")
    handler: Callable[..., Any] = target
    return handler
