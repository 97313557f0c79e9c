"""Cycles: the weekly runs operators watch and start."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from api import actions
from api.deps import IdPath, Labeler, Operator, PagingDep, SessionDep
from api.errors import responses
from api.schemas.common import NO_NUL, Page
from api.schemas.registry import (
    CycleCancel,
    CycleCancelled,
    CycleCreate,
    CycleDetail,
    CyclePublic,
    CycleRerun,
    CycleRerunPlan,
    CycleStarted,
)
from store.cycles import get_cycle, iso_week, list_cycles

router = APIRouter(prefix="/v1/cycles", tags=["operations"])


@router.get("", response_model=Page[CyclePublic], responses=responses(401, 403, 422))
def cycles(
    _: Labeler, session: SessionDep, paging: PagingDep,
    target: Annotated[str | None, Query(min_length=1, max_length=200, pattern=NO_NUL,
                                        description="only the cycles of this deployment target")] = None,
) -> Any:
    """Cycles in id order, of every deployment target or of ``target``."""
    rows = list_cycles(session, limit=paging.limit, after_id=paging.after_id, deploy_target=target)
    return paging.page(rows, CyclePublic.model_validate)


@router.get("/{cycle_id}", response_model=CycleDetail, responses=responses(401, 403, 404, 422))
def cycle(cycle_id: IdPath, _: Labeler, session: SessionDep) -> Any:
    return get_cycle(session, cycle_id)


@router.post(
    "",
    status_code=202,
    response_model=CycleStarted,
    responses={200: {"model": CycleStarted, "description": "The week's cycle already exists"}, **responses(401, 403, 422, 503)},
)
def start_cycle(body: CycleCreate, key: Operator, request: Request, response: Response) -> Any:
    """Start the cycle of a week now (default: this week) for a deployment target (default: params.deploy_target,
    else the server's); a target has one cycle a week, and two targets run theirs side by side."""
    started = actions.start(request.app, key, week=body.week or iso_week(datetime.now(UTC)), params=body.params,
                            target=body.target)
    if not started.created:
        response.status_code = 200
    return started


@router.post("/{cycle_id}/cancel", response_model=CycleCancelled, responses=responses(401, 403, 404, 409, 422, 503))
def cancel_cycle(cycle_id: IdPath, key: Operator, request: Request, body: CycleCancel | None = None) -> Any:
    """Cancel a running (or failed) cycle. The store marks it cancelled with the key and reason, closes its
    open tasks and keeps every finished stage and version; then Prefect is told to cancel its flow run and
    the step runs of its week and target (``prefect`` in the answer says what it did; another target's cycle
    of the week runs on). The step the cycle waits on stops at its next unit of work and registers nothing.
    409 for a cycle that succeeded or was cancelled already."""
    body = body or CycleCancel()
    return actions.cancel(request.app, key, cycle_id=cycle_id, reason=body.reason, via="api")


@router.post("/{cycle_id}/rerun", status_code=202, response_model=CycleRerunPlan,
             responses=responses(401, 403, 404, 409, 422, 503))
def rerun_cycle(cycle_id: IdPath, body: CycleRerun, key: Operator, request: Request) -> Any:
    """Re-run a failed or cancelled cycle with corrected settings, as a new attempt beside the old ones.

    ``params`` are merged over the cycle's and checked as a trigger's are (422 naming the field). Stages
    whose inputs did not change are kept (``kept``); the first whose settings changed or that did not
    finish, and every one after it, run again (``rerun``, each with ``why``). Nothing registered is
    duplicated or changed: a stage run again registers new versions. 409 for a running or succeeded cycle,
    or one whose change would sample again after its tasks went to people."""
    return actions.rerun(request.app, key, cycle_id=cycle_id, params=body.params, reason=body.reason, via="api")
