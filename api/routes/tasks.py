"""Comparison tasks: pairs of responses leased to raters, renewed, released (skipped) and answered."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query

from api.deps import IdPath, Labeler, QCPolicyDep, SessionDep, SettingsDep
from api.errors import responses
from api.schemas.feedback import ComparisonTaskList, ComparisonTaskPublic, Name, TaskLeasePublic
from store.cycles import running_cycle_ids
from store.tasks import Leased, lease_tasks, live_leases, release_lease, renew_lease

router = APIRouter(prefix="/v1/comparison-tasks", tags=["feedback"])

RaterQuery = Annotated[Name | None, Query(description="the rater the tasks are for (default: the key's name); "
                                                      "a vendor's key leases for each of its raters by id")]


def task_public(leased: Leased) -> ComparisonTaskPublic:
    """A leased task as a rater sees it: no kind, no candidate side, no known answer, no metadata (which
    policies wrote the responses): a blind comparison, and a gold task like any other."""
    # The end of the lease is the rater's (a TaskLease row), not the task's: given beside the task's fields.
    task = leased.task
    return ComparisonTaskPublic(
        id=task.id, cycle_id=task.cycle_id, prompt_id=task.prompt_id, prompt=task.prompt,
        response_a=task.response_a, response_b=task.response_b, leased_until=leased.leased_until,
    )


@router.get("", response_model=ComparisonTaskList, responses=responses(401, 403, 409, 422))
def fetch_tasks(
    key: Labeler,
    session: SessionDep,
    settings: SettingsDep,
    qc: QCPolicyDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
    cycle_id: Annotated[int | None, Query(ge=1, le=2**31 - 1, description="default: the running cycles")] = None,
    rater_id: RaterQuery = None,
) -> Any:
    """Lease up to ``limit`` tasks to a rater, eval tasks first.

    Tasks come from the running cycles (one per deployment target may run;
    or from ``cycle_id``); when no cycle is running, from open tasks that
    belong to no cycle. A finished cycle's
    tasks are closed and a failed one's wait for its re-run: no rater is
    handed a stale task. A task is held by as many raters as it needs answers
    (one; several for an overlap task), each until its lease runs out; only
    the holder of a live lease, under this key, may answer it (in a feedback
    batch, by ``task_id``, as ``rater_id``). A share of the tasks are gold
    (known-answer) tasks for quality control. No task shows what it is: an
    eval task's candidate side and a gold task's answer stay on the server.
    A rater that takes tasks under one key cannot take any under another (409).
    A rater quality control leaves out (or an operator excludes) is handed
    none (403, saying why) until an operator includes it again.
    """
    # Without a cycle_id: the running cycles' tasks (one cycle per deployment target may run), else those of no cycle.
    running = running_cycle_ids(session) if cycle_id is None else None
    rater = rater_id or key.name
    rows = lease_tasks(
        session, rater_id=rater, api_key_id=key.id, limit=limit, lease=timedelta(seconds=settings.task_lease_s),
        cycle_id=cycle_id, cycle_ids=running or None, gold_share=qc.gold_share, qc=qc,
    )
    return ComparisonTaskList(data=[task_public(r) for r in rows], count=len(rows), lease_s=settings.task_lease_s,
                              rater_id=rater)


@router.get("/leased", response_model=ComparisonTaskList, responses=responses(401, 403, 422))
def held_tasks(key: Labeler, session: SessionDep, settings: SettingsDep, rater_id: RaterQuery = None) -> Any:
    """The tasks a rater holds under this key and has not answered (live leases, oldest first); leases nothing."""
    rater = rater_id or key.name
    rows = live_leases(session, rater_id=rater, api_key_id=key.id)
    return ComparisonTaskList(data=[task_public(r) for r in rows], count=len(rows), lease_s=settings.task_lease_s,
                              rater_id=rater)


@router.post("/{task_id}/renew", response_model=TaskLeasePublic, responses=responses(401, 403, 404, 409, 422))
def renew(task_id: IdPath, key: Labeler, session: SessionDep, settings: SettingsDep, rater_id: RaterQuery = None) -> Any:
    """Hold the task ``lease_s`` more seconds from now; 409 unless the rater holds a live lease on it."""
    rater = rater_id or key.name
    row = renew_lease(session, task_id=task_id, rater_id=rater, api_key_id=key.id,
                      lease=timedelta(seconds=settings.task_lease_s))
    return TaskLeasePublic(task_id=task_id, rater_id=rater, leased_until=row.leased_until, released=False)


@router.post("/{task_id}/release", response_model=TaskLeasePublic, responses=responses(401, 403, 404, 409, 422))
def release(task_id: IdPath, key: Labeler, session: SessionDep, rater_id: RaterQuery = None) -> Any:
    """Give the task back unanswered (a skip): another rater may take it at once; this one is not handed it
    again. 409 unless the rater holds a live lease on it."""
    rater = rater_id or key.name
    row = release_lease(session, task_id=task_id, rater_id=rater, api_key_id=key.id)
    return TaskLeasePublic(task_id=task_id, rater_id=rater, leased_until=row.leased_until, released=True)
