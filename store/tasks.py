"""Comparison tasks: pairs of responses handed out to labelers under a lease.

A task is leased only while its cycle runs (or when it belongs to no
cycle): the open tasks of a cycle that finished are closed, and those of a
failed cycle wait, unleased, until a re-run resumes it. Eval tasks (the human
A/B evaluation of a candidate) are handed out before training tasks, since
a cycle waiting on its gate waits on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.orm import Session

from store.models import Comparison, ComparisonTask, Cycle, utcnow


def create_tasks(
    session: Session,
    *,
    tasks: Sequence[dict[str, Any]],
    cycle_id: int | None = None,
    samples_dataset_id: int | None = None,
    kind: str = "train",
) -> list[ComparisonTask]:
    """Open comparison tasks; each dict has prompt, response_a, response_b (and
    optionally prompt_id, metadata, and for eval tasks candidate_side)."""
    rows = [
        ComparisonTask(
            cycle_id=cycle_id,
            samples_dataset_id=samples_dataset_id,
            prompt_id=t.get("prompt_id"),
            prompt=t["prompt"],
            response_a=t["response_a"],
            response_b=t["response_b"],
            meta=t.get("metadata") or {},
            kind=kind,
            candidate_side=t.get("candidate_side"),
        )
        for t in tasks
    ]
    session.add_all(rows)
    session.flush()
    return rows


def lease_tasks(
    session: Session, *, labeler: str, limit: int, lease: timedelta, cycle_id: int | None = None
) -> list[ComparisonTask]:
    """Lease up to ``limit`` open tasks whose lease is free or expired, eval tasks first.

    Only tasks of a running cycle (or of no cycle) are leased. On Postgres
    the rows are locked with SKIP LOCKED, so two labelers asking at once get
    different tasks; SQLite serialises writers anyway.
    """
    now = utcnow()
    running = select(Cycle.id).where(Cycle.status == "running")
    query = (
        select(ComparisonTask)
        .where(
            ComparisonTask.status == "open",
            or_(ComparisonTask.leased_until.is_(None), ComparisonTask.leased_until < now),
            or_(ComparisonTask.cycle_id.is_(None), ComparisonTask.cycle_id.in_(running)),
        )
        .order_by(case((ComparisonTask.kind == "eval", 0), else_=1), ComparisonTask.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if cycle_id is not None:
        query = query.where(ComparisonTask.cycle_id == cycle_id)
    rows = list(session.scalars(query))
    for row in rows:
        row.leased_by, row.leased_until = labeler, now + lease
    session.flush()
    return rows


def close_tasks(session: Session, *, cycle_id: int, kind: str | None = None) -> int:
    """Close a cycle's open tasks (of one kind, or all): no labeler is handed them again. Returns how many."""
    query = update(ComparisonTask).where(ComparisonTask.cycle_id == cycle_id, ComparisonTask.status == "open")
    if kind is not None:
        query = query.where(ComparisonTask.kind == kind)
    result = session.execute(query.values(status="closed", done_at=utcnow(), leased_by=None, leased_until=None))
    return int(result.rowcount or 0)


def task_counts(session: Session, *, cycle_id: int, kind: str | None = "train") -> dict[str, int]:
    """How many of a cycle's comparison tasks (of one kind; None: all) are open, done and closed."""
    query = select(ComparisonTask.status, func.count()).where(ComparisonTask.cycle_id == cycle_id)
    if kind is not None:
        query = query.where(ComparisonTask.kind == kind)
    counts = {status: 0 for status in ("open", "done", "closed")}
    counts.update({status: int(n) for status, n in session.execute(query.group_by(ComparisonTask.status))})
    return counts


def eval_tasks_of(session: Session, *, cycle_id: int) -> list[ComparisonTask]:
    """A cycle's eval tasks, in id order."""
    query = select(ComparisonTask).where(ComparisonTask.cycle_id == cycle_id, ComparisonTask.kind == "eval")
    return list(session.scalars(query.order_by(ComparisonTask.id)))


@dataclass(frozen=True)
class EvalJudgement:
    """One labeler's verdict on one eval task, as the candidate sees it."""

    task_id: int
    rater_id: str
    outcome: float
    """1: the labeler preferred the candidate, 0: the deployed policy, 0.5: a tie"""


def eval_judgements(session: Session, *, cycle_id: int) -> list[EvalJudgement]:
    """Every answer to the cycle's eval tasks, unblinded; one per (task, rater): the first one registered."""
    rows = session.execute(
        select(Comparison.task_id, Comparison.rater_id, Comparison.choice, ComparisonTask.candidate_side)
        .join(ComparisonTask, ComparisonTask.id == Comparison.task_id)
        .where(ComparisonTask.cycle_id == cycle_id, ComparisonTask.kind == "eval")
        .order_by(Comparison.id)
    )
    seen: set[tuple[int, str]] = set()
    out = []
    for task_id, rater_id, choice, side in rows:
        if (task_id, rater_id) in seen:
            continue
        seen.add((task_id, rater_id))
        outcome = 0.5 if choice == "tie" else float(choice == side)
        out.append(EvalJudgement(task_id=task_id, rater_id=rater_id, outcome=outcome))
    return out
