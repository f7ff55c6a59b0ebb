"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from alembic import op

from relay.migrations.context import schema

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = None
depends_on = None


def upgrade() -> None:
    s = schema()
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    s = schema()
    ${downgrades if downgrades else "pass"}
