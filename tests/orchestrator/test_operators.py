"""Operators act on cycles: cancel a running one, re-run a failed or cancelled one with corrected settings.

On PostgreSQL under the session's Prefect harness, with the fake step runner:
a cancel stops the step the cycle waits on, registers nothing, closes the
open tasks and ends the flow run Cancelled; a re-run records a new attempt,
keeps the stages whose inputs did not change and runs the rest, registering
each version once. ``plan_rerun`` is checked by hand.
"""

from __future__ import annotations

import time

import pytest
from prefect.exceptions import CancelledRun
from sqlalchemy import func, select

from orchestrator.cycle import CycleEnv
from orchestrator.flow import use_env, weekly_cycle
from orchestrator.operations import cancel, rerun
from orchestrator.rerun import changed_settings, plan_rerun
from store.cycles import attempts_of, cancel_cycle
from store.errors import Conflict, InvalidInput
from store.models import ComparisonTask, Cycle, OperatorAction, Policy, PreferenceModel
from tests.orchestrator.fakes import FakeRunner, StoreLabeler, fast_settings
from workers.common.stopping import stop_requested

WEEK = "2026-W20"
STAGES = ["open", "sample", "gather", "snapshot", "train_pm", "improve", "evaluate", "human_eval", "gate", "deploy"]


def _count(db, model) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(model))


def _cycle(db) -> Cycle:
    with db.session() as s:
        cycle = s.scalar(select(Cycle).where(Cycle.week == WEEK))
        s.expunge_all()
        return cycle


def _stages(db) -> dict[str, tuple[str, str | None]]:
    with db.session() as s:
        cycle = s.scalar(select(Cycle).where(Cycle.week == WEEK))
        return {r.stage: (r.status, r.error) for r in cycle.stages}


# -- plan_rerun, by hand ----------------------------------------------------------------------------

DONE_TO_IMPROVE = {s: "succeeded" for s in STAGES[:5]} | {"improve": "failed"}
OLD = {"runner": "in_process", "ppo": {"config": {"learning_rate": 1e-5}}, "improve": {"method": "ppo"},
       "gate": {"kl_budget": 1.0}, "sample": {"prompts_per_cycle": 6}}


def test_changed_settings_are_dotted_leaves():
    new = {**OLD, "ppo": {"config": {"learning_rate": 1e-6}}, "gate": {"kl_budget": 1.0, "min_win_rate": 0.5}}
    assert changed_settings(OLD, new) == ["gate.min_win_rate", "ppo.config.learning_rate"]
    assert changed_settings(OLD, OLD) == []


def test_a_fix_to_the_improve_method_keeps_the_stages_before_it():
    new = {**OLD, "ppo": {"config": {"learning_rate": 1e-6}}}
    plan = plan_rerun(OLD, new, DONE_TO_IMPROVE)
    assert plan.changed == ["ppo.config.learning_rate"]
    assert plan.kept == ["open", "sample", "gather", "snapshot", "train_pm"]
    assert plan.rerun == ["improve", "evaluate", "human_eval", "gate", "deploy"]
    assert plan.why["improve"] == "it did not finish; ppo.config.learning_rate changed"
    assert plan.why["gate"] == "after improve"


def test_a_change_no_stage_reads_keeps_every_finished_stage_and_runs_the_unfinished():
    plan = plan_rerun(OLD, {**OLD, "runner": "deployment"}, DONE_TO_IMPROVE)  # where steps run, not what they make
    assert plan.changed == [] and plan.kept == STAGES[:5] and plan.rerun == STAGES[5:]
    assert plan.why["improve"] == "it did not finish" and plan.why["evaluate"] == "after improve"


def test_a_gate_threshold_changed_after_the_gate_ran_runs_the_gate_again_only():
    done = {s: "succeeded" for s in STAGES[:9]} | {"deploy": "failed"}
    plan = plan_rerun(OLD, {**OLD, "gate": {"kl_budget": 2.0}}, done)
    assert plan.kept == STAGES[:8] and plan.rerun == ["gate", "deploy"]
    assert plan.why == {"gate": "gate.kl_budget changed", "deploy": "after gate"}


def test_a_switch_of_method_reads_both_methods_sections():
    new = {**OLD, "improve": {"method": "rloo"}, "rloo": {"config": {"k": 4}}}
    plan = plan_rerun(OLD, new, DONE_TO_IMPROVE)
    assert plan.rerun[0] == "improve" and "improve.method" in plan.why["improve"]


def test_without_recorded_settings_every_unfinished_stage_runs():
    plan = plan_rerun(None, OLD, {"open": "failed"})
    assert plan.changed == [] and plan.kept == [] and plan.rerun == STAGES
    assert plan.why["open"] == "it did not finish" and plan.why["sample"] == "after open"


# -- re-runs -----------------------------------------------------------------------------------------


def test_a_cycle_failed_in_improve_reruns_with_a_corrected_setting_keeping_what_came_before(
        prefect_api, fake_env, pg_db):
    runner = fake_env.runner_for(fake_env.defaults)
    runner.fail = {"ppo": 2}  # both tries of the stage fail
    with use_env(fake_env), StoreLabeler(pg_db):
        with pytest.raises(Exception, match="injected failure of ppo"):
            weekly_cycle(week=WEEK)
        cycle = _cycle(pg_db)
        assert cycle.status == "failed"
        before = list(runner.calls)
        plan = rerun(pg_db, fake_env.defaults, cycle_id=cycle.id, params={"ppo": {"config": {"learning_rate": 3e-6}}},
                     actor="alice", trusted=False, api_key_id=None, via="api", reason="lr too high")
        assert plan["attempt"] == 2 and plan["changed"] == ["ppo.config.learning_rate"]
        assert plan["kept"] == ["open", "sample", "gather", "snapshot", "train_pm"]
        assert plan["rerun"] == ["improve", "evaluate", "human_eval", "gate", "deploy"]
        summary = weekly_cycle(week=WEEK)
    assert summary["status"] == "succeeded" and summary["deployed"] is True
    assert runner.calls[len(before):] == ["ppo", "evaluate"]  # sample and train_pm were kept
    # one candidate, two PMs: nothing registered twice
    assert _count(pg_db, Policy) == 2 and _count(pg_db, PreferenceModel) == 2
    with pg_db.session() as s:
        cycle = s.scalar(select(Cycle).where(Cycle.week == WEEK))
        assert cycle.params == {"ppo": {"config": {"learning_rate": 3e-6}}}
        opened = next(r for r in cycle.stages if r.stage == "open")
        assert opened.outputs["settings"]["ppo"]["config"]["learning_rate"] == 3e-6
        improve = next(r for r in cycle.stages if r.stage == "improve")
        attempts = attempts_of(s, cycle.id)
        assert [(a.number, a.actor, a.changed) for a in attempts] == [
            (1, "manual", []), (2, "alice", ["ppo.config.learning_rate"])]
        assert attempts[1].reason == "lr too high" and attempts[1].kept == plan["kept"]
        action = s.scalar(select(OperatorAction).where(OperatorAction.action == "rerun"))
        assert (action.subject_kind, action.subject_id, action.actor, action.detail["attempt"]) == (
            "cycle", str(cycle.id), "alice", 2)
        policy = s.get(Policy, improve.outputs["policy_id"])
        assert f"cycles/{WEEK}/a2/improve" in policy.artifact.uri  # attempt 2's folder, not attempt 1's


def test_a_cycle_that_failed_to_open_on_a_bad_setting_reruns_from_the_start(prefect_api, fake_env, pg_db):
    with use_env(fake_env), StoreLabeler(pg_db):
        with pytest.raises(Exception, match="no-such-prompts"):
            weekly_cycle(week=WEEK, params={"prompt_set": "no-such-prompts"})
        cycle = _cycle(pg_db)
        assert cycle.status == "failed" and _stages(pg_db)["open"][0] == "failed"
        plan = rerun(pg_db, fake_env.defaults, cycle_id=cycle.id, params={"prompt_set": "prompts"}, actor="bob",
                     trusted=True, via="cli")
        assert plan["kept"] == [] and plan["rerun"] == STAGES and plan["why"]["open"] == "it did not finish"
        summary = weekly_cycle(week=WEEK)
    assert summary["status"] == "succeeded"
    assert _cycle(pg_db).params == {"prompt_set": "prompts"}


def test_a_rerun_is_refused_when_it_cannot_be_one(prefect_api, fake_env, pg_db):
    with use_env(fake_env), StoreLabeler(pg_db):
        runner = fake_env.runner_for(fake_env.defaults)
        runner.fail = {"ppo": 2}
        with pytest.raises(Exception, match="injected"):
            weekly_cycle(week=WEEK)
    cycle_id = _cycle(pg_db).id
    # bad params: checked as a trigger's, and nothing is recorded
    with pytest.raises(InvalidInput) as bad:
        rerun(pg_db, fake_env.defaults, cycle_id=cycle_id, params={"ppo": {"config": {"learning_rate": "fast"}}},
              actor="a", trusted=False)
    assert bad.value.errors[0]["field"] == "params.ppo.config.learning_rate"
    # a change that would sample again after the tasks went to people
    with pytest.raises(Conflict, match="sample again"):
        rerun(pg_db, fake_env.defaults, cycle_id=cycle_id, params={"sample": {"prompts_per_cycle": 4}}, actor="a",
              trusted=False)
    with pg_db.session() as s:
        assert len(attempts_of(s, cycle_id)) == 1 and s.scalar(select(func.count()).select_from(OperatorAction)) == 0
    # a running cycle must be cancelled first; a succeeded one is done
    with pg_db.session() as s:
        s.get(Cycle, cycle_id).status = "running"
    with pytest.raises(Conflict, match="cancel it first"):
        rerun(pg_db, fake_env.defaults, cycle_id=cycle_id, params={}, actor="a", trusted=False)
    with pg_db.session() as s:
        s.get(Cycle, cycle_id).status = "succeeded"
    with pytest.raises(Conflict, match="only a failed or cancelled cycle"):
        rerun(pg_db, fake_env.defaults, cycle_id=cycle_id, params={}, actor="a", trusted=False)
    with pg_db.session() as s, pytest.raises(Conflict, match="only a running or failed cycle can be cancelled"):
        cancel_cycle(s, cycle_id=cycle_id, actor="a")


# -- cancel ------------------------------------------------------------------------------------------


class CancelledWhileTraining(FakeRunner):
    """A PPO step that an operator cancels while it trains: it runs units until told to stop."""

    def __init__(self, artifacts, work_dir, database):
        super().__init__(artifacts, work_dir)
        self.database = database
        self.units_run = 0
        self.cancelled: dict | None = None

    def _ppo(self, config, out):
        with self.database.session() as s:
            cycle_id = s.scalar(select(Cycle.id).where(Cycle.week == WEEK))
        deadline = time.monotonic() + 30
        while not stop_requested():  # a training loop: one unit, then ask (workers.common.stopping)
            self.units_run += 1
            if self.units_run == 3:  # an operator cancels while the step trains
                self.cancelled = cancel(self.database, cycle_id=cycle_id, actor="carol", api_key_id=None, via="api",
                                        reason="wrong reference")
                self.cancelled_at = time.monotonic()
            assert time.monotonic() < deadline, "the step was never asked to stop"
            time.sleep(0.05)
        self.stopped_at = time.monotonic()
        return super()._ppo(config, out)  # an incomplete run's outputs: the commit must not register them


def test_a_cancel_stops_the_running_step_registers_nothing_and_ends_the_flow_run_cancelled(
        prefect_api, fake_env, pg_db, artifacts, work_dir):
    from prefect import get_client

    runner = CancelledWhileTraining(artifacts, work_dir, pg_db)
    env = CycleEnv(pg_db, artifacts, work_dir=work_dir, defaults=fast_settings(), runner=runner)
    with use_env(env), StoreLabeler(pg_db):
        with pytest.raises(CancelledRun):
            weekly_cycle(week=WEEK)
    assert runner.units_run >= 3 and runner.calls[-1] == "ppo"
    assert runner.stopped_at - runner.cancelled_at < 5  # asked every 2 s
    assert runner.cancelled["status"] == "cancelled" and runner.cancelled["prefect"]["asked"] is True
    cycle = _cycle(pg_db)
    assert (cycle.status, cycle.reason) == ("cancelled", "cancelled by carol: wrong reference")
    stages = _stages(pg_db)
    assert stages["improve"] == ("failed", "cancelled by carol: wrong reference")
    assert all(stages[s][0] == "succeeded" for s in STAGES[:5]) and "evaluate" not in stages
    assert _count(pg_db, Policy) == 1  # no candidate registered: P0 only
    with pg_db.session() as s:
        assert s.scalar(select(func.count()).select_from(ComparisonTask).where(ComparisonTask.status == "open")) == 0
        action = s.scalar(select(OperatorAction).where(OperatorAction.action == "cancel"))
        assert (action.actor, action.via, action.detail["was"]) == ("carol", "api", "running")
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(cycle.flow_run_id).state
    assert state.is_cancelled(), state
    # a cancelled cycle can be re-run; what finished before the cancel is kept
    plan = rerun(pg_db, env.defaults, cycle_id=cycle.id, params={}, actor="carol", trusted=False)
    assert plan["kept"] == STAGES[:5] and plan["why"]["improve"] == "it did not finish"
    again = FakeRunner(artifacts, work_dir)
    with use_env(CycleEnv(pg_db, artifacts, work_dir=work_dir, defaults=fast_settings(), runner=again)), \
            StoreLabeler(pg_db):
        summary = weekly_cycle(week=WEEK)
    assert summary["status"] == "succeeded" and _count(pg_db, Policy) == 2
    assert again.calls == ["ppo", "evaluate"]


# -- the API ---------------------------------------------------------------------------------------


def _api(pg_db, artifacts, tmp_path, launcher):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from store.keys import create_api_key
    from store.settings import Settings

    with pg_db.session() as s:
        keys = {role: {"Authorization": f"Bearer {create_api_key(s, name=role, role=role)[1]}"}
                for role in ("labeler", "operator")}
    return TestClient(create_app(Settings(home=tmp_path), database=pg_db, artifacts=artifacts,
                                 cycle_launcher=launcher)), keys


def _open(pg_db, week: str, status: str = "running") -> int:
    from store.cycles import finish_cycle, open_cycle

    with pg_db.session() as s:
        cycle, _ = open_cycle(s, week=week, trigger="api", params={"gate": {"kl_budget": 0.1}})
        if status != "running":
            finish_cycle(s, cycle_id=cycle.id, status=status, reason="stage open failed: InvalidInput: ...")
        return cycle.id


def test_the_api_cancels_and_reruns_with_an_operator_key_recorded(pg_db, artifacts, tmp_path):
    from orchestrator.launcher import ThreadLauncher
    from orchestrator.settings import CycleSettings

    started = []
    launcher = ThreadLauncher(pg_db, CycleSettings(), run=lambda **kw: started.append(kw))
    running, failed = _open(pg_db, "2026-W30"), _open(pg_db, "2026-W31", "failed")
    client, keys = _api(pg_db, artifacts, tmp_path, launcher)
    with client:
        labeler = client.post(f"/v1/cycles/{running}/cancel", json={}, headers=keys["labeler"])
        done = client.post(f"/v1/cycles/{running}/cancel", json={"reason": "wrong week"}, headers=keys["operator"])
        twice = client.post(f"/v1/cycles/{running}/cancel", headers=keys["operator"])
        missing = client.post("/v1/cycles/999999/cancel", headers=keys["operator"])
        bad = client.post(f"/v1/cycles/{failed}/rerun", json={"params": {"gate": {"kl_budget": "x"}}},
                          headers=keys["operator"])
        refused = client.post(f"/v1/cycles/{failed}/rerun", json={"params": {}}, headers=keys["labeler"])
        rerun_ = client.post(f"/v1/cycles/{failed}/rerun", json={"params": {"gate": {"kl_budget": 0.5}}, "reason": "fix"},
                             headers=keys["operator"])
        shown = client.get(f"/v1/cycles/{failed}", headers=keys["labeler"])
    for thread in launcher.threads.values():
        thread.join(timeout=10)
    assert labeler.status_code == 403 and refused.status_code == 403
    assert done.status_code == 200, done.text
    assert done.json()["cycle"]["status"] == "cancelled" and done.json()["cycle"]["reason"] == "cancelled by operator: wrong week"
    assert twice.status_code == 409 and "already cancelled" in twice.json()["detail"]
    assert missing.status_code == 404
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "params.gate.kl_budget"
    assert rerun_.status_code == 202, rerun_.text
    assert rerun_.json()["attempt"] == 2 and rerun_.json()["rerun"][0] == "open"
    assert rerun_.json()["cycle"]["params"] == {"gate": {"kl_budget": 0.5}}
    assert started == [{"week": "2026-W31", "trigger": "api", "target": "default"}]
    assert [a["number"] for a in shown.json()["attempts"]] == [1, 2] and shown.json()["attempts"][1]["reason"] == "fix"
    with pg_db.session() as s:
        rows = s.scalars(select(OperatorAction).order_by(OperatorAction.id)).all()
        assert [(r.action, r.actor, r.via, r.api_key_id is not None) for r in rows] == [
            ("cancel", "operator", "api", True), ("rerun", "operator", "api", True)]


def test_without_an_orchestrator_a_cancel_still_lands_and_a_rerun_is_503(pg_db, artifacts, tmp_path):
    running, failed = _open(pg_db, "2026-W32"), _open(pg_db, "2026-W33", "failed")
    client, keys = _api(pg_db, artifacts, tmp_path, None)
    with client:
        done = client.post(f"/v1/cycles/{running}/cancel", headers=keys["operator"])
        refused = client.post(f"/v1/cycles/{failed}/rerun", json={}, headers=keys["operator"])
    assert done.status_code == 200 and done.json()["prefect"]["asked"] is False
    assert refused.status_code == 503 and "ratchet cycle rerun --week 2026-W33" in refused.json()["detail"]
    assert refused.headers.get("retry-after")


def test_a_rerun_through_the_production_launcher_is_a_flow_run_of_its_own(pg_db, artifacts, tmp_path, monkeypatch):
    import prefect.deployments

    from orchestrator.launcher import DeploymentLauncher
    from orchestrator.settings import CycleSettings

    calls = []
    monkeypatch.setattr(prefect.deployments, "run_deployment",
                        lambda name, **kw: calls.append(kw) or type("FlowRun", (), {"id": "fr-2"})())
    failed = _open(pg_db, "2026-W34", "failed")
    client, keys = _api(pg_db, artifacts, tmp_path, DeploymentLauncher(pg_db, CycleSettings(), deployment="w/w"))
    with client:
        answer = client.post(f"/v1/cycles/{failed}/rerun", json={}, headers=keys["operator"])
    assert answer.status_code == 202, answer.text
    assert [c["idempotency_key"] for c in calls] == ["cycle:2026-W34:a2"]


def test_ratchet_cycle_rerun_and_cancel(prefect_api, fake_env, pg_db, pg_url, monkeypatch):
    import json

    from typer.testing import CliRunner

    from orchestrator.cli import app as cli_app
    from store.settings import get_settings

    fake_env.runner_for(fake_env.defaults).fail = {"ppo": 2}
    monkeypatch.setenv("RATCHET_DATABASE_URL", pg_url)
    get_settings.cache_clear()
    try:
        with use_env(fake_env), StoreLabeler(pg_db):
            with pytest.raises(Exception, match="injected"):
                weekly_cycle(week=WEEK)
            ran = CliRunner().invoke(cli_app, ["cycle", "rerun", "--week", WEEK, "--param",
                                               "ppo.config.learning_rate=3e-6", "--reason", "lr"])
        done = CliRunner().invoke(cli_app, ["cycle", "cancel", "--week", WEEK])
        missing = CliRunner().invoke(cli_app, ["cycle", "cancel", "--week", "2026-W01"])
    finally:
        get_settings.cache_clear()
    assert ran.exit_code == 0, ran.output
    assert "runs improve again: it did not finish; ppo.config.learning_rate changed" in ran.stderr
    assert json.loads(ran.stdout.strip().splitlines()[-1])["status"] == "succeeded"
    assert done.exit_code == 2 and "only a running or failed cycle can be cancelled" in done.stderr
    assert missing.exit_code == 2 and missing.stderr == "error: there is no cycle for week 2026-W01\n"
    with pg_db.session() as s:
        action = s.scalar(select(OperatorAction).where(OperatorAction.action == "rerun"))
        assert action.via == "cli" and action.actor.startswith("cli:") and action.detail["reason"] == "lr"
