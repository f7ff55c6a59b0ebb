"""Alembic environment: one schema, its own version table, and no ORM models (migrations are SQL)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

config = context.config
schema_name: str = config.attributes["schema"]


def run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        literal_binds=True,
        # The SQL is for psql, not a DBAPI: with the driver's 'pyformat' style every '%' in a
        # migration (the partition column's modulo) would come out doubled as '%%'.
        dialect_opts={"paramstyle": "named"},
        version_table_schema=schema_name,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        engine = create_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=pool.NullPool)
        with engine.connect() as connection:
            _run(connection)
    else:
        _run(connection)


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        version_table_schema=schema_name,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
