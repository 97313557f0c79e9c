import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from store.errors import InvalidInput
from store.raters import QCPolicy, default_policy
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


def test_the_qc_policy_of_the_servers_cycle_config(tmp_path):
    """What the API falls back on when no cycle recorded a QC policy: the file's ``qc``, read without the rest
    of the file (the orchestrator's to check)."""
    path = tmp_path / "cycle.json"
    path.write_text(json.dumps({"qc": {"min_gold_accuracy": 0.8}, "gather": {"min_comparisons": 50}}))
    assert default_policy(path) == QCPolicy(min_gold_accuracy=0.8)
    path.write_text(json.dumps({"gather": {"min_comparisons": 50}}))
    assert default_policy(path) == QCPolicy() == default_policy(None)


@pytest.mark.parametrize(
    ("text", "message", "fields"),
    [
        ('{"qc": {"min_gold_accuracy": 2}}', "is invalid: qc.min_gold_accuracy: Input should be less than or equal to 1",
         ["qc.min_gold_accuracy"]),
        ('{"qc": {"gold_shar": 0.2}}', "is invalid: qc.gold_shar: Extra inputs are not permitted", ["qc.gold_shar"]),
        ('{"qc": 3}', "is invalid: qc: Input should be a valid dictionary", ["qc"]),
        ("{not json", "is not valid JSON", []),
        ("[1]", "must hold a JSON object of settings, not list", []),
    ],
)
def test_a_bad_qc_section_names_the_file_and_the_field(tmp_path, text, message, fields):
    path = tmp_path / "cycle.json"
    path.write_text(text)
    with pytest.raises(InvalidInput) as err:
        default_policy(path)
    assert str(err.value).startswith(f"cycle config {path} ") and message in str(err.value)
    assert [e["field"] for e in err.value.errors] == fields


def test_a_missing_cycle_config_is_said_plainly(tmp_path):
    with pytest.raises(InvalidInput, match=r"cycle config .*missing.json \(RATCHET_CYCLE_CONFIG\) does not exist"):
        default_policy(tmp_path / "missing.json")
