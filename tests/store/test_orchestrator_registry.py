"""Registry functions the orchestrator needs: claiming a cycle, locking a stage, a cycle's deployment,
recently deployed policies, task counts (both backends)."""

from datetime import timedelta

import pytest

from store.cycles import claim_cycle, finish_cycle, get_stage, open_cycle, start_stage
from store.deployments import cycle_deployment, deploy, deployed_policy_ids, rollback
from store.errors import Conflict
from store.feedback import create_feedback_batch
from store.tasks import create_tasks, lease_tasks, task_counts
from tests import builders


def test_a_rerun_claims_a_running_or_failed_cycle_but_never_a_finished_one(db):
    with db.session() as s:
        cycle, _ = open_cycle(s, week="2026-W01")
        assert claim_cycle(s, cycle_id=cycle.id, flow_run_id="run-1").flow_run_id == "run-1"
        finish_cycle(s, cycle_id=cycle.id, status="failed", reason="stage ppo failed: OOM")
        again = claim_cycle(s, cycle_id=cycle.id, flow_run_id="run-2")
        assert (again.status, again.reason, again.finished_at, again.flow_run_id) == ("running", None, None, "run-2")
        finish_cycle(s, cycle_id=cycle.id, status="succeeded")
        with pytest.raises(Conflict, match="already succeeded"):
            claim_cycle(s, cycle_id=cycle.id, flow_run_id="run-3")


def test_a_stage_row_can_be_read_under_a_lock(db):
    with db.session() as s:
        cycle, _ = open_cycle(s, week="2026-W02")
        start_stage(s, cycle_id=cycle.id, stage="improve")
    with db.session() as s:
        assert get_stage(s, cycle_id=cycle.id, stage="improve", for_update=True).status == "running"
        assert get_stage(s, cycle_id=cycle.id, stage="gate", for_update=True) is None


def test_a_cycle_finds_its_own_deployment_and_recent_policies_come_newest_first(db):
    with db.session() as s:
        cycle, _ = open_cycle(s, week="2026-W03")
        p1, p2, p3 = (builders.policy(s).id for _ in range(3))
        deploy(s, policy_id=p1)
        assert cycle_deployment(s, cycle_id=cycle.id) is None
        mine = deploy(s, policy_id=p2, cycle_id=cycle.id)
        deploy(s, policy_id=p3)
        rollback(s)  # back to p2: a rollback row is not the cycle's deploy
        assert cycle_deployment(s, cycle_id=cycle.id).id == mine.id
        assert cycle_deployment(s, cycle_id=cycle.id, name="other") is None
        assert deployed_policy_ids(s, limit=2) == [p2, p3]
        assert deployed_policy_ids(s, limit=5) == [p2, p3, p1]


def test_task_counts_split_open_and_done(db):
    with db.session() as s:
        cycle, _ = open_cycle(s, week="2026-W04")
        assert task_counts(s, cycle_id=cycle.id) == {"open": 0, "done": 0, "closed": 0, "unanswered": 0}
        answer = builders.comparison(0)
        texts = {"prompt": answer.prompt, "response_a": answer.response_a, "response_b": answer.response_b}
        create_tasks(s, cycle_id=cycle.id, tasks=[texts, {**texts, "answers_needed": 2}, texts])
        leased = [t.task for t in lease_tasks(s, rater_id=answer.rater_id, limit=2, lease=timedelta(minutes=5))]
        create_feedback_batch(s, source="x", comparisons=[builders.comparison(0, task_id=t.id) for t in leased])
        # the task that needs two raters has one answer: open, but answered
        assert task_counts(s, cycle_id=cycle.id) == {"open": 2, "done": 1, "closed": 0, "unanswered": 1}
