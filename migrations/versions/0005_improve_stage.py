"""the ppo stage becomes the improve stage (its method, ppo or another, is a cycle setting)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 10:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every cycle before this revision trained its candidate with PPO: its stage row keeps its outputs, and the
    # improve stage's outputs read a missing method as ppo.
    op.execute("UPDATE stage_runs SET stage = 'improve' WHERE stage = 'ppo'")


def downgrade() -> None:
    op.execute("UPDATE stage_runs SET stage = 'ppo' WHERE stage = 'improve'")
