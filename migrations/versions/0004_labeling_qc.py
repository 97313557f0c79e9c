"""labeling quality control: per-rater task leases, overlap and gold tasks, gold comparisons, rater
decisions, and a strength on comparisons

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gold_comparisons",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("response_a", sa.Text(), nullable=False),
        sa.Column("response_b", sa.Text(), nullable=False),
        sa.Column("choice", sa.String(length=3), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("choice IN ('a', 'b', 'tie')", name=op.f("ck_gold_comparisons_choice")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gold_comparisons")),
    )
    op.create_table(
        "rater_decisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rater_id", sa.String(length=200), nullable=False),
        sa.Column("decision", sa.String(length=10), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cleared_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("decision IN ('include', 'exclude')", name=op.f("ck_rater_decisions_decision")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rater_decisions")),
    )
    with op.batch_alter_table("rater_decisions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rater_decisions_rater_id"), ["rater_id"], unique=False)

    op.create_table(
        "task_leases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("rater_id", sa.String(length=200), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.Column("leased_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("leased_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"], name=op.f("fk_task_leases_api_key_id_api_keys")),
        sa.ForeignKeyConstraint(["task_id"], ["comparison_tasks.id"], name=op.f("fk_task_leases_task_id_comparison_tasks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_leases")),
        sa.UniqueConstraint("task_id", "rater_id", name=op.f("uq_task_leases_task_id_rater_id")),
    )
    with op.batch_alter_table("task_leases", schema=None) as batch_op:
        batch_op.create_index("ix_task_leases_rater", ["rater_id", "answered_at"], unique=False)

    # A task's lease moves to task_leases: a live one is carried over.
    op.execute(
        "INSERT INTO task_leases (task_id, rater_id, leased_at, leased_until) "
        "SELECT id, leased_by, created_at, leased_until FROM comparison_tasks "
        "WHERE status = 'open' AND leased_by IS NOT NULL AND leased_until IS NOT NULL"
    )
    with op.batch_alter_table("comparison_tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_comparison_tasks_open")
        batch_op.drop_column("leased_by")
        batch_op.drop_column("leased_until")
        batch_op.add_column(sa.Column("gold_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("expected_choice", sa.String(length=3), nullable=True))
        batch_op.add_column(sa.Column("answers_needed", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("answers", sa.Integer(), server_default="0", nullable=False))
        batch_op.create_foreign_key(
            batch_op.f("fk_comparison_tasks_gold_id_gold_comparisons"), "gold_comparisons", ["gold_id"], ["id"]
        )
        batch_op.drop_constraint(op.f("ck_comparison_tasks_kind"), type_="check")
        batch_op.create_check_constraint(op.f("ck_comparison_tasks_kind"), "kind IN ('train', 'eval', 'gold')")
        batch_op.create_check_constraint(
            op.f("ck_comparison_tasks_expected_choice"), "expected_choice IS NULL OR expected_choice IN ('a', 'b', 'tie')"
        )
        batch_op.create_check_constraint(op.f("ck_comparison_tasks_answers_needed"), "answers_needed >= 1")
        batch_op.create_index("ix_comparison_tasks_open", ["cycle_id", "status"], unique=False)
    op.execute("UPDATE comparison_tasks SET answers = 1 WHERE status = 'done'")

    with op.batch_alter_table("comparisons", schema=None) as batch_op:
        batch_op.add_column(sa.Column("strength", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("comparisons", schema=None) as batch_op:
        batch_op.drop_column("strength")
    op.execute("DELETE FROM task_leases WHERE task_id IN (SELECT id FROM comparison_tasks WHERE kind = 'gold')")
    op.execute("DELETE FROM comparison_tasks WHERE kind = 'gold'")
    with op.batch_alter_table("comparison_tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_comparison_tasks_open")
        batch_op.drop_constraint(op.f("ck_comparison_tasks_answers_needed"), type_="check")
        batch_op.drop_constraint(op.f("ck_comparison_tasks_expected_choice"), type_="check")
        batch_op.drop_constraint(op.f("ck_comparison_tasks_kind"), type_="check")
        batch_op.create_check_constraint(op.f("ck_comparison_tasks_kind"), "kind IN ('train', 'eval')")
        batch_op.drop_constraint(batch_op.f("fk_comparison_tasks_gold_id_gold_comparisons"), type_="foreignkey")
        batch_op.drop_column("answers")
        batch_op.drop_column("answers_needed")
        batch_op.drop_column("expected_choice")
        batch_op.drop_column("gold_id")
        batch_op.add_column(sa.Column("leased_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("leased_by", sa.String(length=200), nullable=True))
        batch_op.create_index("ix_comparison_tasks_open", ["cycle_id", "status", "leased_until"], unique=False)
    with op.batch_alter_table("task_leases", schema=None) as batch_op:
        batch_op.drop_index("ix_task_leases_rater")
    op.drop_table("task_leases")
    with op.batch_alter_table("rater_decisions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rater_decisions_rater_id"))
    op.drop_table("rater_decisions")
    op.drop_table("gold_comparisons")
