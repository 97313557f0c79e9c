"""Answers to comparison tasks: the lease rules a feedback batch must keep (``store.tasks``).

A comparison that names a ``task_id`` answers that task. It is accepted
only when, inside the batch's transaction and with the task rows locked:

* its prompt and responses are the task's, as shown (else ``InvalidInput``,
  422, naming the comparison and field);
* the same rater does not answer the task twice in the batch (422);
* the task is open (a closed task's cycle ended: ``Conflict``, 409) and its
  rater holds a live lease on it under the batch's API key (409 naming the
  task: not leased, leased to another key, answered already, released, or
  run out).

When the batch is written, each lease is marked answered and its task
counts the answer; a task answered by ``answers_needed`` raters is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.errors import Conflict, InvalidInput
from store.models import ComparisonTask, TaskLease, utcnow
from store.tasks import lease_problem

TEXT_FIELDS = ("prompt", "response_a", "response_b")


@dataclass(frozen=True)
class Answer:
    """What a comparison says about its task: which rater, and the texts it judged."""

    index: int
    task_id: int
    rater_id: str
    prompt: str
    response_a: str
    response_b: str


@dataclass
class Claimed:
    """The leases a batch answers, locked, to be marked when the batch is written."""

    leases: list[TaskLease]

    def record(self, session: Session) -> None:
        """Mark each lease answered and count the answer on its task; a task with enough answers is done."""
        now = utcnow()
        for lease in self.leases:
            lease.answered_at = now
            task = lease.task
            task.answers += 1
            if task.answers >= task.answers_needed and task.status == "open":
                task.status, task.done_at = "done", now
        session.flush()


def claim_answers(session: Session, answers: Sequence[Answer], *, api_key_id: int | None) -> Claimed:
    """Check ``answers`` against their tasks and leases (the rules above) and lock them.

    Raises ``InvalidInput`` (every text mismatch and duplicate, by comparison
    index) before ``Conflict`` (every lease problem, by task). Unknown task ids
    are the caller's check (``store.feedback``).
    """
    if not answers:
        return Claimed([])
    task_ids = sorted({a.task_id for a in answers})
    # Locked in id order, so two batches answering overlapping tasks cannot deadlock.
    tasks = {t.id: t for t in session.scalars(
        select(ComparisonTask).where(ComparisonTask.id.in_(task_ids)).order_by(ComparisonTask.id).with_for_update()
    )}
    leases = {(row.task_id, row.rater_id): row for row in session.scalars(
        select(TaskLease).where(TaskLease.task_id.in_(task_ids)).with_for_update()
    )}
    invalid: list[dict] = []
    seen: set[tuple[int, str]] = set()
    for a in answers:
        task = tasks.get(a.task_id)
        if task is None:
            continue
        for name in TEXT_FIELDS:
            if getattr(a, name) != getattr(task, name):
                invalid.append({"index": a.index, "field": name,
                                "message": f"{name} is not the one comparison task {a.task_id} shows"})
        if (a.task_id, a.rater_id) in seen:
            invalid.append({"index": a.index, "field": "task_id",
                            "message": f"rater {a.rater_id!r} answers comparison task {a.task_id} twice in this batch"})
        seen.add((a.task_id, a.rater_id))
    if invalid:
        raise InvalidInput(f"{len(invalid)} comparison(s) do not match their tasks", invalid[:100])
    now = utcnow()
    conflicts: list[str] = []
    claimed = []
    for a in answers:
        task = tasks.get(a.task_id)
        if task is None:
            continue
        if task.status == "closed":
            conflicts.append(f"comparison task {a.task_id} is closed (its cycle ended)")
            continue
        lease = leases.get((a.task_id, a.rater_id))
        problem = lease_problem(lease, task_id=a.task_id, rater_id=a.rater_id, api_key_id=api_key_id, now=now)
        if problem is None and task.status == "done":
            problem = f"comparison task {a.task_id} has all the answers it needs"
        if problem:
            conflicts.append(problem)
        else:
            claimed.append(lease)
    if conflicts:
        shown = "; ".join(conflicts[:5]) + (f"; and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
        raise Conflict(shown)
    return Claimed(claimed)
