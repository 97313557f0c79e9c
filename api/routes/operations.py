"""Deployments and cycles: what operators watch, trigger and roll back."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response

from api.deps import IdPath, Labeler, Operator, PagingDep, SessionDep
from api.errors import responses
from api.schemas.common import NO_NUL, Page
from api.schemas.registry import (
    CycleCreate,
    CycleDetail,
    CyclePublic,
    CycleStarted,
    DeploymentPublic,
    RollbackCreate,
)
from store.cycles import get_cycle, iso_week, list_cycles
from store.deployments import DEFAULT_TARGET, active_deployment, list_deployments, rollback

router = APIRouter(prefix="/v1", tags=["operations"])


@router.get("/deployments", response_model=Page[DeploymentPublic], responses=responses(401, 403, 422))
def deployments(
    _: Labeler,
    session: SessionDep,
    paging: PagingDep,
    name: Annotated[str | None, Query(min_length=1, max_length=200, pattern=NO_NUL, description="one deployment target")] = None,
) -> Any:
    rows = list_deployments(session, name=name, limit=paging.limit, after_id=paging.after_id)
    return paging.page(rows, DeploymentPublic.model_validate)


@router.get("/deployments/active", response_model=DeploymentPublic, responses=responses(401, 403, 404, 422))
def active(
    _: Labeler, session: SessionDep, name: Annotated[str, Query(min_length=1, max_length=200, pattern=NO_NUL)] = DEFAULT_TARGET
) -> Any:
    row = active_deployment(session, name=name)
    if row is None:
        raise HTTPException(404, f"deployment target {name!r} has never been deployed")
    return row


@router.post(
    "/deployments/rollback",
    status_code=201,
    response_model=DeploymentPublic,
    responses=responses(401, 403, 404, 409, 422),
)
def roll_back(body: RollbackCreate, key: Operator, session: SessionDep, request: Request) -> Any:
    """Restore the deployment that was active before the current one."""
    row = rollback(session, name=body.name, reason=body.reason, actor=key.name)
    hook = getattr(request.app.state, "on_deploy", None)
    if hook is not None:
        hook(row)
    return row


@router.get("/cycles", response_model=Page[CyclePublic], responses=responses(401, 403, 422))
def cycles(_: Labeler, session: SessionDep, paging: PagingDep) -> Any:
    rows = list_cycles(session, limit=paging.limit, after_id=paging.after_id)
    return paging.page(rows, CyclePublic.model_validate)


@router.get("/cycles/{cycle_id}", response_model=CycleDetail, responses=responses(401, 403, 404, 422))
def cycle(cycle_id: IdPath, _: Labeler, session: SessionDep) -> Any:
    return get_cycle(session, cycle_id)


@router.post(
    "/cycles",
    status_code=202,
    response_model=CycleStarted,
    responses={200: {"model": CycleStarted, "description": "The week's cycle already exists"}, **responses(401, 403, 422, 503)},
)
def start_cycle(body: CycleCreate, key: Operator, request: Request, response: Response) -> Any:
    """Start the cycle of a week now (default: this week); a week has one cycle."""
    launcher = getattr(request.app.state, "cycle_launcher", None)
    if launcher is None:
        raise HTTPException(
            503,
            "no orchestrator is configured for this API server (RATCHET_CYCLE_LAUNCHER=off), so it cannot start "
            "cycles: serve it with RATCHET_CYCLE_LAUNCHER=deployment and PREFECT_API_URL set (or =thread on one "
            "machine), or start the week's cycle with `ratchet cycle run --week W`",
        )
    week = body.week or iso_week(datetime.now(UTC))
    started = launcher(week=week, params=body.params, actor=key.name)
    if not started.created:
        response.status_code = 200
    return started
