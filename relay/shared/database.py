"""DatabaseSettings: what every command that touches the database reads (OUTBOX_DATABASE_URL, OUTBOX_SCHEMA)."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from relay.shared.identifiers import validate_schema_name
from relay.shared.redaction import remember_secret, url_password
from relay.shared.secret_files import SecretFilesMixin


class DatabaseSettings(SecretFilesMixin, BaseSettings):
    """What every command that touches the database needs. Secret settings may also come from
    `<VAR>_FILE` or OUTBOX_SECRETS_DIR (relay.shared.secret_files)."""

    model_config = SettingsConfigDict(
        env_prefix="OUTBOX_", extra="ignore", populate_by_name=True, env_ignore_empty=True
    )

    database_url: SecretStr = Field(
        SecretStr("postgresql://postgres@127.0.0.1:5432/postgres"),
        description="PostgreSQL URL (postgresql://user:password@host:port/db). Never logged.",
    )
    schema_name: str = Field("outbox", alias="OUTBOX_SCHEMA", description="Schema holding every relay table.")

    @field_validator("schema_name")
    @classmethod
    def _check_schema(cls, value: str) -> str:
        return validate_schema_name(value)

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr) -> SecretStr:
        # The messages never quote the URL: it holds the password, maybe where a parser does not expect it.
        url = value.get_secret_value().strip()
        remember_secret(url_password(url))
        scheme, sep, _ = url.partition("://")
        if not sep or scheme.split("+", 1)[0].lower() not in ("postgresql", "postgres"):
            raise ValueError(
                "must be a postgresql:// URL such as postgresql://app@db:5432/app"
                " (a key=value connection string is not supported)"
            )
        try:
            urlsplit(url).port  # noqa: B018 - raises for a port that is not a number
        except ValueError:
            raise ValueError(
                "is not a valid URL (check the port, and that a password with : / @ ? # is %-encoded)"
            ) from None
        return SecretStr(url)
