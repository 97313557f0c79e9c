from pathlib import Path

import pytest
from pydantic import ValidationError

from store.settings import Settings


def test_defaults_live_under_ratchet_home(monkeypatch, tmp_path):
    monkeypatch.setenv("RATCHET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RATCHET_DATABASE_URL", raising=False)
    monkeypatch.delenv("RATCHET_ARTIFACTS_URL", raising=False)
    s = Settings()
    assert s.resolved_database_url == f"sqlite:///{tmp_path / 'home' / 'ratchet.db'}"
    assert Path(s.resolved_artifacts_url) == tmp_path / "home" / "artifacts"
    assert s.is_embedded


def test_urls_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("RATCHET_DATABASE_URL", "postgresql+psycopg2://u@h/db")
    monkeypatch.setenv("RATCHET_ARTIFACTS_URL", "s3://bucket/prefix")
    monkeypatch.setenv("RATCHET_LOG_LEVEL", "debug")
    s = Settings()
    assert (s.resolved_database_url, s.resolved_artifacts_url, s.log_level) == (
        "postgresql+psycopg2://u@h/db",
        "s3://bucket/prefix",
        "DEBUG",
    )
    assert not s.is_embedded


def test_bad_log_level_is_refused(monkeypatch):
    monkeypatch.setenv("RATCHET_LOG_LEVEL", "loud")
    with pytest.raises(ValidationError, match="log_level 'loud'"):
        Settings()
