import json

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from typer.testing import CliRunner

from store.db import alembic_config, head_revision, open_database, upgrade
from store.errors import SchemaNotAtHead
from store.models import Base


def test_models_and_migrations_agree(db_url):
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert diff == []


def test_upgrade_twice_is_a_no_op(db_url):
    assert upgrade(db_url) == (head_revision(), head_revision())


def test_service_refuses_a_schema_not_at_head(db_url):
    command.downgrade(alembic_config(db_url), "base")
    with pytest.raises(SchemaNotAtHead, match="revision \\(empty\\), this code needs .*run `ratchet db upgrade`"):
        open_database(db_url)
    upgrade(db_url)
    open_database(db_url).dispose()


def test_cli_db_upgrade_creates_then_does_nothing(tmp_path, monkeypatch):
    from orchestrator.cli import app
    from store.settings import get_settings

    monkeypatch.setenv("RATCHET_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        first = runner.invoke(app, ["db", "upgrade"])
        assert first.exit_code == 0, first.output
        assert f"schema upgraded from (empty) to {head_revision()}" in first.output
        second = runner.invoke(app, ["db", "upgrade"])
        assert f"schema already at {head_revision()}: nothing to do" in second.output
        status = runner.invoke(app, ["status", "--json"])
        assert status.exit_code == 0 and '"policies": 0' in status.output
    finally:
        get_settings.cache_clear()


def test_cli_refuses_an_empty_database(tmp_path, monkeypatch):
    from orchestrator.cli import app
    from store.settings import get_settings

    monkeypatch.setenv("RATCHET_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["keys", "create", "--role", "labeler", "--name", "x"])
        assert result.exit_code == 1
        assert "ratchet db upgrade" in " ".join(result.output.split())  # the console wraps long paths
    finally:
        get_settings.cache_clear()


def test_cycles_made_before_targets_keep_their_week_and_get_their_target(db_url):
    """0006 keys a cycle by (deployment target, week): each cycle made before it keeps its week and takes the
    target its open stage recorded (else "default"); a week then holds one cycle per target."""
    command.downgrade(alembic_config(db_url), "0005")
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        for week, settings in (("2026-W01", {"deploy_target": "b"}), ("2026-W02", {}), ("2026-W03", None)):
            cycle_id = conn.execute(sa.text(
                "INSERT INTO cycles (week, status, trigger, params, created_at) "
                "VALUES (:week, 'succeeded', 'manual', '{}', CURRENT_TIMESTAMP) RETURNING id"), {"week": week}).scalar()
            if settings is not None:
                conn.execute(sa.text(
                    "INSERT INTO stage_runs (cycle_id, stage, status, attempts, outputs, started_at) "
                    "VALUES (:cycle, 'open', 'succeeded', 1, :outputs, CURRENT_TIMESTAMP)"),
                    {"cycle": cycle_id, "outputs": json.dumps({"settings": settings})})
    upgrade(db_url)
    with engine.begin() as conn:
        rows = conn.execute(sa.text("SELECT week, deploy_target FROM cycles ORDER BY week")).all()
        assert [tuple(r) for r in rows] == [("2026-W01", "b"), ("2026-W02", "default"), ("2026-W03", "default")]
        conn.execute(sa.text("INSERT INTO cycles (week, deploy_target, status, trigger, params, created_at) "
                             "VALUES ('2026-W01', 'default', 'running', 'manual', '{}', CURRENT_TIMESTAMP)"))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO cycles (week, deploy_target, status, trigger, params, created_at) "
                             "VALUES ('2026-W01', 'b', 'running', 'manual', '{}', CURRENT_TIMESTAMP)"))
    with pytest.raises(RuntimeError, match="weeks 2026-W01 have cycles of several deployment targets"):
        command.downgrade(alembic_config(db_url), "0005")
    engine.dispose()
