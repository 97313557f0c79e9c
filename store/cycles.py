"""Cycles and their stage runs: the idempotency keys of the orchestrator.

A cycle is keyed by its ISO week, so two triggers for the same week are one
cycle. A stage run is keyed by (cycle, stage): a re-run after a crash finds
the stages that succeeded and skips them. A week label must name a week that
exists (``week_problem``): an ISO year has 52 or 53 weeks.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store.errors import Conflict, InvalidInput, NotFound
from store.models import Cycle, StageRun, utcnow
from store.tasks import close_tasks
from store.versioning import get_row, list_rows


def iso_week(when: datetime) -> str:
    """The ISO week label of ``when``, e.g. ``2026-W48``."""
    year, week, _ = when.isocalendar()
    return f"{year}-W{week:02d}"


def weeks_in_year(year: int) -> int:
    """How many weeks ISO year ``year`` has: 52 or 53 (28 December is always in the last one)."""
    return date(year, 12, 28).isocalendar().week


def week_problem(week: str) -> str | None:
    """Why ``week`` is not the label of an existing ISO week, or None when it is.

    ``2026-W53`` exists and ``2027-W53`` does not: checked with ``date.fromisocalendar``.
    """
    match = re.fullmatch(r"([0-9]{4})-W([0-9]{2})", week)
    if match is None:
        return f"{week!r} is not an ISO week label like 2026-W48"
    year, number = int(match[1]), int(match[2])
    if year < 1:
        return f"{week!r} is not an ISO week: year {year} is before year 1"
    try:
        date.fromisocalendar(year, number, 1)
    except ValueError:
        last = weeks_in_year(year)
        return f"{week!r} does not exist: ISO year {year} has {last} weeks (W01 to W{last})"
    return None


def check_week(week: str) -> str:
    """``week`` if it labels an existing ISO week, else ``InvalidInput`` (field ``week``) saying why."""
    problem = week_problem(week)
    if problem is not None:
        raise InvalidInput(f"week {problem}", [{"field": "week", "message": problem}])
    return week


def open_cycle(
    session: Session, *, week: str, trigger: str = "manual", params: dict[str, Any] | None = None
) -> tuple[Cycle, bool]:
    """The cycle of ``week``, created if new; returns (cycle, created).

    ``InvalidInput`` for a week that does not exist (``check_week``).
    """
    check_week(week)
    existing = session.scalar(select(Cycle).where(Cycle.week == week))
    if existing is not None:
        return existing, False
    cycle = Cycle(week=week, trigger=trigger, params=params or {}, status="running")
    try:
        with session.begin_nested():
            session.add(cycle)
    except IntegrityError:
        # A concurrent trigger opened the same week first: that one is the cycle.
        return session.scalar(select(Cycle).where(Cycle.week == week)), False
    return cycle, True


def get_cycle(session: Session, cycle_id: int) -> Cycle:
    """The cycle ``cycle_id``."""
    return get_row(session, Cycle, cycle_id, label="cycle")


def list_cycles(session: Session, *, limit: int = 50, after_id: int | None = None) -> list[Cycle]:
    """Cycles in id order (keyset paging)."""
    return list_rows(session, Cycle, limit=limit, after_id=after_id)


def running_cycle_id(session: Session) -> int | None:
    """The id of the newest running cycle, or None when no cycle runs."""
    return session.scalar(select(Cycle.id).where(Cycle.status == "running").order_by(Cycle.id.desc()).limit(1))


def finish_cycle(session: Session, *, cycle_id: int, status: str, reason: str | None = None) -> Cycle:
    """Mark a running cycle succeeded, failed or cancelled.

    A cycle that is done for good (succeeded or cancelled) closes its open
    comparison tasks in the same transaction, so no labeler is handed a stale
    one; a failed cycle's tasks stay open (a re-run resumes it) but are not
    leased while it is not running.
    """
    cycle = get_cycle(session, cycle_id)
    if cycle.status != "running":
        raise Conflict(f"cycle {cycle.week} is already {cycle.status}")
    cycle.status, cycle.reason, cycle.finished_at = status, reason, utcnow()
    if status in ("succeeded", "cancelled"):
        close_tasks(session, cycle_id=cycle_id)
    return cycle


def claim_cycle(session: Session, *, cycle_id: int, flow_run_id: str | None) -> Cycle:
    """Record the flow run that now runs a cycle; a failed cycle becomes running again.

    This is how a re-run resumes a cycle: after a crash (the cycle is still
    running) or a final failure (failed). A finished cycle (succeeded or
    cancelled) is never run again: ``Conflict``.
    """
    cycle = get_cycle(session, cycle_id)
    if cycle.status in ("succeeded", "cancelled"):
        raise Conflict(f"cycle {cycle.week} is already {cycle.status}")
    cycle.status, cycle.reason, cycle.finished_at = "running", None, None
    cycle.flow_run_id = flow_run_id
    return cycle


def get_stage(session: Session, *, cycle_id: int, stage: str, for_update: bool = False) -> StageRun | None:
    """The stage run of (cycle, stage), or None if it never started.

    ``for_update`` locks the row until the transaction ends (Postgres; SQLite
    transactions are serialised anyway), so whoever records the stage's
    outputs first is the only one who does.
    """
    query = select(StageRun).where(StageRun.cycle_id == cycle_id, StageRun.stage == stage)
    if for_update:
        query = query.with_for_update()
    return session.scalar(query)


def start_stage(session: Session, *, cycle_id: int, stage: str) -> StageRun:
    """Start (or restart after a failure or crash) stage ``stage`` of a cycle.

    Raises ``Conflict`` if the stage already succeeded: callers check
    ``get_stage`` first and skip it.
    """
    run = get_stage(session, cycle_id=cycle_id, stage=stage)
    if run is None:
        run = StageRun(cycle_id=cycle_id, stage=stage, status="running", attempts=1)
        session.add(run)
        session.flush()
        return run
    if run.status == "succeeded":
        raise Conflict(f"stage {stage!r} of cycle {cycle_id} already succeeded")
    run.status, run.attempts, run.error = "running", run.attempts + 1, None
    run.started_at, run.finished_at = utcnow(), None
    return run


def finish_stage(
    session: Session,
    *,
    cycle_id: int,
    stage: str,
    outputs: dict[str, Any] | None = None,
    compute_s: float | None = None,
    status: str = "succeeded",
    error: str | None = None,
) -> StageRun:
    """Record the end of a running stage with its outputs (or its error)."""
    run = get_stage(session, cycle_id=cycle_id, stage=stage)
    if run is None:
        raise NotFound(f"stage {stage!r} of cycle {cycle_id} never started")
    run.status, run.outputs, run.error = status, outputs or {}, error
    run.compute_s, run.finished_at = compute_s, utcnow()
    return run
