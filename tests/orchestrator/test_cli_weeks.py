"""The CLI's week options refuse weeks that do not exist (exit code 2), before touching the store or Prefect."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app as cli_app
from store.settings import get_settings


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("RATCHET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cycle", "run", "--week", "2026-W99"], "--week '2026-W99' does not exist: ISO year 2026 has 53 weeks"),
        (["cycle", "show", "--week", "2026-W00"], "--week '2026-W00' does not exist: ISO year 2026 has 53 weeks"),
        (["demo", "--start-week", "2027-W53"], "--start-week '2027-W53' does not exist: ISO year 2027 has 52 weeks"),
        (["cycle", "run", "--week", "next week"], "--week 'next week' is not an ISO week label like 2026-W48"),
    ],
)
def test_a_week_that_does_not_exist_is_refused_with_the_reason(cli, tmp_path, args, message):
    result = cli.invoke(cli_app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "home" / "ratchet.db").exists()  # refused before the store was opened
