"""Record in relay_instances why an instance is unhealthy (its own sink unavailable for too long).

Additive (expand/contract): a nullable column with no default, so adding it rewrites nothing and
takes its lock only for an instant. Relays older than this revision keep working on the new schema:
they never write the column, their rows keep NULL, and NULL means healthy.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from alembic import op

from relay.migrations.context import schema

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    s = schema()
    # NULL: healthy. Otherwise why this instance hands its partitions over to healthy peers.
    op.execute(f"ALTER TABLE {s}.relay_instances ADD COLUMN IF NOT EXISTS unhealthy_reason text")


def downgrade() -> None:
    s = schema()
    op.execute(f"ALTER TABLE {s}.relay_instances DROP COLUMN IF EXISTS unhealthy_reason")
