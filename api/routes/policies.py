"""Policies: the registry's trained policies and where each came from."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import IdPath, Labeler, PagingDep, SessionDep
from api.errors import responses
from api.schemas.common import LineagePublic, Page
from api.schemas.registry import PolicyPublic
from store.lineage import lineage_back
from store.policies import get_policy, list_policies

router = APIRouter(prefix="/v1/policies", tags=["registry"])


@router.get("", response_model=Page[PolicyPublic], responses=responses(401, 403, 422))
def policies(_: Labeler, session: SessionDep, paging: PagingDep) -> Any:
    rows = list_policies(session, limit=paging.limit, after_id=paging.after_id)
    return paging.page(rows, PolicyPublic.model_validate)


@router.get("/{policy_id}", response_model=PolicyPublic, responses=responses(401, 403, 404, 422))
def policy(policy_id: IdPath, _: Labeler, session: SessionDep) -> Any:
    return get_policy(session, policy_id)


@router.get("/{policy_id}/lineage", response_model=LineagePublic, responses=responses(401, 403, 404, 422))
def policy_lineage(policy_id: IdPath, _: Labeler, session: SessionDep) -> Any:
    """Everything the policy came from: init and reference policies, its PM, the PM's
    dataset and the feedback batches in it."""
    return LineagePublic.of(lineage_back(session, kind="policy", id=policy_id), "back")
