"""Cycles and their stage runs: the idempotency keys of the orchestrator.

A cycle is keyed by (deployment target, ISO week), so two triggers for the
same target and week are one cycle, and two targets (two products, each with
its own deployed policy) each run their own cycle of a week. A target names a
deployment (``deployments.name``; "default" unless a cycle says otherwise)
and must be usable in keys and folders (``target_problem``). A stage run is
keyed by (cycle, stage): a re-run after a crash finds
the stages that succeeded and skips them. An operator may cancel a running
(or failed) cycle (``cancel_cycle``) and re-run a failed or cancelled one
with corrected settings (``rerun_cycle``): each attempt is a
``CycleAttempt`` row. A week label must name a week that
exists (``week_problem``): an ISO year has 52 or 53 weeks.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store.actions import record_action
from store.aggregates import close_cycle
from store.errors import Conflict, InvalidInput, NotFound
from store.models import NAME_LEN, ComparisonTask, Cycle, CycleAttempt, StageRun, utcnow
from store.tasks import close_tasks, reopen_tasks
from store.versioning import get_row, list_rows


class CycleNotRunning(Conflict):
    """The cycle stopped running under a stage (an operator cancelled it): the stage registers nothing."""


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


DEFAULT_TARGET = "default"
"""the deployment target of a cycle that names none (``store.deployments.DEFAULT_TARGET``)"""


def target_problem(target: str) -> str | None:
    """Why ``target`` cannot name a cycle's deployment target, or None when it can.

    A target is a deployment name (1 to 200 characters, no NUL) that is also a segment of the cycle's step keys
    and artifact folders (``<week>@<target>:<stage>``, ``cycles/<target>/<week>/<stage>``), so it holds no
    ``/``, ``\\`` or ``:`` and is not ``.`` or ``..``.
    """
    if not target or len(target) > NAME_LEN:
        return f"{target!r} is not a deployment target: it must have 1 to {NAME_LEN} characters"
    bad = sorted(c for c in set(target) if c in "/\\:\x00")
    if bad or target in (".", ".."):
        shown = ", ".join(repr(c) for c in bad) if bad else repr(target)
        return f"{target!r} cannot name a cycle's deployment target (it is a segment of keys and folders): {shown}"
    return None


def check_target(target: str) -> str:
    """``target`` if it can name a cycle's deployment target, else ``InvalidInput`` (field ``target``) saying why."""
    problem = target_problem(target)
    if problem is not None:
        raise InvalidInput(f"target {problem}", [{"field": "target", "message": problem}])
    return target


def cycle_label(week: str, target: str = DEFAULT_TARGET) -> str:
    """How messages name a cycle: its week (``2026-W48``) for the default target, ``2026-W48@<target>`` otherwise."""
    return week if target == DEFAULT_TARGET else f"{week}@{target}"


def _label(cycle: Cycle) -> str:
    return cycle_label(cycle.week, cycle.deploy_target)


def find_cycle(session: Session, *, week: str, target: str = DEFAULT_TARGET) -> Cycle | None:
    """The cycle of (``target``, ``week``), or None when there is none."""
    return session.scalar(select(Cycle).where(Cycle.deploy_target == target, Cycle.week == week))


def open_cycle(
    session: Session, *, week: str, target: str = DEFAULT_TARGET, trigger: str = "manual",
    params: dict[str, Any] | None = None,
) -> tuple[Cycle, bool]:
    """The cycle of (``target``, ``week``), created if new; returns (cycle, created).

    ``InvalidInput`` for a week that does not exist (``check_week``) or a target that cannot name a cycle's
    (``check_target``).
    """
    check_week(week)
    check_target(target)
    existing = find_cycle(session, week=week, target=target)
    if existing is not None:
        return existing, False
    cycle = Cycle(week=week, deploy_target=target, trigger=trigger, params=params or {}, status="running")
    try:
        with session.begin_nested():
            session.add(cycle)
            session.flush()
            session.add(CycleAttempt(cycle_id=cycle.id, number=1, params=dict(cycle.params), actor=trigger))
    except IntegrityError:
        # A concurrent trigger opened the same (target, week) first: that one is the cycle.
        return find_cycle(session, week=week, target=target), False
    return cycle, True


def get_cycle(session: Session, cycle_id: int) -> Cycle:
    """The cycle ``cycle_id``."""
    return get_row(session, Cycle, cycle_id, label="cycle")


def list_cycles(session: Session, *, limit: int = 50, after_id: int | None = None,
                deploy_target: str | None = None) -> list[Cycle]:
    """Cycles in id order (keyset paging), of every target or of ``deploy_target``."""
    return list_rows(session, Cycle, limit=limit, after_id=after_id, deploy_target=deploy_target)


def running_cycle_ids(session: Session) -> list[int]:
    """The ids of the running cycles, newest first (one per target at most, unless a target runs two weeks)."""
    return list(session.scalars(select(Cycle.id).where(Cycle.status == "running").order_by(Cycle.id.desc())))


def finish_cycle(session: Session, *, cycle_id: int, status: str, reason: str | None = None) -> Cycle:
    """Mark a running cycle succeeded, failed or cancelled.

    A cycle that is done for good (succeeded or cancelled) closes its open
    comparison tasks in the same transaction, so no labeler is handed a stale
    one; a failed cycle's tasks stay open (a re-run resumes it) but are not
    leased while it is not running.
    """
    cycle = get_cycle(session, cycle_id)
    if cycle.status != "running":
        raise CycleNotRunning(f"cycle {_label(cycle)} is already {cycle.status}")
    cycle.status, cycle.reason, cycle.finished_at = status, reason, utcnow()
    if status in ("succeeded", "cancelled"):
        close_tasks(session, cycle_id=cycle_id)
    close_cycle(session, cycle_id=cycle_id)  # its numbers kept for the pages (store.aggregates)
    return cycle


def claim_cycle(session: Session, *, cycle_id: int, flow_run_id: str | None) -> Cycle:
    """Record the flow run that now runs a cycle; a failed cycle becomes running again.

    This is how a re-run resumes a cycle: after a crash (the cycle is still
    running) or a final failure (failed). A finished cycle (succeeded or
    cancelled) is never run again: ``Conflict``.
    """
    cycle = get_cycle(session, cycle_id)
    if cycle.status in ("succeeded", "cancelled"):
        raise Conflict(f"cycle {_label(cycle)} is already {cycle.status}")
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


# -- operators: cancel and re-run ---------------------------------------------------------------


STAGES_WITH_TASKS = {"sample": ("train", "gold"), "human_eval": ("eval",)}
"""the stages that hand tasks to people, and the kinds of task each makes"""


def lock_running(session: Session, cycle_id: int) -> Cycle:
    """The cycle, locked until the transaction ends, if it is running; else ``CycleNotRunning``.

    A stage's commit calls this before it registers anything, and ``cancel_cycle`` takes the same lock,
    so a stage either commits before the cancel or registers nothing after it.
    """
    cycle = session.scalar(select(Cycle).where(Cycle.id == cycle_id).with_for_update())
    if cycle is None:
        raise NotFound(f"cycle {cycle_id} does not exist")
    if cycle.status != "running":
        raise CycleNotRunning(f"cycle {_label(cycle)} is {cycle.status}{f' ({cycle.reason})' if cycle.reason else ''}")
    return cycle


def cancel_cycle(
    session: Session, *, cycle_id: int, actor: str, api_key_id: int | None = None, via: str = "api", reason: str = "",
) -> Cycle:
    """Cancel a running or failed cycle: marked cancelled with who and why, its open tasks closed, the stage
    that was running marked failed (its step stops at its next unit and registers nothing: the stage's commit
    finds the cycle cancelled). Finished stages and every registered version are kept. ``Conflict`` for a
    cycle that succeeded or was already cancelled."""
    cycle = session.scalar(select(Cycle).where(Cycle.id == cycle_id).with_for_update())
    if cycle is None:
        raise NotFound(f"cycle {cycle_id} does not exist")
    if cycle.status not in ("running", "failed"):
        raise Conflict(f"cycle {_label(cycle)} is already {cycle.status}: only a running or failed cycle can be cancelled")
    why = f"cancelled by {actor}" + (f": {reason}" if reason else "")
    was = cycle.status
    for run in cycle.stages:
        if run.status == "running":
            run.status, run.error, run.finished_at = "failed", why, utcnow()
    cycle.status, cycle.reason, cycle.finished_at = "cancelled", why, utcnow()
    closed = close_tasks(session, cycle_id=cycle_id)
    close_cycle(session, cycle_id=cycle_id)
    record_action(session, action="cancel", subject_kind="cycle", subject_id=cycle_id, actor=actor,
                  api_key_id=api_key_id, via=via,
                  detail={"was": was, "reason": reason, "tasks_closed": closed, "flow_run_id": cycle.flow_run_id})
    return cycle


def attempts_of(session: Session, cycle_id: int) -> list[CycleAttempt]:
    """A cycle's attempts, first to last."""
    query = select(CycleAttempt).where(CycleAttempt.cycle_id == cycle_id).order_by(CycleAttempt.number)
    return list(session.scalars(query))


def current_attempt(session: Session, cycle_id: int) -> CycleAttempt | None:
    """The cycle's newest attempt (None for a cycle made before attempts were recorded and never re-run)."""
    query = select(CycleAttempt).where(CycleAttempt.cycle_id == cycle_id).order_by(CycleAttempt.number.desc())
    return session.scalar(query.limit(1))


def check_rerun(cycle: Cycle, *, changed: list[str], rerun: list[str]) -> None:
    """``Conflict`` unless the cycle can be re-run so: it failed or was cancelled, and the re-run does not
    sample again after sample made its tasks (people hold them)."""
    if cycle.status not in ("failed", "cancelled"):
        hint = ": cancel it first" if cycle.status == "running" else ""
        raise Conflict(f"cycle {_label(cycle)} is {cycle.status}; only a failed or cancelled cycle can be re-run{hint}")
    sampled = any(run.stage == "sample" and run.status in ("succeeded", "skipped") for run in cycle.stages)
    if "sample" in rerun and sampled:
        raise Conflict(
            f"re-running cycle {_label(cycle)} with {', '.join(changed)} changed would sample again, but its comparison "
            "tasks are already with people; start a new week's cycle with these settings instead",
        )


def rerun_cycle(
    session: Session, *, cycle_id: int, params: dict[str, Any], settings: dict[str, Any] | None, changed: list[str],
    rerun: list[str], actor: str, api_key_id: int | None = None, via: str = "api", reason: str = "",
) -> CycleAttempt:
    """Record a re-run of a failed or cancelled cycle as its next attempt, and ready its stages for it.

    ``rerun`` names the stages to run again (the orchestrator's ``plan_rerun`` chose them from ``changed``,
    the settings that differ from the attempt before); every other finished stage is kept as it is. The
    stages run again have their outputs moved to the attempt's ``discarded`` (nothing registered is
    touched: their versions stay, and the new run registers new ones). ``settings`` (the new resolved
    settings) replace the kept open stage's; the cycle's params become ``params``.

    Tasks people hold are never thrown away under them: ``Conflict`` if the re-run would run ``sample``
    again after it made its tasks. The tasks a cancel closed are opened again when the stage that waits on
    them runs again with them; eval tasks of an earlier candidate stay closed, and the new candidate gets
    its own (``eval_task_floor``).
    """
    cycle = session.scalar(select(Cycle).where(Cycle.id == cycle_id).with_for_update())
    if cycle is None:
        raise NotFound(f"cycle {cycle_id} does not exist")
    check_rerun(cycle, changed=changed, rerun=rerun)
    runs = {run.stage: run for run in cycle.stages}
    done = {name for name, run in runs.items() if run.status in ("succeeded", "skipped")}
    previous = current_attempt(session, cycle_id)
    number = (previous.number if previous else 1) + 1
    discarded = {name: dict(runs[name].outputs) for name in rerun if name in done}
    if settings is not None and "open" in done and "open" not in rerun:
        discarded["open"] = {"settings": runs["open"].outputs.get("settings")}
        runs["open"].outputs = {**runs["open"].outputs, "settings": settings}
    for name in rerun:
        if name in runs and runs[name].status != "running":
            run = runs[name]
            run.status, run.error = "failed", f"to run again in attempt {number}" + (
                f" ({', '.join(changed)} changed)" if changed and name in discarded else "")
    floor = previous.eval_task_floor if previous else None
    if "human_eval" in rerun:
        if "evaluate" in rerun:  # a new candidate: the earlier one's eval tasks are done with
            close_tasks(session, cycle_id=cycle_id, kind="eval")
            floor = session.scalar(select(func.max(ComparisonTask.id)).where(
                ComparisonTask.cycle_id == cycle_id, ComparisonTask.kind == "eval")) or floor
        else:
            reopen_tasks(session, cycle_id=cycle_id, kinds=("eval",), after_id=floor)
    if "gather" in rerun and "sample" not in rerun:
        reopen_tasks(session, cycle_id=cycle_id, kinds=STAGES_WITH_TASKS["sample"])
    attempt = CycleAttempt(cycle_id=cycle_id, number=number, params=params, changed=changed,
                           kept=[name for name in runs if name in done and name not in rerun], rerun=rerun,
                           discarded=discarded, eval_task_floor=floor, actor=actor, reason=reason)
    session.add(attempt)
    cycle.params = params
    cycle.status, cycle.finished_at = "failed", None
    cycle.reason = f"to run again as attempt {number} ({actor})"
    record_action(session, action="rerun", subject_kind="cycle", subject_id=cycle_id, actor=actor,
                  api_key_id=api_key_id, via=via,
                  detail={"attempt": number, "changed": changed, "rerun": rerun, "kept": attempt.kept, "reason": reason})
    session.flush()
    return attempt
