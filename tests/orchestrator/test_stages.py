"""Stage logic without Prefect (``stage_task.fn`` and plain functions), on PostgreSQL with a fake runner."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from orchestrator.flow import stage_task
from orchestrator.hooks import HookFailed
from orchestrator.cycle import STAGES
from orchestrator.outputs import DeployOutputs, OpenOutputs
from orchestrator.stages import gate_input, open_stage
from orchestrator.tasks import choose_prompts, make_tasks
from store.cycles import get_stage
from store.deployments import active_deployment, rollback
from store.errors import InvalidInput
from store.models import Deployment, StageRun
from tests.orchestrator.fakes import StoreLabeler, fast_settings

WEEK = "2026-W30"


def _sample(prompt_id, index, response, policy="policy-v1"):
    return {"prompt_id": prompt_id, "policy": policy, "sample_index": index, "prompt": f"prompt {prompt_id}",
            "response": response}


def test_tasks_pair_distinct_responses_deterministically():
    samples = [_sample("p1", i, r) for i, r in enumerate(["a", "b", "a", "c"])] + [_sample("p2", 0, "x"), _sample("p2", 1, "x")]
    tasks = make_tasks(samples, pairs_per_prompt=None, week=WEEK)
    assert len(tasks) == 3  # {a, b, c} make three pairs; p2's two identical responses make none
    assert {frozenset((t["response_a"], t["response_b"])) for t in tasks} == {frozenset("ab"), frozenset("ac"), frozenset("bc")}
    assert tasks == make_tasks(list(reversed(samples)), pairs_per_prompt=None, week=WEEK)
    capped = make_tasks(samples, pairs_per_prompt=2, week=WEEK)
    assert len(capped) == 2 and all(t["prompt_id"] == "p1" for t in capped)
    nul = make_tasks([_sample("p", 0, "a\x00b"), _sample("p", 1, "c")], pairs_per_prompt=None, week=WEEK)[0]
    assert "\x00" not in nul["response_a"] + nul["response_b"] and "a\ufffdb" in (nul["response_a"], nul["response_b"])


def test_each_week_samples_its_own_subset_of_prompts():
    prompts = [{"id": i, "prompt": str(i)} for i in range(50)]
    w1, w2 = choose_prompts(prompts, n=10, week="2026-W01"), choose_prompts(prompts, n=10, week="2026-W02")
    assert len(w1) == len(w2) == 10 and w1 != w2
    assert w1 == choose_prompts(list(reversed(prompts)), n=10, week="2026-W01")
    assert choose_prompts(prompts, n=None, week="2026-W01") == prompts


def test_the_gate_needs_every_measurement():
    with pytest.raises(InvalidInput, match="eval/kl"):
        gate_input({"eval/win_rate_test_pm": 0.6, "eval/win_rate_train_pm": 0.6, "eval/test_pm_delta": 0.1,
                    "eval/train_pm_delta": 0.1})


def _run(ctx, *stages):
    return {stage: stage_task.fn(ctx, stage) for stage in stages}


def test_opening_a_cycle_with_nothing_deployed_fails_the_open_stage(fake_env, pg_db):
    with pg_db.session() as s:
        s.query(Deployment).delete()  # noqa: the immutability trigger guards UPDATE, not a test's DELETE
    with pytest.raises(InvalidInput, match="nothing is deployed"):
        open_stage(fake_env, week=WEEK, params=None, trigger="manual", flow_run_id=None)
    with pg_db.session() as s:
        run = s.scalar(select(StageRun).where(StageRun.stage == "open"))
        assert run.status == "failed" and "nothing is deployed" in run.error


def test_the_sample_stage_records_how_many_prompts_the_step_cut(fake_env, pg_db, monkeypatch):
    from tests.orchestrator.fakes import FakeRunner

    sample = FakeRunner._sample

    def cutting(self, config, out):  # the step cut two over-long prompts to their end (workers.sample)
        outputs, metrics = sample(self, config, out)
        return outputs, {**metrics, "samples/prompts_cut": 2}

    monkeypatch.setattr(FakeRunner, "_sample", cutting)
    ctx = open_stage(fake_env, week=WEEK, params=None, trigger="manual", flow_run_id=None)
    out = stage_task.fn(ctx, "sample")
    assert out["prompts_cut"] == 2 and out["metrics"]["samples/prompts_cut"] == 2
    assert ctx.recorded("sample")["prompts_cut"] == 2


def test_gather_stops_at_the_deadline_with_what_arrived(fake_env, pg_db):
    now = [None]

    def clock():
        return now[0]

    def sleep(seconds):
        now[0] += timedelta(seconds=seconds)

    ctx = open_stage(fake_env, week=WEEK, params={"gather": {"min_comparisons": 10_000, "deadline_s": 3600, "poll_interval_s": 600}},
                     trigger="manual", flow_run_id=None)
    _run(ctx, "sample")
    with pg_db.session() as s:
        now[0] = get_stage(s, cycle_id=ctx.cycle_id, stage="sample").finished_at
    fake_env.clock, fake_env.sleep = clock, sleep
    out = stage_task.fn(ctx, "gather")
    assert out["outcome"] == "deadline" and out["comparisons"] == 0
    tasks = ctx.recorded("sample")["tasks"]
    assert out["tasks"] == {"open": tasks, "done": 0, "closed": 0, "unanswered": tasks}
    with pg_db.session() as s:  # the deadline counts from the end of sampling, as recorded in the store
        assert now[0] - get_stage(s, cycle_id=ctx.cycle_id, stage="sample").finished_at == timedelta(seconds=3600)


def test_gather_waits_for_every_task_when_asked(fake_env, pg_db):
    ctx = open_stage(fake_env, week=WEEK, params={"gather": {"min_comparisons": 1, "all_tasks": True}},
                     trigger="manual", flow_run_id=None)
    _run(ctx, "sample")
    with StoreLabeler(pg_db):
        out = stage_task.fn(ctx, "gather")
    # Every task answered once: an overlap task (qc.overlap_share) waits open for a second rater, not the cycle.
    tasks = out["tasks"]
    assert out["outcome"] == "enough" and tasks["unanswered"] == 0 and tasks["open"] < tasks["done"]
    assert out["comparisons"] == tasks["done"] + tasks["open"]


def test_a_deployment_changed_during_the_cycle_is_not_overridden(fake_env, pg_db):
    ctx = open_stage(fake_env, week=WEEK, params=None, trigger="manual", flow_run_id=None)
    with StoreLabeler(pg_db):
        _run(ctx, *STAGES[1:9])
    with pg_db.session() as s:  # an operator deploys P0 again (say, to roll back by hand) mid-cycle
        from store.deployments import deploy

        deploy(s, policy_id=active_deployment(s).policy_id, reason="hand", actor="ops")
    out = stage_task.fn(ctx, "deploy")
    assert out["deployed"] is False and "changed while the cycle ran" in out["reasons"][0]
    with pg_db.session() as s:
        assert get_stage(s, cycle_id=ctx.cycle_id, stage="deploy").status == "skipped"
        assert active_deployment(s).actor == "ops"


def test_a_failed_hook_fails_the_stage_and_the_retry_reuses_the_deployment(fake_env, pg_db):
    calls = []

    def hook(event):
        calls.append(event)
        if len(calls) == 1:
            raise HookFailed("serving stack down")
        return {"kind": "test"}

    fake_env.deploy_hook = hook
    ctx = open_stage(fake_env, week=WEEK, params=None, trigger="manual", flow_run_id=None)
    with StoreLabeler(pg_db):
        _run(ctx, *STAGES[1:9])
    with pytest.raises(HookFailed):
        stage_task.fn(ctx, "deploy")
    out = stage_task.fn(ctx, "deploy")
    assert out["deployed"] is True and out["hook"] == {"kind": "test"}
    assert calls[0] == calls[1] and calls[0]["deployment"]["id"] == out["deployment_id"]
    assert calls[0]["event"] == "deploy" and calls[0]["cycle"] == WEEK and calls[0]["policy"]["version"] == 2
    with pg_db.session() as s:
        assert s.scalar(select(func.count()).select_from(Deployment)) == 2
        run = get_stage(s, cycle_id=ctx.cycle_id, stage="deploy")
        assert (run.status, run.attempts) == ("succeeded", 2)


def test_a_rollback_after_a_cycle_restores_the_previous_policy(fake_env, pg_db):
    ctx = open_stage(fake_env, week=WEEK, params=None, trigger="manual", flow_run_id=None)
    with StoreLabeler(pg_db):
        _run(ctx, *STAGES[1:])
    with pg_db.session() as s:
        assert active_deployment(s).cycle_id == ctx.cycle_id
        back = rollback(s, reason="regression", actor="ops")
        assert back.policy_id == ctx.outputs("open", OpenOutputs).baseline_policy_id


def test_the_resolved_settings_are_fixed_when_the_cycle_opens(fake_env, pg_db):
    ctx = open_stage(fake_env, week=WEEK, params={"sample": {"config": {"num_samples": 2}}}, trigger="manual", flow_run_id=None)
    fake_env.defaults = fast_settings(sample={"config": {"num_samples": 5}})  # the server's defaults change mid-cycle
    again = open_stage(fake_env, week=WEEK, params=None, trigger="manual", flow_run_id="later")
    assert again.cycle_id == ctx.cycle_id and again.settings == ctx.settings
    assert again.settings.sample.config["num_samples"] == 2 and again.settings.sample.prompts_per_cycle == 6


def test_the_kl_anchor_may_be_the_deployed_policy_while_the_lineage_keeps_the_reference(fake_env, pg_db):
    from store.models import Policy

    first = open_stage(fake_env, week=WEEK, params=None, trigger="manual", flow_run_id=None)
    with StoreLabeler(pg_db):
        _run(first, *STAGES[1:])
    p1 = first.outputs("deploy", DeployOutputs).policy_id
    ctx = open_stage(fake_env, week="2026-W31", params={"improve": {"kl_anchor": "deployed"}}, trigger="manual",
                     flow_run_id=None)
    with StoreLabeler(pg_db):
        out = _run(ctx, "sample", "gather", "snapshot", "train_pm", "improve")["improve"]
    opened = ctx.outputs("open", OpenOutputs)
    assert opened.baseline_policy_id == p1 and opened.reference_policy_id != p1
    assert out["kl_anchor_policy_id"] == p1
    with pg_db.session() as s:
        candidate = s.get(Policy, out["policy_id"])
        anchor_uri = s.get(Policy, p1).artifact.uri
        assert candidate.reference_policy_id == opened.reference_policy_id  # P0: the root of the KL budget
        assert candidate.config["reference_path"] == anchor_uri == candidate.config["policy_path"]


@pytest.mark.parametrize("method", ["ppo", "dpo", "online_dpo", "rloo", "grpo", "rejection_sampling"])
def test_the_improve_stage_runs_the_cycles_method_with_its_inputs_and_records_it(fake_env, pg_db, method):
    from store.models import Dataset, Policy

    ctx = open_stage(fake_env, week=WEEK, params={"improve": {"method": method}}, trigger="manual", flow_run_id=None)
    with StoreLabeler(pg_db):
        out = _run(ctx, "sample", "gather", "snapshot", "train_pm", "improve")
    improve = out["improve"]
    step = "rloo" if method == "grpo" else method
    assert fake_env._runner.calls[-1] == step and improve["method"] == method
    with pg_db.session() as s:
        candidate = s.get(Policy, improve["policy_id"])
        config = candidate.config
        assert config["method"] == method
        if method == "dpo":
            # DPO learns from the comparison snapshot itself, against the KL anchor; no PM
            snapshot = s.get(Dataset, out["snapshot"]["dataset_id"])
            assert config["dataset_path"] == snapshot.artifact.uri and "pm_path" not in config
            assert config["model_path"] == config["ref_model_path"]  # init: deployed, anchor: reference (P0 here)
            assert improve.get("reward") is None
        else:
            assert {"policy_path", "reference_path", "pm_path", "test_pm_path", "prompts_path"} <= set(config)
            assert improve["kl"] is not None and improve["episodes"] is not None
        if method in ("rloo", "grpo"):
            assert config["estimator"] == method
    # the candidate of every method faces the same evaluate, human_eval and gate
    with StoreLabeler(pg_db):
        rest = _run(ctx, "evaluate", "human_eval", "gate")
    assert rest["evaluate"]["candidate_policy_id"] == improve["policy_id"] and "deploy" in rest["gate"]


def test_the_dpo_improve_stage_runs_on_both_backends(db, artifacts, work_dir):
    """SQLite serialises writers: the stage must read what it needs in one session at a time."""
    from orchestrator.cycle import CycleEnv
    from tests.orchestrator.fakes import FakeRunner, fake_world

    fake_world(db, artifacts, work_dir)
    env = CycleEnv(db, artifacts, work_dir=work_dir, defaults=fast_settings(), runner=FakeRunner(artifacts, work_dir))
    ctx = open_stage(env, week=WEEK, params={"improve": {"method": "dpo"}}, trigger="manual", flow_run_id=None)
    with StoreLabeler(db):
        out = _run(ctx, "sample", "gather", "snapshot", "train_pm", "improve")
    assert out["improve"]["method"] == "dpo" and env._runner.calls[-1] == "dpo"
