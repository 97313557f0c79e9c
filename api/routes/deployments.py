"""Deployments: what each target serves, its history, and rollbacks."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, HTTPException, Query, Request

from api import actions
from api.deps import Labeler, Operator, PagingDep, SessionDep
from api.errors import responses
from api.schemas.common import NO_NUL, Page
from api.schemas.registry import DeploymentPublic, RollbackCreate
from store.deployments import DEFAULT_TARGET, active_deployment, list_deployments

router = APIRouter(prefix="/v1/deployments", tags=["operations"])


@router.get("", response_model=Page[DeploymentPublic], responses=responses(401, 403, 422))
def deployments(
    _: Labeler,
    session: SessionDep,
    paging: PagingDep,
    name: Annotated[str | None, Query(min_length=1, max_length=200, pattern=NO_NUL, description="one deployment target")] = None,
) -> Any:
    rows = list_deployments(session, name=name, limit=paging.limit, after_id=paging.after_id)
    return paging.page(rows, DeploymentPublic.model_validate)


@router.get("/active", response_model=DeploymentPublic, responses=responses(401, 403, 404, 422))
def active(
    _: Labeler, session: SessionDep, name: Annotated[str, Query(min_length=1, max_length=200, pattern=NO_NUL)] = DEFAULT_TARGET
) -> Any:
    row = active_deployment(session, name=name)
    if row is None:
        raise HTTPException(404, f"deployment target {name!r} has never been deployed")
    return row


@router.post(
    "/rollback",
    status_code=201,
    response_model=DeploymentPublic,
    responses=responses(401, 403, 404, 409, 422),
)
def roll_back(
    body: RollbackCreate, key: Operator, session: SessionDep, request: Request, background: BackgroundTasks
) -> Any:
    """Restore the deployment that was active before the current one (``api.actions.roll_back``: recorded with
    the key, the deploy hook told, the alert sent after the answer)."""
    return actions.roll_back(request.app, key, session, background, target=body.name, reason=body.reason, via="api")
