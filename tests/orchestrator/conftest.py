"""Orchestrator fixtures: one Prefect test harness per session, cycle environments on PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from orchestrator.cycle import CycleEnv  # noqa: E402
from tests.orchestrator.fakes import FakeRunner, fake_world, fast_settings  # noqa: E402


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One temporary Prefect server for the whole session (starting one costs seconds); its API URL.

    Only tests that run flows ask for it; stage logic is tested with ``.fn()``
    and plain functions, without Prefect.
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def work_dir(tmp_path) -> Path:
    return tmp_path / "work"


@pytest.fixture
def fake_env(pg_db, artifacts, work_dir) -> CycleEnv:
    """A cycle env on a clean PostgreSQL store holding a fake world, with a ``FakeRunner``."""
    fake_world(pg_db, artifacts, work_dir)
    return CycleEnv(pg_db, artifacts, work_dir=work_dir, defaults=fast_settings(),
                    runner=FakeRunner(artifacts, work_dir))


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if "tests/orchestrator/" in str(item.fspath) and {"pg_db", "pg_url"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)
