"""Cycle settings: server defaults, a trigger's params deep-merged, server-only fields, weeks."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from orchestrator.settings import CycleSettings, load_defaults, resolve, shift_week, week_monday, week_of
from store.errors import InvalidInput


def test_params_override_one_field_of_a_section_and_keep_the_rest():
    defaults = CycleSettings.model_validate({"ppo": {"learning_rate": 1e-4, "total_episodes": 512}})
    resolved = resolve(defaults, {"ppo": {"learning_rate": 3e-5}, "gate": {"kl_budget": 2.0}})
    assert (resolved.ppo.learning_rate, resolved.ppo.total_episodes) == (3e-5, 512)
    assert resolved.gate.kl_budget == 2.0 and resolved.gate.win_margin == 0.02
    assert defaults.ppo.learning_rate == 1e-4  # the defaults are not changed


def test_a_trigger_may_not_choose_code_or_machines():
    with pytest.raises(InvalidInput) as err:
        resolve(CycleSettings(), {"gold": "os:system", "runner": "deployment", "sample": {"num_samples": 8}})
    assert [e["field"] for e in err.value.errors] == ["params.gold", "params.runner"]
    trusted = resolve(CycleSettings(), {"gold": "workers.demo_world:gold_score"}, trusted=True)
    assert trusted.gold == "workers.demo_world:gold_score"


def test_invalid_params_name_each_bad_field():
    with pytest.raises(InvalidInput) as err:
        resolve(CycleSettings(), {"sample": {"num_samples": 1, "bogus": 3}, "gate": {"win_margin": 0.7}})
    fields = {e["field"] for e in err.value.errors}
    assert fields == {"params.sample.num_samples", "params.sample.bogus", "params.gate.win_margin"}


def test_server_defaults_come_from_a_json_file(tmp_path):
    path = tmp_path / "cycle.json"
    path.write_text(json.dumps({"gather": {"min_comparisons": 50}, "runner": "deployment"}))
    loaded = load_defaults(path)
    assert loaded.gather.min_comparisons == 50 and loaded.runner == "deployment"
    assert load_defaults(None) == CycleSettings()
    path.write_text("{not json")
    with pytest.raises(InvalidInput, match="not valid JSON"):
        load_defaults(path)
    with pytest.raises(InvalidInput, match="does not exist"):
        load_defaults(tmp_path / "missing.json")


def test_retries_back_off_exponentially():
    assert CycleSettings(stage_retries=3, retry_delay_s=10).retry_delays() == [10, 20, 40]
    assert CycleSettings(stage_retries=0).retry_delays() == []


def test_weeks_are_iso_weeks():
    assert week_of(datetime(2026, 11, 23, 12, tzinfo=UTC)) == "2026-W48"
    assert week_of(datetime(2027, 1, 1, tzinfo=UTC)) == "2026-W53"  # 2026 has 53 ISO weeks
    assert shift_week("2026-W53", 1) == "2027-W01" and shift_week("2027-W01", -1) == "2026-W53"
    assert week_monday("2026-W48").isoformat() == "2026-11-23"
    with pytest.raises(InvalidInput):
        week_monday("last week")
