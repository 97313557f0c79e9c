"""Cycle settings: server defaults, a trigger's params deep-merged, server-only fields, weeks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from orchestrator.settings import CycleSettings, load_defaults, resolve, shift_week, week_monday, week_of
from store.errors import InvalidInput


def test_params_override_one_field_of_a_section_and_keep_the_rest():
    defaults = CycleSettings.model_validate({"ppo": {"config": {"learning_rate": 1e-4, "total_episodes": 512}}})
    resolved = resolve(defaults, {"ppo": {"config": {"learning_rate": 3e-5}}, "gate": {"kl_budget": 2.0}})
    assert (resolved.step_config("ppo")["learning_rate"], resolved.step_config("ppo")["total_episodes"]) == (3e-5, 512)
    assert resolved.gate.kl_budget == 2.0 and resolved.gate.win_margin == 0.02
    assert defaults.ppo.config["learning_rate"] == 1e-4  # the defaults are not changed


def test_a_trigger_may_not_choose_code_or_machines():
    with pytest.raises(InvalidInput) as err:
        resolve(CycleSettings(), {"gold": "os:system", "runner": "deployment", "sample": {"config": {"num_samples": 8}}})
    assert [e["field"] for e in err.value.errors] == ["params.gold", "params.runner"]
    trusted = resolve(CycleSettings(), {"gold": "workers.demo_world:gold_score"}, trusted=True)
    assert trusted.gold == "workers.demo_world:gold_score"


def test_invalid_params_name_each_bad_field():
    with pytest.raises(InvalidInput) as err:
        resolve(CycleSettings(), {"sample": {"config": {"num_samples": 1, "bogus": 3}}, "gate": {"win_margin": 0.7}})
    fields = {e["field"] for e in err.value.errors}
    assert fields == {"params.sample.config.num_samples", "params.sample.config.bogus", "params.gate.win_margin"}


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


def test_no_settings_section_repeats_a_field_of_a_worker_config():
    """Each knob once: a worker step's fields are declared by its config dataclass alone; the cycle's sections
    set them through ``config``, checked against it."""
    import dataclasses

    from pydantic import BaseModel

    from orchestrator.runners import STEPS, config_class

    worker_fields = {f.name: step for step in STEPS
                     for f in dataclasses.fields(config_class(step))}
    repeated = [
        f"{section}.{name} (a {worker_fields[name]} field)"
        for section, field in CycleSettings.model_fields.items() if isinstance(field.default, BaseModel)
        for name in type(field.default).model_fields if name != "config" and name in worker_fields
    ]
    assert repeated == []


def test_step_overrides_are_checked_against_the_step_config():
    with pytest.raises(InvalidInput) as err:
        resolve(CycleSettings(), {"ppo": {"config": {"total_episodes": 100, "policy_path": "/tmp/x"}},
                                  "pm": {"config": {"learning_rate": "fast"}}, "evaluate": {"config": {"gold": "os:system"}}})
    fields = {e["field"] for e in err.value.errors}
    assert fields == {"params.ppo.config.policy_path", "params.pm.config.learning_rate", "params.evaluate.config.gold"}
    with pytest.raises(InvalidInput) as err:
        resolve(CycleSettings(), {"ppo": {"config": {"total_episodes": 100}}})
    assert err.value.errors == [{"field": "params.ppo.config.total_episodes", "message":
                                 "total_episodes (100) must be a multiple of rollout_batch_size (16)"}]
    resolved = resolve(CycleSettings(), {"ppo": {"config": {"lam": 1}}})
    assert resolved.ppo.config == {"ensemble_penalty": 0.5, "lam": 1}  # over the cycle's own defaults
    assert resolved.step_config("ppo")["lam"] == 1 and resolved.step_config("ppo")["kl_coef"] == 0.001


def test_settings_recorded_before_step_overrides_existed_still_read():
    from orchestrator.settings import recorded

    old = CycleSettings().model_dump(mode="json")
    del old["improve"]
    old["ppo"] = {"init": "reference", "kl_anchor": "deployed", "learning_rate": 3e-5, "seed": 0,
                  "ensemble_penalty": 0.5, "extra": {"gradient_accumulation_steps": 2}}
    settings = recorded(old)
    # where the ppo stage kept them: now the improve stage's, whose method was then always ppo
    assert (settings.improve.method, settings.improve.init, settings.improve.kl_anchor) == ("ppo", "reference", "deployed")
    assert settings.ppo.config == {"ensemble_penalty": 0.5, "learning_rate": 3e-5, "seed": 0,
                                   "gradient_accumulation_steps": 2}


def test_the_improve_method_picks_its_section_and_a_trigger_may_choose_it():
    resolved = resolve(CycleSettings(), {"improve": {"method": "grpo"}, "grpo": {"config": {"k": 4}}})
    assert resolved.improve.method == "grpo" and resolved.method_section() is resolved.grpo
    assert resolved.step_config("grpo")["estimator"] == "grpo" and resolved.step_config("rloo")["estimator"] == "rloo"
    with pytest.raises(InvalidInput) as err:
        resolve(CycleSettings(), {"improve": {"method": "reinforce"}})
    assert [e["field"] for e in err.value.errors] == ["params.improve.method"]
    # a field of another method's step is refused under its section, naming it
    with pytest.raises(InvalidInput) as err:
        resolve(CycleSettings(), {"dpo": {"config": {"total_episodes": 64}}})
    assert [e["field"] for e in err.value.errors] == ["params.dpo.config.total_episodes"]


def test_init_and_kl_anchor_where_the_ppo_section_had_them_still_set_the_improve_stage():
    resolved = resolve(CycleSettings(), {"ppo": {"kl_anchor": "deployed", "init": "reference"}})
    assert (resolved.improve.kl_anchor, resolved.improve.init) == ("deployed", "reference")


def test_resolving_params_checks_only_the_step_sections_they_touch():
    """Over checked defaults, params of the gather stage import no worker step (torch, transformers); params of
    the sample stage import its step. A fresh interpreter, so this process's own imports hide nothing."""
    code = textwrap.dedent("""
        import json, sys
        from orchestrator.settings import CycleSettings, resolve

        def loaded():
            return {m for m in sys.modules if m.startswith("workers.") or m.split(".")[0] in ("torch", "transformers")}

        before = loaded()
        resolve(CycleSettings(), {"gather": {"min_comparisons": 5}, "gate": {"kl_budget": 2.0}})
        after_gather = loaded()
        resolve(CycleSettings(), {"sample": {"config": {"num_samples": 3}}})
        print(json.dumps({"gather": sorted(after_gather - before), "sample": sorted(loaded() - after_gather)}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    imported = json.loads(out.stdout)
    assert imported["gather"] == []
    assert "workers.sample" in imported["sample"]


def test_a_bad_field_in_a_touched_section_is_still_named():
    with pytest.raises(InvalidInput) as err:
        resolve(CycleSettings(), {"gather": {"min_comparisons": 5}, "sample": {"config": {"num_samples": 1}}})
    assert err.value.errors == [{"field": "params.sample.config.num_samples", "message":
                                 "num_samples (1) must be >= 2: pairs of a prompt's responses become comparison tasks"}]
    with pytest.raises(InvalidInput) as err:
        resolve(CycleSettings(), {"gather": {"min_comparisons": -1}})
    assert [e["field"] for e in err.value.errors] == ["params.gather.min_comparisons"]


def test_choosing_the_improve_method_checks_that_methods_section(tmp_path):
    """Defaults built in code (not loaded) carry unchecked sections; the one a trigger's chosen method will run
    is checked, while a section neither touched nor chosen is left as the defaults have it."""
    defaults = CycleSettings.model_validate({"dpo": {"config": {"total_episodes": 64}}})
    with pytest.raises(InvalidInput) as err:
        resolve(defaults, {"improve": {"method": "dpo"}})
    assert [e["field"] for e in err.value.errors] == ["params.dpo.config.total_episodes"]
    assert resolve(defaults, {"gather": {"min_comparisons": 5}}).dpo.config == {"total_episodes": 64}
    # a whole file is checked section by section, the untouched ones too
    path = tmp_path / "cycle.json"
    path.write_text(json.dumps(defaults.model_dump(mode="json")))
    with pytest.raises(InvalidInput) as err:
        load_defaults(path)
    assert [e["field"] for e in err.value.errors] == ["dpo.config.total_episodes"]
