"""Preference models: the registry's reward models and where each came from."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import IdPath, Labeler, PagingDep, SessionDep
from api.errors import responses
from api.schemas.common import LineagePublic, Page
from api.schemas.registry import PreferenceModelPublic
from store.lineage import lineage_back
from store.pms import get_pm, list_pms

router = APIRouter(prefix="/v1/preference-models", tags=["registry"])


@router.get("", response_model=Page[PreferenceModelPublic], responses=responses(401, 403, 422))
def preference_models(_: Labeler, session: SessionDep, paging: PagingDep) -> Any:
    rows = list_pms(session, limit=paging.limit, after_id=paging.after_id)
    return paging.page(rows, PreferenceModelPublic.model_validate)


@router.get("/{pm_id}", response_model=PreferenceModelPublic, responses=responses(401, 403, 404, 422))
def preference_model(pm_id: IdPath, _: Labeler, session: SessionDep) -> Any:
    return get_pm(session, pm_id)


@router.get("/{pm_id}/lineage", response_model=LineagePublic, responses=responses(401, 403, 404, 422))
def preference_model_lineage(pm_id: IdPath, _: Labeler, session: SessionDep) -> Any:
    return LineagePublic.of(lineage_back(session, kind="pm", id=pm_id), "back")
