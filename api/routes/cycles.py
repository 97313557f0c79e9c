"""Cycles: the weekly runs operators watch and start."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response

from api.deps import IdPath, Labeler, Operator, PagingDep, SessionDep
from api.errors import responses
from api.schemas.common import Page
from api.schemas.registry import CycleCreate, CycleDetail, CyclePublic, CycleStarted
from store.cycles import get_cycle, iso_week, list_cycles

router = APIRouter(prefix="/v1/cycles", tags=["operations"])


@router.get("", response_model=Page[CyclePublic], responses=responses(401, 403, 422))
def cycles(_: Labeler, session: SessionDep, paging: PagingDep) -> Any:
    rows = list_cycles(session, limit=paging.limit, after_id=paging.after_id)
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
