"""token limits

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 10:00:00

"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

LIMIT_NAMES = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "max_parallel")


def upgrade():
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        for name in LIMIT_NAMES:
            batch_op.add_column(sa.Column(name, sa.Integer(), nullable=True))
    op.create_table(
        "limit_admissions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("token_id", sa.String(length=36), nullable=False),
        sa.Column("admitted_at", sa.DateTime(), nullable=False),
        sa.Column("slot_expires_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["token_id"], ["api_tokens.id"], name="fk_limit_admissions_token_id", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_limit_admissions_token_admitted", "limit_admissions", ["token_id", "admitted_at"])
    op.create_index("ix_limit_admissions_token_slot", "limit_admissions", ["token_id", "slot_expires_at"])
    op.create_table(
        "limit_tokens",
        sa.Column("token_id", sa.String(length=36), nullable=False),
        sa.Column("span", sa.Integer(), nullable=False),
        sa.Column("starts_at", sa.DateTime(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["token_id"], ["api_tokens.id"], name="fk_limit_tokens_token_id", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("token_id", "span", "starts_at"),
    )


def downgrade():
    op.drop_table("limit_tokens")
    op.drop_table("limit_admissions")
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        for name in reversed(LIMIT_NAMES):
            batch_op.drop_column(name)
