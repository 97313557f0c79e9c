"""The deploy stage takes the target's lock before it decides, like every other deploy and rollback (PostgreSQL)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import text

from orchestrator.flow import stage_task
from orchestrator.cycle import STAGES
from orchestrator.stages import open_stage
from store.cycles import get_stage
from store.deployments import active_deployment, deploy, lock_target
from tests.orchestrator.fakes import StoreLabeler

WEEK = "2026-W32"


def _wait_for_a_lock_waiter(session, timeout_s: float = 10.0) -> None:
    """Return once another connection waits for an advisory lock (polled in ``pg_locks``)."""
    deadline = time.monotonic() + timeout_s
    query = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    while session.connection().execute(query).scalar() == 0:
        assert time.monotonic() < deadline, "the deploy stage never waited for the target's lock"
        time.sleep(0.02)


def test_an_operator_deploy_racing_the_deploy_stage_is_not_overridden(fake_env, pg_db):
    ctx = open_stage(fake_env, week=WEEK, params=None, trigger="manual", flow_run_id=None)
    with StoreLabeler(pg_db):
        for stage in STAGES[1:9]:
            stage_task.fn(ctx, stage)
    with ThreadPoolExecutor(1) as pool:
        with pg_db.session() as s:  # an operator redeploys P0 and holds the target while the stage starts
            lock_target(s, name="default")
            stage = pool.submit(stage_task.fn, ctx, "deploy")
            _wait_for_a_lock_waiter(s)
            deploy(s, policy_id=active_deployment(s).policy_id, reason="hand", actor="ops")
        out = stage.result(timeout=30)
    assert out["deployed"] is False and "changed while the cycle ran" in out["reasons"][0]
    with pg_db.session() as s:
        assert get_stage(s, cycle_id=ctx.cycle_id, stage="deploy").status == "skipped"
        assert active_deployment(s).actor == "ops"
