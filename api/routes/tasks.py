"""Comparison tasks: pairs of responses handed to labelers under a lease."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query

from api.deps import Labeler, SessionDep, SettingsDep
from api.errors import responses
from api.schemas.feedback import ComparisonTaskList, ComparisonTaskPublic
from store.cycles import running_cycle_id
from store.tasks import lease_tasks

router = APIRouter(prefix="/v1/comparison-tasks", tags=["feedback"])


@router.get("", response_model=ComparisonTaskList, responses=responses(401, 403, 422))
def fetch_tasks(
    key: Labeler,
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
    cycle_id: Annotated[int | None, Query(ge=1, le=2**31 - 1, description="default: the running cycle")] = None,
) -> Any:
    """Lease up to ``limit`` open tasks to the caller, eval tasks first.

    Tasks come from the running cycle (or ``cycle_id``); when no cycle is
    running, from open tasks that belong to no cycle. A finished cycle's
    tasks are closed and a failed one's wait for its re-run: no labeler is
    handed a stale task. A leased task goes to no one else until its lease
    runs out; a task answered in a feedback batch (by ``task_id``) is done.
    An eval task (the blinded A/B evaluation of a candidate) looks like any
    other: which response is the candidate's is never shown.
    """
    if cycle_id is None:
        cycle_id = running_cycle_id(session)
    rows = lease_tasks(
        session, labeler=key.name, limit=limit, lease=timedelta(seconds=settings.task_lease_s), cycle_id=cycle_id
    )
    return ComparisonTaskList(
        data=[ComparisonTaskPublic.model_validate(r) for r in rows], count=len(rows), lease_s=settings.task_lease_s
    )
