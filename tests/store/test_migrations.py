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
