"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 15:19:00.218495
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


# Rows of these tables are immutable versions: the database itself refuses an
# UPDATE, whatever client sends it. (SQLite batch migrations that rebuild one
# of these tables must create its trigger again.)
IMMUTABLE_TABLES = (
    "artifacts",
    "datasets",
    "dataset_batches",
    "feedback_batches",
    "comparisons",
    "preference_models",
    "policies",
    "deployments",
)
MESSAGE = "ratchet: immutable version row"


def create_immutability_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION ratchet_refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN RAISE EXCEPTION '{MESSAGE}: % rows cannot be updated; write a new version', TG_TABLE_NAME; END $$"
        )
        for table in IMMUTABLE_TABLES:
            op.execute(
                f"CREATE TRIGGER refuse_update_{table} BEFORE UPDATE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION ratchet_refuse_update()"
            )
    else:
        for table in IMMUTABLE_TABLES:
            op.execute(
                f"CREATE TRIGGER refuse_update_{table} BEFORE UPDATE ON {table} BEGIN "
                f"SELECT RAISE(ABORT, '{MESSAGE}: {table} rows cannot be updated; write a new version'); END"
            )


def drop_immutability_triggers() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for table in IMMUTABLE_TABLES:
        op.execute(f"DROP TRIGGER IF EXISTS refuse_update_{table}" + (f" ON {table}" if postgres else ""))
    if postgres:
        op.execute("DROP FUNCTION IF EXISTS ratchet_refuse_update()")


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('role', sa.String(length=20), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("role IN ('labeler', 'operator', 'admin')", name=op.f('ck_api_keys_role')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('name', name=op.f('uq_api_keys_name')),
    sa.UniqueConstraint('token_sha256', name=op.f('uq_api_keys_token_sha256'))
    )
    op.create_table('artifacts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('uri', sa.String(length=1000), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('is_dir', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_artifacts')),
    sa.UniqueConstraint('uri', name=op.f('uq_artifacts_uri'))
    )
    op.create_table('cycles',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('week', sa.String(length=20), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('trigger', sa.String(length=40), nullable=False),
    sa.Column('flow_run_id', sa.String(length=64), nullable=True),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('running', 'succeeded', 'failed', 'cancelled')", name=op.f('ck_cycles_status')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cycles')),
    sa.UniqueConstraint('week', name=op.f('uq_cycles_week'))
    )
    op.create_table('datasets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('content_sha256', sa.String(length=64), nullable=False),
    sa.Column('row_count', sa.Integer(), nullable=False),
    sa.Column('artifact_id', sa.Integer(), nullable=True),
    sa.Column('source_dataset_id', sa.Integer(), nullable=True),
    sa.Column('cycle_id', sa.Integer(), nullable=True),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('prompts', 'samples', 'comparisons')", name=op.f('ck_datasets_kind')),
    sa.CheckConstraint('version >= 1', name=op.f('ck_datasets_version_positive')),
    sa.ForeignKeyConstraint(['artifact_id'], ['artifacts.id'], name=op.f('fk_datasets_artifact_id_artifacts')),
    sa.ForeignKeyConstraint(['cycle_id'], ['cycles.id'], name=op.f('fk_datasets_cycle_id_cycles')),
    sa.ForeignKeyConstraint(['source_dataset_id'], ['datasets.id'], name=op.f('fk_datasets_source_dataset_id_datasets')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_datasets')),
    sa.UniqueConstraint('name', 'content_sha256', name=op.f('uq_datasets_name_content_sha256')),
    sa.UniqueConstraint('name', 'version', name=op.f('uq_datasets_name_version'))
    )
    op.create_table('feedback_batches',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(length=200), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('request_sha256', sa.String(length=64), nullable=True),
    sa.Column('content_sha256', sa.String(length=64), nullable=False),
    sa.Column('comparison_count', sa.Integer(), nullable=False),
    sa.Column('cycle_id', sa.Integer(), nullable=True),
    sa.Column('api_key_id', sa.Integer(), nullable=True),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['api_key_id'], ['api_keys.id'], name=op.f('fk_feedback_batches_api_key_id_api_keys')),
    sa.ForeignKeyConstraint(['cycle_id'], ['cycles.id'], name=op.f('fk_feedback_batches_cycle_id_cycles')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_feedback_batches')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_feedback_batches_idempotency_key'))
    )
    op.create_table('stage_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('cycle_id', sa.Integer(), nullable=False),
    sa.Column('stage', sa.String(length=40), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('outputs', sa.JSON(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('compute_s', sa.Float(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('running', 'succeeded', 'failed', 'skipped')", name=op.f('ck_stage_runs_status')),
    sa.ForeignKeyConstraint(['cycle_id'], ['cycles.id'], name=op.f('fk_stage_runs_cycle_id_cycles')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_stage_runs')),
    sa.UniqueConstraint('cycle_id', 'stage', name=op.f('uq_stage_runs_cycle_id_stage'))
    )
    op.create_table('comparison_tasks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('cycle_id', sa.Integer(), nullable=True),
    sa.Column('samples_dataset_id', sa.Integer(), nullable=True),
    sa.Column('prompt_id', sa.String(length=200), nullable=True),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('response_a', sa.Text(), nullable=False),
    sa.Column('response_b', sa.Text(), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=10), nullable=False),
    sa.Column('leased_by', sa.String(length=200), nullable=True),
    sa.Column('leased_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('done_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('open', 'done')", name=op.f('ck_comparison_tasks_status')),
    sa.ForeignKeyConstraint(['cycle_id'], ['cycles.id'], name=op.f('fk_comparison_tasks_cycle_id_cycles')),
    sa.ForeignKeyConstraint(['samples_dataset_id'], ['datasets.id'], name=op.f('fk_comparison_tasks_samples_dataset_id_datasets')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_comparison_tasks'))
    )
    with op.batch_alter_table('comparison_tasks', schema=None) as batch_op:
        batch_op.create_index('ix_comparison_tasks_open', ['cycle_id', 'status', 'leased_until'], unique=False)

    op.create_table('dataset_batches',
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('batch_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['feedback_batches.id'], name=op.f('fk_dataset_batches_batch_id_feedback_batches')),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_dataset_batches_dataset_id_datasets')),
    sa.PrimaryKeyConstraint('dataset_id', 'batch_id', name=op.f('pk_dataset_batches'))
    )
    with op.batch_alter_table('dataset_batches', schema=None) as batch_op:
        batch_op.create_index('ix_dataset_batches_batch_id', ['batch_id'], unique=False)

    op.create_table('preference_models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=10), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('base_model', sa.String(length=1000), nullable=False),
    sa.Column('init_pm_id', sa.Integer(), nullable=True),
    sa.Column('artifact_id', sa.Integer(), nullable=True),
    sa.Column('cycle_id', sa.Integer(), nullable=True),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("role IN ('train', 'test')", name=op.f('ck_preference_models_role')),
    sa.CheckConstraint('version >= 1', name=op.f('ck_preference_models_version_positive')),
    sa.ForeignKeyConstraint(['artifact_id'], ['artifacts.id'], name=op.f('fk_preference_models_artifact_id_artifacts')),
    sa.ForeignKeyConstraint(['cycle_id'], ['cycles.id'], name=op.f('fk_preference_models_cycle_id_cycles')),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_preference_models_dataset_id_datasets')),
    sa.ForeignKeyConstraint(['init_pm_id'], ['preference_models.id'], name=op.f('fk_preference_models_init_pm_id_preference_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_preference_models')),
    sa.UniqueConstraint('name', 'version', name=op.f('uq_preference_models_name_version'))
    )
    with op.batch_alter_table('preference_models', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_preference_models_dataset_id'), ['dataset_id'], unique=False)

    op.create_table('comparisons',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('batch_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('response_a', sa.Text(), nullable=False),
    sa.Column('response_b', sa.Text(), nullable=False),
    sa.Column('choice', sa.String(length=3), nullable=False),
    sa.Column('rater_id', sa.String(length=200), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=True),
    sa.Column('metadata', sa.JSON(), nullable=True),
    sa.CheckConstraint("choice IN ('a', 'b', 'tie')", name=op.f('ck_comparisons_choice')),
    sa.ForeignKeyConstraint(['batch_id'], ['feedback_batches.id'], name=op.f('fk_comparisons_batch_id_feedback_batches'), initially='DEFERRED', deferrable=True),
    sa.ForeignKeyConstraint(['task_id'], ['comparison_tasks.id'], name=op.f('fk_comparisons_task_id_comparison_tasks')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_comparisons')),
    sa.UniqueConstraint('batch_id', 'position', name=op.f('uq_comparisons_batch_id_position'))
    )
    with op.batch_alter_table('comparisons', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_comparisons_task_id'), ['task_id'], unique=False)

    op.create_table('policies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('base_model', sa.String(length=1000), nullable=False),
    sa.Column('init_policy_id', sa.Integer(), nullable=True),
    sa.Column('reference_policy_id', sa.Integer(), nullable=True),
    sa.Column('pm_id', sa.Integer(), nullable=True),
    sa.Column('artifact_id', sa.Integer(), nullable=True),
    sa.Column('cycle_id', sa.Integer(), nullable=True),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('version >= 1', name=op.f('ck_policies_version_positive')),
    sa.ForeignKeyConstraint(['artifact_id'], ['artifacts.id'], name=op.f('fk_policies_artifact_id_artifacts')),
    sa.ForeignKeyConstraint(['cycle_id'], ['cycles.id'], name=op.f('fk_policies_cycle_id_cycles')),
    sa.ForeignKeyConstraint(['init_policy_id'], ['policies.id'], name=op.f('fk_policies_init_policy_id_policies')),
    sa.ForeignKeyConstraint(['pm_id'], ['preference_models.id'], name=op.f('fk_policies_pm_id_preference_models')),
    sa.ForeignKeyConstraint(['reference_policy_id'], ['policies.id'], name=op.f('fk_policies_reference_policy_id_policies')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_policies')),
    sa.UniqueConstraint('name', 'version', name=op.f('uq_policies_name_version'))
    )
    with op.batch_alter_table('policies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_policies_pm_id'), ['pm_id'], unique=False)

    op.create_table('deployments',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('policy_id', sa.Integer(), nullable=False),
    sa.Column('previous_id', sa.Integer(), nullable=True),
    sa.Column('rolled_back_id', sa.Integer(), nullable=True),
    sa.Column('action', sa.String(length=10), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('cycle_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("action IN ('deploy', 'rollback')", name=op.f('ck_deployments_action')),
    sa.CheckConstraint('version >= 1', name=op.f('ck_deployments_version_positive')),
    sa.ForeignKeyConstraint(['cycle_id'], ['cycles.id'], name=op.f('fk_deployments_cycle_id_cycles')),
    sa.ForeignKeyConstraint(['policy_id'], ['policies.id'], name=op.f('fk_deployments_policy_id_policies')),
    sa.ForeignKeyConstraint(['previous_id'], ['deployments.id'], name=op.f('fk_deployments_previous_id_deployments')),
    sa.ForeignKeyConstraint(['rolled_back_id'], ['deployments.id'], name=op.f('fk_deployments_rolled_back_id_deployments')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_deployments')),
    sa.UniqueConstraint('name', 'version', name=op.f('uq_deployments_name_version'))
    )
    create_immutability_triggers()


def downgrade() -> None:
    drop_immutability_triggers()
    op.drop_table('deployments')
    with op.batch_alter_table('policies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_policies_pm_id'))

    op.drop_table('policies')
    with op.batch_alter_table('comparisons', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_comparisons_task_id'))

    op.drop_table('comparisons')
    with op.batch_alter_table('preference_models', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_preference_models_dataset_id'))

    op.drop_table('preference_models')
    with op.batch_alter_table('dataset_batches', schema=None) as batch_op:
        batch_op.drop_index('ix_dataset_batches_batch_id')

    op.drop_table('dataset_batches')
    with op.batch_alter_table('comparison_tasks', schema=None) as batch_op:
        batch_op.drop_index('ix_comparison_tasks_open')

    op.drop_table('comparison_tasks')
    op.drop_table('stage_runs')
    op.drop_table('feedback_batches')
    op.drop_table('datasets')
    op.drop_table('cycles')
    op.drop_table('artifacts')
    op.drop_table('api_keys')
