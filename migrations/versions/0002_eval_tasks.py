"""comparison tasks: kind (train or eval), the candidate's side of an eval task, and closed tasks

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("comparison_tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=10), server_default="train", nullable=False))
        batch_op.add_column(sa.Column("candidate_side", sa.String(length=1), nullable=True))
        batch_op.drop_constraint(op.f("ck_comparison_tasks_status"), type_="check")
        batch_op.create_check_constraint(op.f("ck_comparison_tasks_status"), "status IN ('open', 'done', 'closed')")
        batch_op.create_check_constraint(op.f("ck_comparison_tasks_kind"), "kind IN ('train', 'eval')")
        batch_op.create_check_constraint(
            op.f("ck_comparison_tasks_candidate_side"), "candidate_side IS NULL OR candidate_side IN ('a', 'b')"
        )


def downgrade() -> None:
    op.execute("UPDATE comparison_tasks SET status = 'done' WHERE status = 'closed'")
    with op.batch_alter_table("comparison_tasks", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_comparison_tasks_candidate_side"), type_="check")
        batch_op.drop_constraint(op.f("ck_comparison_tasks_kind"), type_="check")
        batch_op.drop_constraint(op.f("ck_comparison_tasks_status"), type_="check")
        batch_op.create_check_constraint(op.f("ck_comparison_tasks_status"), "status IN ('open', 'done')")
        batch_op.drop_column("candidate_side")
        batch_op.drop_column("kind")
