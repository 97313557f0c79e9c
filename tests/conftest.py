"""Shared fixtures: databases on both backends, artifact stores, builders.

PostgreSQL: ``RATCHET_TEST_POSTGRES_URL`` names a server (default: the local
one); each test session creates a throwaway database there, migrates it, and
drops it at the end. Without a server the Postgres tests are skipped on a
developer machine and *fail* in CI (``CI=true``).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from store.artifacts import ArtifactStore
from store.db import Database, upgrade
from store.models import Base

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

PG_SERVER_URL = os.environ.get("RATCHET_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

_pg_results = {"passed": 0, "failed": 0}


def _server_reachable() -> str | None:
    engine = sa.create_engine(PG_SERVER_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        return str(exc).splitlines()[0]
    finally:
        engine.dispose()


LONGEST_FIRST = (
    "tests/orchestrator/test_production_path.py",
    "tests/orchestrator/test_methods_learn.py",
    "tests/workers/test_distributed.py",
    "tests/workers/test_learning.py",
    "tests/orchestrator/test_demo_raters.py",
)
"""the modules whose tests take minutes, run first: with two test processes (``make test``) a long test
picked up last would run alone while the other process sits idle"""


def pytest_collection_modifyitems(config, items) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    root = Path(str(config.rootpath))
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).relative_to(root).as_posix(), len(rank)))


def pytest_report_header(config) -> str:
    problem = _server_reachable()
    shown = make_url(PG_SERVER_URL).render_as_string(hide_password=True)
    if problem is None:
        return f"postgres: {shown} reachable; Postgres-backed tests will run"
    return f"postgres: {shown} NOT reachable ({problem}); Postgres tests will {'FAIL (CI)' if IN_CI else 'be skipped'}"


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" and "postgres" in report.keywords and not report.skipped:
        _pg_results["passed" if report.passed else "failed"] += 1


def pytest_terminal_summary(terminalreporter) -> None:
    terminalreporter.write_line(
        f"PostgreSQL-backed tests: {_pg_results['passed']} passed, {_pg_results['failed']} failed "
        f"(server {make_url(PG_SERVER_URL).render_as_string(hide_password=True)})"
    )


@contextmanager
def throwaway_database(*, template: str | None = None) -> Iterator[str]:
    """URL of a new database on the Postgres server, dropped on exit: migrated, or a copy of ``template`` (a
    database URL; nothing may be connected to it while it is copied)."""
    name = f"ratchet_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_SERVER_URL, isolation_level="AUTOCOMMIT")
    source = f' TEMPLATE "{make_url(template).database}"' if template else ""
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"{source}'))
    url = make_url(PG_SERVER_URL).set(database=name).render_as_string(hide_password=False)
    try:
        if template is None:
            upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a throwaway, migrated Postgres database for this test session."""
    problem = _server_reachable()
    if problem is not None:
        message = f"PostgreSQL at {PG_SERVER_URL} is not reachable: {problem}"
        if IN_CI:
            pytest.fail(message + " (CI=true: Postgres tests must run)", pytrace=False)
        pytest.skip(message)
    with throwaway_database() as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """A migrated SQLite file, copied for each test that needs one."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


def _truncate_all(url: str) -> None:
    engine = sa.create_engine(url)
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """A clean, migrated database URL on each backend (the test runs once per backend)."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        _truncate_all(url)
        return url
    path = tmp_path / "ratchet.db"
    shutil.copy(request.getfixturevalue("sqlite_template"), path)
    return f"sqlite:///{path}"


@pytest.fixture
def db(db_url) -> Iterator[Database]:
    """A ``Database`` on a clean, migrated store (both backends)."""
    database = Database(db_url)
    yield database
    database.dispose()


@pytest.fixture
def pg_db(pg_url) -> Iterator[Database]:
    """A ``Database`` on a clean, migrated PostgreSQL store."""
    _truncate_all(pg_url)
    database = Database(pg_url)
    yield database
    database.dispose()


@pytest.fixture
def artifacts(tmp_path) -> ArtifactStore:
    """A local artifact store in a fresh folder."""
    return ArtifactStore(str(tmp_path / "artifacts"))


@pytest.fixture
def no_prefect_api(monkeypatch) -> Iterator[None]:
    """No Prefect API configured for the test, even in a test process where another test started the
    session's Prefect harness (its URL is a setting of the process, not only an environment variable)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield
