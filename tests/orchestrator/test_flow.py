"""The weekly-cycle flow under one Prefect test harness, on PostgreSQL, with a fake step runner.

Versions and lineage of a cycle, one cycle per week, the gate's rejection
recorded, a final failure marking the cycle failed and a re-run resuming it,
and the report published as a Prefect artifact.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from orchestrator.flow import stage_task, use_env, weekly_cycle
from orchestrator.settings import week_of
from orchestrator.stages import open_stage
from store.cycles import get_cycle
from store.deployments import active_deployment, list_deployments
from store.lineage import lineage_back
from store.models import ComparisonTask, Cycle, Dataset, Deployment, Policy, PreferenceModel, StageRun
from tests.orchestrator.fakes import StoreLabeler, fast_settings

WEEK = "2026-W10"


def _count(db, model, **where) -> int:
    with db.session() as s:
        query = select(func.count()).select_from(model)
        for column, value in where.items():
            query = query.where(getattr(model, column) == value)
        return s.scalar(query)


def test_a_full_cycle_registers_each_version_once_with_its_lineage(prefect_api, fake_env, pg_db):
    with use_env(fake_env), StoreLabeler(pg_db):
        summary = weekly_cycle(week=WEEK)
    assert summary["status"] == "succeeded" and summary["deployed"] is True and summary["reason"] is None
    with pg_db.session() as s:
        cycle = s.scalar(select(Cycle).where(Cycle.week == WEEK))
        assert [r.stage for r in cycle.stages] == [
            "open", "sample", "gather", "snapshot", "train_pm", "improve", "evaluate", "human_eval", "gate", "deploy"]
        assert all(r.status == "succeeded" and r.attempts == 1 for r in cycle.stages)
        assert cycle.flow_run_id is not None
        outputs = {r.stage: r.outputs for r in cycle.stages}
        # one samples dataset with its tasks, one snapshot, two PMs, one candidate, one deploy
        samples = s.get(Dataset, outputs["sample"]["samples_dataset_id"])
        assert (samples.kind, samples.cycle_id, samples.row_count) == ("samples", cycle.id, 6 * 3)
        assert s.scalar(select(func.count()).select_from(ComparisonTask).where(
            ComparisonTask.cycle_id == cycle.id, ComparisonTask.kind == "train")) == outputs["sample"]["tasks"] > 0
        # the human A/B evaluation: one blinded task per held-out prompt, answered; people preferred the candidate
        human = outputs["human_eval"]
        assert human["tasks"] == 4 and human["answers"] == 4 and human["wins"] == 4 and human["elo_candidate"] > 0
        assert outputs["gate"]["measures"]["human_lower_bound"] > 0.5
        pm = s.get(PreferenceModel, outputs["train_pm"]["pm_id"])
        test_pm = s.get(PreferenceModel, outputs["train_pm"]["test_pm_id"])
        assert (pm.name, pm.role, test_pm.name, test_pm.role) == ("pm", "train", "test-pm", "test")
        assert pm.dataset_id == test_pm.dataset_id == outputs["snapshot"]["dataset_id"]
        candidate = s.get(Policy, outputs["improve"]["policy_id"])
        p0 = s.scalar(select(Policy).where(Policy.version == 1))
        assert (candidate.name, candidate.version, candidate.cycle_id) == ("policy", 2, cycle.id)
        assert (candidate.init_policy_id, candidate.reference_policy_id, candidate.pm_id) == (p0.id, p0.id, pm.id)
        assert active_deployment(s).policy_id == candidate.id and active_deployment(s).cycle_id == cycle.id
        # lineage: the candidate goes back to the labelers' batches through the PM and the snapshot
        graph = lineage_back(s, kind="policy", id=candidate.id)
        assert graph.ids("pm") == [pm.id] and graph.ids("dataset") == [pm.dataset_id]
        assert len(graph.ids("feedback_batch")) == outputs["snapshot"]["batches"] >= 1
    assert _count(pg_db, PreferenceModel) == 2 and _count(pg_db, Policy) == 2 and _count(pg_db, Deployment) == 2


def test_a_second_trigger_for_the_same_week_does_not_start_a_second_cycle(prefect_api, fake_env, pg_db):
    with use_env(fake_env), StoreLabeler(pg_db):
        first = weekly_cycle(week=WEEK)
        calls = list(fake_env.runner_for(fake_env.defaults).calls)
        second = weekly_cycle(week=WEEK, params={"ppo": {"config": {"learning_rate": 0.5}}})
    assert first["cycle_id"] == second["cycle_id"] and second["status"] == "succeeded"
    assert fake_env.runner_for(fake_env.defaults).calls == calls  # no step ran again
    assert _count(pg_db, Cycle) == 1 and _count(pg_db, Policy) == 2 and _count(pg_db, StageRun) == 10


def test_an_unparameterised_run_takes_its_week_from_the_scheduled_start(prefect_api, fake_env, pg_db, monkeypatch):
    from datetime import UTC, datetime

    from prefect.runtime import flow_run

    # a scheduled run of Monday 2 March 2026 06:00 UTC that starts late, on Sunday 8 March
    monkeypatch.setitem(flow_run.FIELDS, "scheduled_start_time", lambda: datetime(2026, 3, 2, 6, tzinfo=UTC))
    with use_env(fake_env), StoreLabeler(pg_db):
        summary = weekly_cycle()
    assert summary["week"] == week_of(datetime(2026, 3, 8, tzinfo=UTC)) == "2026-W10"
    assert summary["status"] == "succeeded"


def test_a_candidate_over_the_kl_budget_is_not_deployed_and_the_reasons_are_recorded(prefect_api, fake_env, pg_db):
    fake_env.defaults = fast_settings(gate={"kl_budget": 0.0})
    with use_env(fake_env), StoreLabeler(pg_db):
        summary = weekly_cycle(week=WEEK)
    assert summary["status"] == "succeeded" and summary["deployed"] is False
    with pg_db.session() as s:
        cycle = s.scalar(select(Cycle).where(Cycle.week == WEEK))
        stages = {r.stage: r for r in cycle.stages}
        assert stages["gate"].outputs["deploy"] is False
        assert stages["gate"].outputs["checks"]["within_kl_budget"] is False
        assert stages["deploy"].status == "skipped"
        assert stages["deploy"].outputs["reasons"] == ["KL to the reference 0.5000 is over the budget 0.0000"]
        assert cycle.reason == (
            "candidate policy policy v2 was not deployed: KL to the reference 0.5000 is over the budget 0.0000"
        )
        assert active_deployment(s).version == 1  # P0 stays deployed
        assert len(list_deployments(s)) == 1


def test_a_stage_failing_after_its_retries_fails_the_cycle_and_a_rerun_resumes_it(prefect_api, fake_env, pg_db):
    runner = fake_env.runner_for(fake_env.defaults)
    runner.fail = {"ppo": 2}  # stage_retries=1: both attempts fail
    with use_env(fake_env), StoreLabeler(pg_db):
        with pytest.raises(Exception, match="injected failure of ppo"):
            weekly_cycle(week=WEEK)
        with pg_db.session() as s:
            cycle = s.scalar(select(Cycle).where(Cycle.week == WEEK))
            ppo = next(r for r in cycle.stages if r.stage == "improve")
            assert cycle.status == "failed"
            assert cycle.reason == "stage improve failed: StepFailed: injected failure of ppo"
            assert (ppo.status, ppo.attempts, ppo.error) == ("failed", 2, "StepFailed: injected failure of ppo")
        steps_before = list(runner.calls)
        summary = weekly_cycle(week=WEEK)  # the fault is gone: the same cycle resumes
    assert summary["status"] == "succeeded" and summary["reason"] is None
    assert runner.calls[len(steps_before):] == ["ppo", "evaluate"]  # finished stages were skipped
    with pg_db.session() as s:
        cycle = s.scalar(select(Cycle).where(Cycle.week == WEEK))
        assert next(r for r in cycle.stages if r.stage == "improve").attempts == 3
    assert _count(pg_db, Cycle) == 1 and _count(pg_db, Policy) == 2 and _count(pg_db, PreferenceModel) == 2


def test_each_cycle_publishes_its_report_as_a_prefect_markdown_artifact(prefect_api, fake_env, pg_db):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    week = "2026-W11"  # its own week: other tests' cycles publish under their weeks' keys
    with use_env(fake_env), StoreLabeler(pg_db):
        weekly_cycle(week=week)
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"cycle-{week.lower()}"])))
    assert found
    latest = max(found, key=lambda a: a.created)
    assert latest.type == "markdown"
    assert f"# Ratchet cycle {week}" in latest.data and "| deployed | true |" in latest.data


def test_stage_tasks_skip_a_finished_stage_and_return_its_outputs(fake_env, pg_db):
    ctx = open_stage(fake_env, week=WEEK, params=None, trigger="manual", flow_run_id=None)
    with StoreLabeler(pg_db):
        first = stage_task.fn(ctx, "sample")
        again = stage_task.fn(ctx, "sample")
    assert again == first and fake_env.runner_for(ctx.settings).calls == ["sample"]
    with pg_db.session() as s:
        assert get_cycle(s, ctx.cycle_id).status == "running"


def test_ratchet_cycle_run_and_show_on_a_finished_week(prefect_api, fake_env, pg_db, pg_url, monkeypatch):
    import json

    from typer.testing import CliRunner

    from orchestrator.cli import app as cli_app
    from store.settings import get_settings

    with use_env(fake_env), StoreLabeler(pg_db):
        weekly_cycle(week=WEEK)
    monkeypatch.setenv("RATCHET_DATABASE_URL", pg_url)
    get_settings.cache_clear()
    try:
        ran = CliRunner().invoke(cli_app, ["cycle", "run", "--week", WEEK, "--param", "ppo.config.learning_rate=0.1"])
        shown = CliRunner().invoke(cli_app, ["cycle", "show", "--week", WEEK])
        missing = CliRunner().invoke(cli_app, ["cycle", "show", "--week", "2001-W01"])
    finally:
        get_settings.cache_clear()
    assert ran.exit_code == 0, ran.output
    summary = json.loads(ran.stdout.strip().splitlines()[-1])
    assert (summary["week"], summary["status"], summary["deployed"]) == (WEEK, "succeeded", True)
    assert json.loads(shown.stdout)["cycle_id"] == summary["cycle_id"]
    assert missing.exit_code == 2 and missing.stderr == "error: there is no cycle for week 2001-W01\n"
    assert _count(pg_db, Cycle) == 1 and _count(pg_db, Policy) == 2


def test_cli_params_are_dotted_and_typed():
    from orchestrator.cli import _parse_params

    assert _parse_params(["ppo.learning_rate=1e-4", "gate.kl_budget=2", "prompt_set=hh"], '{"sample": {"num_samples": 8}}') == {
        "sample": {"num_samples": 8}, "ppo": {"learning_rate": 1e-4}, "gate": {"kl_budget": 2}, "prompt_set": "hh"}


def test_metrics_the_store_cannot_hold_become_null():
    from orchestrator.cycle import jsonable

    assert jsonable({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}}) == {
        "a": None, "b": [None, 1.5], "c": {"d": None}}
