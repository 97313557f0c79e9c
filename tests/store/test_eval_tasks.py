"""Eval tasks (the blinded human A/B evaluation), leases of finished cycles, and snapshots without eval answers."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from store.cycles import finish_cycle, open_cycle
from store.datasets import snapshot_comparisons
from store.errors import Conflict
from store.feedback import NewComparison, count_comparisons, create_feedback_batch
from store.models import TaskLease, utcnow
from store.tasks import create_tasks, eval_judgements, lease_tasks, task_counts
from tests import builders

LEASE = timedelta(minutes=5)


def _pair(i: int, side: str | None = None) -> dict:
    task = {"prompt": f"Human: q{i}?\n\nAssistant:", "response_a": f" a{i}", "response_b": f" b{i}"}
    if side is not None:
        task["candidate_side"] = side
    return task


def _hold(session, tasks, rater):
    """Leases of ``rater`` on exactly these tasks (what GET /v1/comparison-tasks would have handed it)."""
    until = utcnow() + LEASE
    for t in tasks:
        lease = session.scalar(select(TaskLease).where(TaskLease.task_id == t.id, TaskLease.rater_id == rater))
        if lease is None:
            session.add(TaskLease(task_id=t.id, rater_id=rater, leased_until=until))
    session.flush()


def _answer(session, tasks, choices, rater="r1"):
    _hold(session, tasks, rater)
    comparisons = [NewComparison(prompt=t.prompt, response_a=t.response_a, response_b=t.response_b, choice=c,
                                 rater_id=rater, task_id=t.id) for t, c in zip(tasks, choices)]
    return create_feedback_batch(session, source="labeler", comparisons=comparisons)[0]


def test_eval_judgements_unblind_each_answer_once_per_rater(db):
    with db.session() as s:
        cycle, _ = open_cycle(s, week="2026-W05")
        tasks = create_tasks(s, cycle_id=cycle.id, kind="eval", tasks=[_pair(0, "a"), _pair(1, "b"), _pair(2, "b")])
        tasks = create_tasks(s, cycle_id=cycle.id, kind="eval",
                             tasks=[{**_pair(3, "a"), "answers_needed": 2}]) + tasks  # one needs two raters
        _answer(s, tasks, ["b", "a", "a", "tie"])  # the candidate, the candidate, the deployed policy, a tie
        with pytest.raises(Conflict, match="already answered"):
            with s.begin_nested():
                _answer(s, tasks[:1], ["a"])  # the same rater again: refused
        _answer(s, tasks[:1], ["b"], rater="r2")  # another rater, on the task that needs two: counts
        outcomes = [(j.task_id, j.rater_id, j.outcome) for j in eval_judgements(s, cycle_id=cycle.id)]
        assert outcomes == [(tasks[0].id, "r1", 0.0), (tasks[1].id, "r1", 1.0), (tasks[2].id, "r1", 0.0),
                            (tasks[3].id, "r1", 0.5), (tasks[0].id, "r2", 0.0)]
        assert task_counts(s, cycle_id=cycle.id, kind="eval") == {"open": 0, "done": 4, "closed": 0, "unanswered": 0}
        assert task_counts(s, cycle_id=cycle.id, kind="train") == {"open": 0, "done": 0, "closed": 0, "unanswered": 0}


def test_eval_tasks_are_leased_first_and_only_while_their_cycle_runs(db):
    with db.session() as s:
        cycle, _ = open_cycle(s, week="2026-W06")
        train = create_tasks(s, cycle_id=cycle.id, tasks=[_pair(i) for i in range(2)])
        evals = create_tasks(s, cycle_id=cycle.id, kind="eval", tasks=[_pair(9, "a")])
        leased = lease_tasks(s, rater_id="l1", limit=2, lease=LEASE)
        assert [t.task.id for t in leased] == [evals[0].id, train[0].id]
        finish_cycle(s, cycle_id=cycle.id, status="failed", reason="boom")
        assert lease_tasks(s, rater_id="l2", limit=10, lease=LEASE * 0) == []  # a failed cycle's tasks wait
        cycle.status = "running"  # a re-run resumes it
        assert [t.task.id for t in lease_tasks(s, rater_id="l2", limit=10, lease=LEASE)] == [train[1].id]


def test_a_finished_cycle_closes_its_open_tasks_and_none_is_leased_again(db):
    with db.session() as s:
        cycle, _ = open_cycle(s, week="2026-W07")
        tasks = create_tasks(s, cycle_id=cycle.id, tasks=[_pair(i) for i in range(3)])
        _answer(s, tasks[:1], ["a"])
        finish_cycle(s, cycle_id=cycle.id, status="succeeded")
        assert task_counts(s, cycle_id=cycle.id) == {"open": 0, "done": 1, "closed": 2, "unanswered": 0}
        assert lease_tasks(s, rater_id="l1", limit=10, lease=LEASE) == []
        # tasks of no cycle are still handed out
        free = create_tasks(s, tasks=[_pair(5)])
        assert [t.task.id for t in lease_tasks(s, rater_id="l1", limit=10, lease=LEASE)] == [free[0].id]


def test_snapshots_leave_out_eval_answers_unless_later_cycles_may_train_on_them(db, artifacts):
    with db.session() as s:
        c1, _ = open_cycle(s, week="2026-W08")
        training = builders.batch(s, n=3)
        evals = create_tasks(s, cycle_id=c1.id, kind="eval", tasks=[_pair(i, "a") for i in range(2)])
        train_tasks = create_tasks(s, cycle_id=c1.id, tasks=[_pair(7)])
        mixed = _answer(s, [evals[0], train_tasks[0]], ["a", "b"])  # one eval answer, one training answer
        only_eval = _answer(s, evals[1:], ["b"])
        # cycle 1's own snapshot never holds its eval answers, even with include_eval
        own, _ = snapshot_comparisons(s, artifacts=artifacts, cycle_id=c1.id, include_eval=True)
        assert own.row_count == 4 and own.meta["excluded_eval_comparisons"] == 2
        assert {b.id for b in own.batches} == {training.id, mixed.id}  # a batch of eval answers only is not in it
        rows = [json.loads(x) for x in artifacts.read_bytes(own.artifact.uri, own.artifact.sha256).decode().splitlines()]
        assert all(r.get("task_id") not in {t.id for t in evals} for r in rows)
        # a later cycle: by default still without them; with include_eval, with them
        c2, _ = open_cycle(s, week="2026-W09")
        later, created = snapshot_comparisons(s, artifacts=artifacts, cycle_id=c2.id)
        assert not created and later.id == own.id  # the same training comparisons: the same version
        with_eval, created = snapshot_comparisons(s, artifacts=artifacts, cycle_id=c2.id, include_eval=True)
        assert created and with_eval.row_count == 6 and only_eval.id in {b.id for b in with_eval.batches}
        # gather counts training comparisons only
        assert count_comparisons(s) == 6 and count_comparisons(s, training_only=True) == 4
