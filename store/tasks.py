"""Comparison tasks: pairs of responses handed out to labelers under a lease."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from store.models import ComparisonTask, utcnow


def create_tasks(
    session: Session,
    *,
    tasks: Sequence[dict[str, Any]],
    cycle_id: int | None = None,
    samples_dataset_id: int | None = None,
) -> list[ComparisonTask]:
    """Open comparison tasks; each dict has prompt, response_a, response_b (and
    optionally prompt_id, metadata)."""
    rows = [
        ComparisonTask(
            cycle_id=cycle_id,
            samples_dataset_id=samples_dataset_id,
            prompt_id=t.get("prompt_id"),
            prompt=t["prompt"],
            response_a=t["response_a"],
            response_b=t["response_b"],
            meta=t.get("metadata") or {},
        )
        for t in tasks
    ]
    session.add_all(rows)
    session.flush()
    return rows


def lease_tasks(
    session: Session, *, labeler: str, limit: int, lease: timedelta, cycle_id: int | None = None
) -> list[ComparisonTask]:
    """Lease up to ``limit`` open tasks whose lease is free or expired.

    On Postgres the rows are locked with SKIP LOCKED, so two labelers asking
    at once get different tasks; SQLite serialises writers anyway.
    """
    now = utcnow()
    query = (
        select(ComparisonTask)
        .where(
            ComparisonTask.status == "open",
            or_(ComparisonTask.leased_until.is_(None), ComparisonTask.leased_until < now),
        )
        .order_by(ComparisonTask.id)
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


def task_counts(session: Session, *, cycle_id: int) -> dict[str, int]:
    """How many of a cycle's comparison tasks are open and done."""
    rows = session.execute(
        select(ComparisonTask.status, func.count()).where(ComparisonTask.cycle_id == cycle_id).group_by(ComparisonTask.status)
    )
    counts = {status: 0 for status in ("open", "done")}
    counts.update({status: int(n) for status, n in rows})
    return counts
