"""Secrets from files: every secret setting `OUTBOX_X` may instead be given as `OUTBOX_X_FILE` (a path
whose content is the value, a trailing newline stripped; a model with its own `x_file` field reads
that file itself), or as a file named `OUTBOX_X` in the
directory `OUTBOX_SECRETS_DIR` (Docker and Kubernetes secrets mount files like that).

Precedence: the variable itself, else `<VAR>_FILE`, else the secrets directory. Setting both the
variable and `<VAR>_FILE` is an error naming both. A file that cannot be read is a one-line error
naming the variable and the path, never the content; what a file holds is remembered for redaction
the moment it is read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretBytes, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsError

from relay.shared.redaction import remember_secret, url_password

__all__ = [
    "SECRETS_DIR_VARIABLE",
    "SecretFilesMixin",
    "SecretFilesSource",
    "read_secret_file",
    "secret_variables",
]

SECRETS_DIR_VARIABLE = "OUTBOX_SECRETS_DIR"
MAX_SECRET_FILE = 64 * 1024


def _is_secret(info: FieldInfo) -> bool:
    annotation = repr(info.annotation)
    return SecretStr.__name__ in annotation or SecretBytes.__name__ in annotation


def _variable(settings_cls: type[BaseSettings], name: str, info: FieldInfo) -> str:
    if isinstance(info.alias, str):
        return info.alias.upper()
    return f"{settings_cls.model_config.get('env_prefix', '')}{name}".upper()


def secret_variables(settings_cls: type[BaseSettings]) -> dict[str, str]:
    """Field name (or alias) -> environment variable, for each secret field of `settings_cls`."""
    found: dict[str, str] = {}
    for name, info in settings_cls.model_fields.items():
        if _is_secret(info):
            key = info.alias if isinstance(info.alias, str) else name
            found[key] = _variable(settings_cls, name, info)
    return found


def read_secret_file(variable: str, path: Path) -> str:
    """The secret in `path`, for `variable` (named in every error, with the path; the content never)."""
    try:
        if path.stat().st_size > MAX_SECRET_FILE:
            raise SettingsError(f"{variable}: {path} is larger than {MAX_SECRET_FILE // 1024} KiB: not a secret file")
        data = path.read_bytes()
    except OSError as error:
        raise SettingsError(f"{variable}: cannot read {path} ({error.strerror or type(error).__name__})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SettingsError(f"{variable}: {path} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text.strip():
        raise SettingsError(f"{variable}: {path} is empty")
    remember_secret(text)
    remember_secret(url_password(text.strip()))
    return text


def secrets_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    environ = os.environ if environ is None else environ
    value = (environ.get(SECRETS_DIR_VARIABLE) or "").strip()
    if not value:
        return None
    directory = Path(value)
    if not directory.is_dir():
        raise SettingsError(f"{SECRETS_DIR_VARIABLE}: {directory} is not a directory (or cannot be read)")
    return directory


class SecretFilesSource(PydanticBaseSettingsSource):
    """Fills the secret fields of `settings_cls` from `<VAR>_FILE` files and the secrets directory."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str] | None = None) -> None:
        super().__init__(settings_cls)
        self._environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads every field at once

    def __call__(self) -> dict[str, Any]:
        environ = os.environ if self._environ is None else self._environ
        directory = secrets_dir(environ)
        values: dict[str, Any] = {}
        fields = self.settings_cls.model_fields
        for key, variable in secret_variables(self.settings_cls).items():
            file_variable = f"{variable}_FILE"
            direct = (environ.get(variable) or "").strip()
            path = (environ.get(file_variable) or "").strip()
            if f"{key}_file" in fields:
                # The model reads this file itself (the control plane's tokens: several per file).
                if directory is not None and not direct and not path and (directory / variable).exists():
                    values[f"{key}_file"] = directory / variable
                continue
            if path:
                if direct:
                    raise SettingsError(f"{variable}: set together with {file_variable}; set one, not both")
                values[key] = read_secret_file(file_variable, Path(path))
            elif directory is not None and not direct:
                candidate = directory / variable
                if candidate.exists():
                    values[key] = read_secret_file(variable, candidate)
        return values


class SecretFilesMixin:
    """Put before BaseSettings: the environment wins over `<VAR>_FILE` and the secrets directory."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, SecretFilesSource(settings_cls), dotenv_settings, file_secret_settings)
