"""limit buckets: a token's requests, slots and tokens by the second and the minute

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 14:00:00

"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade():
    # The windows restart empty: a call in flight across the upgrade is not counted.
    op.drop_table("limit_tokens")
    op.drop_table("limit_admissions")
    op.create_table(
        "limit_buckets",
        sa.Column("token_id", sa.String(length=36), nullable=False),
        sa.Column("span", sa.Integer(), nullable=False),
        sa.Column("starts_at", sa.DateTime(), nullable=False),
        sa.Column("requests", sa.Integer(), server_default="0", nullable=False),
        sa.Column("slots", sa.Integer(), server_default="0", nullable=False),
        sa.Column("tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["token_id"], ["api_tokens.id"], name="fk_limit_buckets_token_id", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("token_id", "span", "starts_at"),
        sqlite_with_rowid=False,  # a window's rows read in the key's order, without a second lookup
    )


def downgrade():
    op.drop_table("limit_buckets")
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
