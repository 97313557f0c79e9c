"""operators: a cycle's attempts (its first and each re-run), the operators' actions with the key that did
them, alerts (an outbox: recorded with their event, then delivered), and a cycle per (deployment target, week)
instead of per week

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cycle_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cycle_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("changed", sa.JSON(), nullable=False),
        sa.Column("kept", sa.JSON(), nullable=False),
        sa.Column("rerun", sa.JSON(), nullable=False),
        sa.Column("discarded", sa.JSON(), nullable=False),
        sa.Column("eval_task_floor", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("number >= 1", name=op.f("ck_cycle_attempts_number_positive")),
        sa.ForeignKeyConstraint(["cycle_id"], ["cycles.id"], name=op.f("fk_cycle_attempts_cycle_id_cycles")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cycle_attempts")),
        sa.UniqueConstraint("cycle_id", "number", name=op.f("uq_cycle_attempts_cycle_id_number")),
    )
    with op.batch_alter_table("cycle_attempts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_cycle_attempts_cycle_id"), ["cycle_id"], unique=False)
    # Every cycle so far ran one attempt, with the params it was opened with.
    op.execute(
        "INSERT INTO cycle_attempts (cycle_id, number, params, changed, kept, rerun, discarded, actor, reason, created_at) "
        "SELECT id, 1, params, '[]', '[]', '[]', '{}', '', '', created_at FROM cycles"
    )

    op.create_table(
        "operator_actions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=40), nullable=False),
        sa.Column("subject_kind", sa.String(length=40), nullable=False),
        sa.Column("subject_id", sa.String(length=200), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.Column("via", sa.String(length=20), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"], name=op.f("fk_operator_actions_api_key_id_api_keys")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operator_actions")),
    )
    with op.batch_alter_table("operator_actions", schema=None) as batch_op:
        batch_op.create_index("ix_operator_actions_subject", ["subject_kind", "subject_id"], unique=False)

    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event", sa.String(length=40), nullable=False),
        sa.Column("dedupe_key", sa.String(length=400), nullable=False),
        sa.Column("cycle_id", sa.Integer(), nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("link", sa.String(length=1000), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name=op.f("ck_alerts_status")),
        sa.ForeignKeyConstraint(["cycle_id"], ["cycles.id"], name=op.f("fk_alerts_cycle_id_cycles")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_alerts_dedupe_key")),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_alerts_cycle_id"), ["cycle_id"], unique=False)

    _cycles_per_target()


def _cycles_per_target() -> None:
    """``cycles.deploy_target``, each existing cycle's from the settings its open stage recorded (else
    "default"), and the cycle unique per (deploy_target, week) instead of per week."""
    with op.batch_alter_table("cycles", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deploy_target", sa.String(length=200), server_default="default", nullable=False))
    _backfill_targets()
    with op.batch_alter_table("cycles", schema=None) as batch_op:
        batch_op.drop_constraint("uq_cycles_week", type_="unique")
        batch_op.create_unique_constraint(batch_op.f("uq_cycles_deploy_target_week"), ["deploy_target", "week"])


def _backfill_targets() -> None:
    """Each cycle's target as its open stage recorded it (``outputs.settings.deploy_target``): read in Python, so
    the JSON is read alike on PostgreSQL and SQLite. A cycle whose open stage recorded none stays "default"."""
    bind = op.get_bind()
    stage_runs = sa.table("stage_runs", sa.column("cycle_id", sa.Integer()), sa.column("stage", sa.String()),
                          sa.column("outputs", sa.JSON()))
    cycles = sa.table("cycles", sa.column("id", sa.Integer()), sa.column("deploy_target", sa.String()))
    rows = bind.execute(sa.select(stage_runs.c.cycle_id, stage_runs.c.outputs).where(stage_runs.c.stage == "open"))
    for cycle_id, outputs in rows.all():
        target = ((outputs or {}).get("settings") or {}).get("deploy_target")
        if isinstance(target, str) and target and target != "default":
            bind.execute(sa.update(cycles).where(cycles.c.id == cycle_id).values(deploy_target=target))


def _refuse_weeks_of_several_targets() -> None:
    """A downgrade makes a week unique again: refused, naming them, while some week has cycles of several targets."""
    shared = op.get_bind().execute(sa.text(
        "SELECT week FROM cycles GROUP BY week HAVING COUNT(*) > 1 ORDER BY week")).scalars().all()
    if shared:
        raise RuntimeError(f"cannot downgrade below 0006: weeks {', '.join(shared)} have cycles of several deployment "
                           "targets, and before 0006 a week has one cycle")


def downgrade() -> None:
    _refuse_weeks_of_several_targets()
    with op.batch_alter_table("cycles", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_cycles_deploy_target_week"), type_="unique")
        batch_op.create_unique_constraint(batch_op.f("uq_cycles_week"), ["week"])
        batch_op.drop_column("deploy_target")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_alerts_cycle_id"))
    op.drop_table("alerts")
    with op.batch_alter_table("operator_actions", schema=None) as batch_op:
        batch_op.drop_index("ix_operator_actions_subject")
    op.drop_table("operator_actions")
    with op.batch_alter_table("cycle_attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cycle_attempts_cycle_id"))
    op.drop_table("cycle_attempts")
