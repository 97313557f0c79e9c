"""A cycle's alerts, stage by stage without Prefect (``stage_task.fn``), on PostgreSQL with a fake runner and a
local webhook receiver: one POST per event, with the cycle's text and link; a receiver that is down is retried
and recorded, and never fails the cycle."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from orchestrator.cycle import STAGES, fail_cycle
from orchestrator.flow import stage_task
from orchestrator.runners import StepFailed
from orchestrator.stages import finish, open_stage
from store.cycles import get_cycle, get_stage
from store.feedback import NewComparison, create_feedback_batch
from store.models import Alert
from store.raters import register_gold
from store.settings import get_settings
from store.tasks import lease_tasks
from tests.orchestrator.fakes import GOOD_EVAL, StoreLabeler
from tests.receivers import Receiver

WEEK = "2026-W30"
BASE = "https://ratchet.example"


@pytest.fixture
def receiver(monkeypatch):
    """``receiver(status=200)``: a webhook receiver the orchestrator's alerts go to (``RATCHET_ALERT_*``)."""
    started = []

    def start(status: int = 200) -> Receiver:
        hook = Receiver(status).__enter__()
        started.append(hook)
        monkeypatch.setenv("RATCHET_ALERT_WEBHOOK", hook.url)
        monkeypatch.setenv("RATCHET_ALERT_RETRY_DELAY_S", "0")
        monkeypatch.setenv("RATCHET_PUBLIC_URL", BASE)
        get_settings.cache_clear()
        return hook

    yield start
    for hook in started:
        hook.__exit__(None, None, None)
    get_settings.cache_clear()


def _alerts(pg_db) -> list[Alert]:
    with pg_db.session() as s:
        return list(s.scalars(select(Alert).order_by(Alert.id)))


def _answer_gold_wrong(pg_db, rater: str) -> int:
    """``rater`` leases tasks with gold among them and answers every gold task wrong (the others "a"); how many
    gold tasks it answered."""
    with pg_db.session() as s:
        leased = [t.task for t in lease_tasks(s, rater_id=rater, limit=50, lease=timedelta(minutes=5), gold_share=0.5)]
        wrong = {"a": "b", "b": "a", "tie": "a"}
        create_feedback_batch(s, source="careless", comparisons=[
            NewComparison(prompt=t.prompt, response_a=t.response_a, response_b=t.response_b, rater_id=rater,
                          task_id=t.id, choice=wrong[t.expected_choice] if t.kind == "gold" else "a")
            for t in leased])
        return sum(t.kind == "gold" for t in leased)


def test_a_refused_cycle_alerts_once_per_event_with_the_cycles_link(fake_env, pg_db, receiver):
    hook = receiver()
    fake_env.runner_for(fake_env.defaults).eval_metrics["eval/kl"] = 5.0  # over the KL budget: the gate refuses
    with pg_db.session() as s:
        register_gold(s, items=[{"prompt": f"\n\nHuman: gold {i}?\n\nAssistant:", "response_a": f" right {i}",
                                 "response_b": f" wrong {i}", "choice": "a"} for i in range(10)])
    ctx = open_stage(fake_env, week=WEEK, params={"qc": {"min_gold_answers": 2}}, trigger="manual", flow_run_id=None)
    stage_task.fn(ctx, "sample")
    assert _answer_gold_wrong(pg_db, "careless") >= 2
    with StoreLabeler(pg_db):
        for stage in STAGES[2:]:
            stage_task.fn(ctx, stage)
    finish(ctx)
    for stage in ("snapshot", "human_eval", "gate"):  # re-runs of finished stages record nothing again
        stage_task.fn(ctx, stage)

    assert hook.events() == ["deploy", "rater_flagged", "gate_refused"]  # P0's deploy, from the fake world
    link = f"{BASE}/dashboard/cycles/{ctx.cycle_id}"
    flagged, refused = hook.bodies[1], hook.bodies[2]
    assert flagged["payload"]["rater_id"] == "careless" and flagged["payload"]["reason"] == "gold"
    assert flagged["text"].startswith("Rater careless is flagged by quality control: gold accuracy 0.00")
    assert refused["cycle"] == WEEK and refused["link"] == link and refused["text"].endswith("\n" + link)
    assert refused["text"].startswith(f"Cycle {WEEK}: the gate refused policy v2: KL to the reference 5.0000")
    assert refused["payload"]["reasons"] and refused["payload"]["checks"]["within_kl_budget"] is False
    alerts = _alerts(pg_db)
    assert [a.dedupe_key for a in alerts][1:] == ["rater_flagged:careless:gold", f"gate_refused:{ctx.cycle_id}"]
    assert all(a.status == "delivered" and a.attempts == 1 for a in alerts)


def test_a_deadline_short_of_the_minimum_alerts_and_a_receiver_at_500_does_not_fail_the_stage(
        fake_env, pg_db, receiver):
    hook = receiver(status=500)
    ctx = open_stage(fake_env, week=WEEK, params={"gather": {"min_comparisons": 10_000, "deadline_s": 3600,
                                                             "poll_interval_s": 600}},
                     trigger="manual", flow_run_id=None)
    stage_task.fn(ctx, "sample")
    with pg_db.session() as s:
        now = [get_stage(s, cycle_id=ctx.cycle_id, stage="sample").finished_at]
    fake_env.clock = lambda: now[0]
    fake_env.sleep = lambda seconds: now.__setitem__(0, now[0] + timedelta(seconds=seconds))

    out = stage_task.fn(ctx, "gather")
    assert out["outcome"] == "deadline"
    with pg_db.session() as s:
        assert get_stage(s, cycle_id=ctx.cycle_id, stage="gather").status == "succeeded"
        assert get_cycle(s, ctx.cycle_id).status == "running"
    deadline = [a for a in _alerts(pg_db) if a.event == "deadline"]
    assert [a.dedupe_key for a in deadline] == [f"deadline:{ctx.cycle_id}:gather"]
    assert deadline[0].text == f"Cycle {WEEK}: gather reached its deadline with 0 of the 10000 comparisons it waits for"
    assert (deadline[0].status, deadline[0].attempts) == ("failed", 3) and "answered 500" in deadline[0].last_error
    assert hook.events() == ["deploy"] * 3 + ["deadline"] * 3  # every alert tried three times, then given up on
    stage_task.fn(ctx, "snapshot")  # the cycle goes on
    assert len(hook.bodies) == 6  # and failed alerts are not tried again


def test_a_stage_that_fails_for_good_alerts_once(fake_env, pg_db, receiver):
    hook = receiver()
    fake_env.runner_for(fake_env.defaults).fail = {"sample": 5}
    ctx = open_stage(fake_env, week=WEEK, params=None, trigger="manual", flow_run_id=None)
    for _ in range(2):  # a retry that fails again is not an alert: only the last one is
        with pytest.raises(StepFailed) as failed:
            stage_task.fn(ctx, "sample")
    assert hook.events() == ["deploy"]
    fail_cycle(fake_env, ctx.cycle_id, "sample", failed.value)  # what the flow does after the last retry
    fail_cycle(fake_env, ctx.cycle_id, "sample", failed.value)  # the cycle is failed already: nothing more
    assert hook.events() == ["deploy", "stage_failed"]
    body = hook.bodies[1]
    assert body["text"] == (f"Cycle {WEEK} failed: stage sample failed: StepFailed: injected failure of sample "
                            f"(after 2 attempt(s))\n{BASE}/dashboard/cycles/{ctx.cycle_id}")
    assert body["payload"]["stage"] == "sample" and body["payload"]["attempts"] == 2
    assert _alerts(pg_db)[1].dedupe_key == f"stage_failed:{ctx.cycle_id}:sample:2"


def test_without_alert_settings_a_cycle_leaves_its_alerts_pending(fake_env, pg_db, monkeypatch):
    monkeypatch.delenv("RATCHET_ALERT_WEBHOOK", raising=False)
    monkeypatch.delenv("RATCHET_ALERT_COMMAND", raising=False)
    get_settings.cache_clear()
    fake_env.runner_for(fake_env.defaults).eval_metrics.update(GOOD_EVAL)
    ctx = open_stage(fake_env, week=WEEK, params=None, trigger="manual", flow_run_id=None)
    with StoreLabeler(pg_db):
        for stage in STAGES[1:]:
            stage_task.fn(ctx, stage)
    alerts = _alerts(pg_db)
    assert [a.event for a in alerts] == ["deploy", "deploy"] and {a.status for a in alerts} == {"pending"}
    assert alerts[1].cycle_id == ctx.cycle_id and alerts[1].link == f"/dashboard/cycles/{ctx.cycle_id}"
