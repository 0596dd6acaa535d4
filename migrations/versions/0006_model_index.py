"""the model index; list filters served by indexes in the list's order

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 13:55:00

"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

NEWEST = ["created_at", "id"]


def upgrade():
    with op.batch_alter_table("model_providers") as batch_op:
        batch_op.add_column(sa.Column("models_listed_at", sa.DateTime(), nullable=True))
        batch_op.drop_index("ix_model_providers_type")
        batch_op.drop_index("ix_model_providers_registry")
        batch_op.create_index("ix_model_providers_type_newest", ["type", *NEWEST])
        batch_op.create_index("ix_model_providers_state_newest", ["state", *NEWEST])
        batch_op.create_index("ix_model_providers_registry_newest", ["registry", *NEWEST])
    op.create_table(
        "provider_models",
        sa.Column("provider_id", sa.String(length=36), nullable=False),
        sa.Column("upstream_id", sa.Text(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("owned_by", sa.Text(), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["provider_id"], ["model_providers.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("provider_id", "upstream_id"),
    )
    op.create_index("ix_provider_models_upstream_id", "provider_models", ["upstream_id"])


def downgrade():
    op.drop_index("ix_provider_models_upstream_id", table_name="provider_models")
    op.drop_table("provider_models")
    with op.batch_alter_table("model_providers") as batch_op:
        batch_op.drop_index("ix_model_providers_registry_newest")
        batch_op.drop_index("ix_model_providers_state_newest")
        batch_op.drop_index("ix_model_providers_type_newest")
        batch_op.create_index("ix_model_providers_registry", ["registry"])
        batch_op.create_index("ix_model_providers_type", ["type"])
        batch_op.drop_column("models_listed_at")
