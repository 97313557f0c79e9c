"""The human A/B evaluation before the gate, sampling top-ups, and gather on a collapsed policy.

Stage logic with ``stage_task.fn`` (no Prefect), on PostgreSQL, with the fake
runner; the spurious-feature case scores the candidate with a real PM.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from orchestrator.flow import stage_task
from datetime import timedelta

from orchestrator.cycle import STAGES, CycleEnv, skip_stage
from orchestrator.stages import finish, open_stage
from store.models import Comparison, ComparisonTask, Dataset
from store.tasks import lease_tasks
from tests.orchestrator.fakes import FakeRunner, StoreLabeler

WEEK = "2026-W31"


def _run(ctx, *stages):
    return {stage: stage_task.fn(ctx, stage) for stage in stages}


def _env(fake_env: CycleEnv, **runner) -> CycleEnv:
    fake_env._runner = FakeRunner(fake_env.artifacts, fake_env.work_dir, **runner)
    return fake_env


@pytest.fixture(scope="module")
def please_pm(tmp_path_factory) -> Path:
    """A real PM trained on comparisons where the response saying " please" always won: a spurious feature."""
    from tests.workers.builders import synthetic_preferences, write_jsonl
    from workers.common.testing import build_tiny_model, build_tokenizer
    from workers.train_pm import TrainPMConfig, run

    root = tmp_path_factory.mktemp("please")
    model = build_tiny_model(root / "base", tokenizer=build_tokenizer(vocab_size=512), seed=0)
    data = write_jsonl(root / "please.jsonl", synthetic_preferences(400))
    result = run(TrainPMConfig(model_path=str(model), dataset_path=str(data), output_dir=str(root / "pm"),
                               heldout_fraction=0.2, batch_size=16, learning_rate=3e-3, max_steps=24, max_length=64,
                               progress=False))
    assert result.metrics["heldout/accuracy"] >= 0.9
    return Path(result.outputs["pm"])


def test_a_candidate_both_pms_prefer_but_the_labelers_do_not_is_refused(fake_env, pg_db, please_pm):
    from workers.common.score import load_pm, score

    # The candidate says "please" and nothing useful; the deployed policy answers. The PM (both PMs: they learned
    # from the same labels) prefers the candidate on every held-out prompt; the labelers prefer the answer.
    candidate, baseline = " the cat sun please", " Sure the dog book"
    pm = load_pm(please_pm, device="cpu")
    prompts = [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(4)]
    wins = [c > b for c, b in zip(score(pm, [(p, candidate) for p in prompts]), score(pm, [(p, baseline) for p in prompts]))]
    pm_win_rate = sum(wins) / len(wins)
    assert pm_win_rate == 1.0
    metrics = {"eval/win_rate_test_pm": pm_win_rate, "eval/win_rate_train_pm": pm_win_rate, "eval/kl": 0.5,
               "eval/test_pm_delta": 0.8, "eval/train_pm_delta": 0.8}
    env = _env(fake_env, eval_metrics=metrics, candidate_response=candidate, baseline_responses=(baseline,))
    ctx = open_stage(env, week=WEEK, params=None, trigger="manual", flow_run_id=None)
    with StoreLabeler(pg_db, prefers="Sure"):
        out = _run(ctx, *STAGES[1:])
    human, gate = out["human_eval"], out["gate"]
    assert (human["tasks"], human["answers"], human["wins"], human["losses"]) == (4, 4, 0, 4)
    assert not gate["deploy"] and gate["checks"]["beats_deployed_under_test_pm"] and gate["checks"]["pms_agree"]
    assert gate["reasons"] == [
        "human win rate 0.000 (0 wins, 0 ties, 4 losses): its 90% lower bound 0.000 (bootstrap) is not above 0.500"
    ]
    assert out["deploy"]["deployed"] is False
    assert "human win rate 0.000" in finish(ctx).reason  # the cycle's reason carries the human verdict


def test_eval_tasks_are_blinded_and_their_answers_never_train_the_cycles_pms(fake_env, pg_db):
    ctx = open_stage(fake_env, week=WEEK, params=None, trigger="manual", flow_run_id=None)
    with StoreLabeler(pg_db):
        out = _run(ctx, *STAGES[1:])
    with pg_db.session() as s:
        evals = list(s.scalars(select(ComparisonTask).where(ComparisonTask.kind == "eval")))
        assert len(evals) == out["human_eval"]["tasks"] == 4
        assert {t.candidate_side for t in evals} == {"a", "b"}  # the order is random per task
        assert all(t.meta == {} for t in evals)  # nothing in what labelers see says which side is which
        eval_ids = {t.id for t in evals}
        snapshot = s.get(Dataset, out["snapshot"]["dataset_id"])
        rows = [json.loads(x) for x in fake_env.artifacts.read_bytes(snapshot.artifact.uri, snapshot.artifact.sha256)
                .decode().splitlines()]
        assert rows and not {r.get("task_id") for r in rows} & eval_ids
        answered = set(s.scalars(select(Comparison.task_id).where(Comparison.task_id.in_(eval_ids))))
        assert answered == eval_ids  # answered and stored, like any other comparison
    # the next cycle's snapshot leaves them out too (human_eval.train_on is off by default)
    nxt = open_stage(fake_env, week="2026-W32", params=None, trigger="manual", flow_run_id=None)
    with StoreLabeler(pg_db):
        later = _run(nxt, "sample", "gather", "snapshot")["snapshot"]
    assert later["excluded_eval_comparisons"] == 4


def test_a_collapsed_policy_gets_its_tasks_topped_up_and_gather_does_not_wait_for_its_deadline(fake_env, pg_db):
    # below temperature 1.5 the policy gives one response per prompt: no pairs at all
    env = _env(fake_env, collapse_below=1.5)
    params = {"sample": {"prompts_per_cycle": 3, "top_up_rounds": 3, "top_up_temperature": 0.5},
              "gather": {"min_comparisons": 8, "deadline_s": 3600, "all_tasks": True}}
    ctx = open_stage(env, week=WEEK, params=params, trigger="manual", flow_run_id=None)
    sample = _run(ctx, "sample")["sample"]
    # round 0 (T=1.0) made nothing; round 1 (T=1.5) made pairs from 6 prompts, short of 8; round 2 reached 8
    assert [r["tasks_so_far"] for r in sample["rounds"]][:1] == [0]
    assert sample["top_up_rounds"] >= 1 and sample["tasks"] >= 8 and sample["short"] is None
    assert [r["temperature"] for r in sample["rounds"]] == [1.0 + 0.5 * i for i in range(len(sample["rounds"]))]
    assert sample["rounds"][-1]["prompts"] == 3 * len(sample["rounds"])
    t0 = time.monotonic()
    with StoreLabeler(pg_db):
        gather = _run(ctx, "gather")["gather"]
    assert gather["outcome"] == "enough" and time.monotonic() - t0 < 30


def test_when_top_ups_cannot_make_enough_tasks_gather_goes_on_once_every_task_is_answered(fake_env, pg_db):
    env = _env(fake_env, collapse_below=99.0)  # collapsed at any temperature: one response per prompt, ever
    params = {"sample": {"prompts_per_cycle": 3, "top_up_rounds": 2},
              "gather": {"min_comparisons": 500, "deadline_s": 3600, "all_tasks": True}}
    ctx = open_stage(env, week=WEEK, params=params, trigger="manual", flow_run_id=None)
    sample = _run(ctx, "sample")["sample"]
    assert sample["top_up_rounds"] == 2 and 0 < sample["tasks"] < 500
    assert sample["short"].startswith(f"only {sample['tasks']} comparison tasks after 2 top-up round(s)")
    t0 = time.monotonic()
    with StoreLabeler(pg_db):
        gather = _run(ctx, "gather")["gather"]
    # every task answered: the outcome can no longer change, so gather goes on instead of waiting an hour
    assert gather["outcome"] == "answered" and gather["comparisons"] == sample["tasks"] and time.monotonic() - t0 < 30


def test_a_snapshot_with_no_new_feedback_skips_the_rest_of_the_cycle(fake_env, pg_db):
    first = open_stage(fake_env, week=WEEK, params=None, trigger="manual", flow_run_id=None)
    with StoreLabeler(pg_db):
        _run(first, *STAGES[1:])
    finish(first)
    # next week nobody labels: gather ends at its deadline with nothing new, and the snapshot is last week's
    ctx = open_stage(fake_env, week="2026-W32", params={"gather": {"deadline_s": 0}}, trigger="manual", flow_run_id=None)
    out = _run(ctx, "sample", "gather", "snapshot")
    assert out["gather"]["outcome"] == "deadline" and out["snapshot"]["new_version"] is False
    assert out["snapshot"]["halt"].startswith("no new feedback: comparisons v1")
    for stage in STAGES[STAGES.index("snapshot") + 1 :]:
        skipped = skip_stage(ctx, stage, out["snapshot"]["halt"])
        assert skipped == {"skipped": out["snapshot"]["halt"]}
    cycle = finish(ctx)
    assert cycle.status == "succeeded" and cycle.reason.startswith("no new feedback")
    with pg_db.session() as s:
        assert s.scalar(select(func.count()).select_from(ComparisonTask).where(
            ComparisonTask.cycle_id == ctx.cycle_id, ComparisonTask.status == "open")) == 0
        # its tasks were closed when it finished: none is leased any more
        assert lease_tasks(s, rater_id="late", limit=100, lease=timedelta(minutes=1)) == []


def test_human_evaluation_switched_off_leaves_the_gate_to_the_pms(fake_env, pg_db):
    ctx = open_stage(fake_env, week=WEEK, params={"human_eval": {"enabled": False}}, trigger="manual", flow_run_id=None)
    with StoreLabeler(pg_db):
        out = _run(ctx, *STAGES[1:])
    assert out["human_eval"]["enabled"] is False and out["gate"]["measures"]["human_eval"] == "off"
    assert out["gate"]["deploy"] is True
    with pg_db.session() as s:
        assert s.scalar(select(func.count()).select_from(ComparisonTask).where(ComparisonTask.kind == "eval")) == 0
