"""aggregates kept when a cycle closes (store.aggregates): per cycle, per (cycle, rater), per (cycle, rater,
other rater), and their running totals per rater and per (rater, other rater); an index on when feedback
batches were registered

The tables start empty: the cycles closed before this revision are computed from their comparisons, as
before, until ``python -m store.aggregates`` keeps their aggregates (once).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-09 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

PAIR_COLUMNS = ("a_a", "a_b", "a_tie", "b_a", "b_b", "b_tie", "tie_a", "tie_b", "tie_tie")


def _pair_columns() -> list[sa.Column]:
    return [sa.Column(name, sa.Integer(), nullable=False) for name in PAIR_COLUMNS]


def upgrade() -> None:
    op.create_table(
        "cycle_aggregates",
        sa.Column("cycle_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("open_tasks", sa.Integer(), nullable=False),
        sa.Column("comparisons", sa.Integer(), nullable=False),
        sa.Column("batches", sa.Integer(), nullable=False),
        sa.Column("pairs_with_multiple_raters", sa.Integer(), nullable=False),
        sa.Column("rater_pairs", sa.Integer(), nullable=False),
        sa.Column("agreement", sa.Float(), nullable=True),
        sa.Column("overlap_tasks", sa.Integer(), nullable=False),
        sa.Column("overlap_raters", sa.Integer(), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=True),
        sa.Column("in_totals", sa.Boolean(), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["cycle_id"], ["cycles.id"], name=op.f("fk_cycle_aggregates_cycle_id_cycles")),
        sa.PrimaryKeyConstraint("cycle_id", name=op.f("pk_cycle_aggregates")),
    )
    op.create_table(
        "cycle_rater_aggregates",
        sa.Column("cycle_id", sa.Integer(), nullable=False),
        sa.Column("rater_id", sa.String(length=200), nullable=False),
        sa.Column("answered", sa.Integer(), nullable=False),
        sa.Column("gold_answered", sa.Integer(), nullable=False),
        sa.Column("gold_correct", sa.Integer(), nullable=False),
        sa.Column("timed", sa.Integer(), nullable=False),
        sa.Column("seconds", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["cycle_id"], ["cycles.id"], name=op.f("fk_cycle_rater_aggregates_cycle_id_cycles")),
        sa.PrimaryKeyConstraint("cycle_id", "rater_id", name=op.f("pk_cycle_rater_aggregates")),
    )
    op.create_table(
        "cycle_rater_pairs",
        *_pair_columns(),
        sa.Column("cycle_id", sa.Integer(), nullable=False),
        sa.Column("rater_id", sa.String(length=200), nullable=False),
        sa.Column("other_rater_id", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(["cycle_id"], ["cycles.id"], name=op.f("fk_cycle_rater_pairs_cycle_id_cycles")),
        sa.PrimaryKeyConstraint("cycle_id", "rater_id", "other_rater_id", name=op.f("pk_cycle_rater_pairs")),
    )
    op.create_table(
        "rater_totals",
        *_pair_columns(),
        sa.Column("rater_id", sa.String(length=200), nullable=False),
        sa.Column("answered", sa.Integer(), nullable=False),
        sa.Column("gold_answered", sa.Integer(), nullable=False),
        sa.Column("gold_correct", sa.Integer(), nullable=False),
        sa.Column("timed", sa.Integer(), nullable=False),
        sa.Column("seconds", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("rater_id", name=op.f("pk_rater_totals")),
    )
    op.create_table(
        "rater_pair_totals",
        *_pair_columns(),
        sa.Column("rater_id", sa.String(length=200), nullable=False),
        sa.Column("other_rater_id", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("rater_id", "other_rater_id", name=op.f("pk_rater_pair_totals")),
    )
    with op.batch_alter_table("rater_pair_totals", schema=None) as batch_op:
        batch_op.create_index("ix_rater_pair_totals_other", ["other_rater_id"], unique=False)
    # The batches registered in a cycle's time window, counted for the dashboard's feedback table.
    with op.batch_alter_table("feedback_batches", schema=None) as batch_op:
        batch_op.create_index("ix_feedback_batches_created_at", ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("feedback_batches", schema=None) as batch_op:
        batch_op.drop_index("ix_feedback_batches_created_at")
    with op.batch_alter_table("rater_pair_totals", schema=None) as batch_op:
        batch_op.drop_index("ix_rater_pair_totals_other")
    op.drop_table("rater_pair_totals")
    op.drop_table("rater_totals")
    op.drop_table("cycle_rater_pairs")
    op.drop_table("cycle_rater_aggregates")
    op.drop_table("cycle_aggregates")
