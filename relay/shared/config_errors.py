"""Configuration errors as operators read them: one line per problem, naming the environment variable,
never showing a secret value.

pydantic's own text (`str(ValidationError)`) echoes `input_value=` — for a model-level check that is
every setting, tokens and passwords included — so the CLIs print `config_error_lines()` instead. A
non-secret value is shown (`got '0'`), since that helps; a secret field's value never is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, SecretBytes, SecretStr, ValidationError

from relay.shared.redaction import redact

_SECRET_WORDS = ("password", "passwd", "token", "secret", "url", "dsn")  # URLs may carry a password


def env_name(model: type[BaseModel], field: str) -> str:
    """The environment variable of a settings field (its alias, else env_prefix + NAME)."""
    info = model.model_fields.get(field)
    if info is not None and isinstance(info.alias, str):
        return info.alias
    if field.isupper():  # already a variable name (an alias in `loc`)
        return field
    prefix = str(model.model_config.get("env_prefix", ""))
    return f"{prefix}{field}".upper()


def is_secret_field(model: type[BaseModel], field: str) -> bool:
    """SecretStr fields, and any field whose name says it may hold a secret."""
    name = field.lower()
    info = model.model_fields.get(field)
    if info is None:
        info = next((f for f in model.model_fields.values() if f.alias == field), None)
    annotation = repr(info.annotation) if info is not None else ""
    return (
        any(word in name for word in _SECRET_WORDS)
        or SecretStr.__name__ in annotation
        or SecretBytes.__name__ in annotation
    )


def _message(error: Mapping[str, Any]) -> str:
    message = str(error.get("msg", "invalid"))
    if error.get("type") in ("value_error", "assertion_error"):
        message = message.partition(", ")[2] or message  # "Value error, <the validator's text>"
    return message


def config_error_lines(exc: ValidationError, model: type[BaseModel] | None = None) -> list[str]:
    """One `VARIABLE: problem` line per error of `exc` (raised by `model`), no secret in any of them."""
    model = model or _model_of(exc)
    lines: list[str] = []
    for error in exc.errors(include_url=False, include_context=False):
        loc = error.get("loc", ())
        field = str(loc[0]) if loc else None
        message = _message(error)
        if field is None or model is None:
            # A model-level check: its message names the variables itself. Its input is every setting.
            lines.append(message)
            continue
        variable = env_name(model, field)
        if len(loc) > 1:
            variable += "[" + ".".join(str(part) for part in loc[1:]) + "]"
        value = error.get("input")
        if not is_secret_field(model, field) and isinstance(value, str | int | float) and repr(value) not in message:
            message += f" (got {value!r})"
        # A validator's message may name the variable already ("OUTBOX_ROUTES item 'x' must ...").
        lines.append(message if message.startswith(variable) else f"{variable}: {message}")
    return [redact(" ".join(line.split())) for line in lines]


def _model_of(exc: ValidationError) -> type[BaseModel] | None:
    """The model class a ValidationError came from, found by its title among BaseModel subclasses."""
    title = exc.title
    stack: list[type[BaseModel]] = [BaseModel]
    while stack:
        cls = stack.pop()
        if cls.__name__ == title and cls is not BaseModel:
            return cls
        stack.extend(cls.__subclasses__())
    return None
