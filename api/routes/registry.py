"""Read endpoints of the registry: datasets, preference models, policies."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api.deps import IdPath, DatabaseDep, Labeler, PagingDep, SessionDep
from api.errors import responses
from api.routes.feedback import EXPORT_RESPONSES, export_response
from api.schemas.common import LineagePublic, Page
from api.schemas.feedback import AgreementPublic, ExportFormat
from api.schemas.registry import DatasetDetail, DatasetPublic, PolicyPublic, PreferenceModelPublic
from store.datasets import get_dataset, list_datasets
from store.errors import InvalidInput
from store.feedback import rater_agreement
from store.lineage import lineage_back
from store.models import dataset_batches
from store.pms import get_pm, list_pms
from store.policies import get_policy, list_policies

router = APIRouter(prefix="/v1", tags=["registry"])

READ = responses(401, 403, 404, 422)


def _batch_ids(session, dataset_id: int) -> list[int]:
    return sorted(session.scalars(select(dataset_batches.c.batch_id).where(dataset_batches.c.dataset_id == dataset_id)))


@router.get("/datasets", response_model=Page[DatasetPublic], responses=responses(401, 403, 422))
def datasets(
    _: Labeler,
    session: SessionDep,
    paging: PagingDep,
    kind: Annotated[str | None, Query(pattern="^(prompts|samples|comparisons)$")] = None,
) -> Any:
    rows = list_datasets(session, kind=kind, limit=paging.limit, after_id=paging.after_id)
    return paging.page(rows, DatasetPublic.model_validate)


@router.get("/datasets/{dataset_id}", response_model=DatasetDetail, responses=READ)
def dataset(dataset_id: IdPath, _: Labeler, session: SessionDep) -> Any:
    row = get_dataset(session, dataset_id)
    batch_ids = _batch_ids(session, row.id)
    agreement = None
    if row.kind == "comparisons":
        # stored with the snapshot; computed here only for snapshots made before it was stored
        agreement = AgreementPublic(**(row.meta.get("agreement") or rater_agreement(session, batch_ids)))
    return DatasetDetail(**DatasetPublic.model_validate(row).model_dump(), batch_ids=batch_ids, agreement=agreement)


@router.get("/datasets/{dataset_id}/export", response_class=StreamingResponse, responses=EXPORT_RESPONSES)
def export_dataset(
    dataset_id: IdPath,
    _: Labeler,
    database: DatabaseDep,
    format: Annotated[ExportFormat, Query()] = "hh-rlhf",
) -> StreamingResponse:
    """A comparison snapshot as hh-rlhf or trl JSONL."""
    with database.session() as session:
        row = get_dataset(session, dataset_id)
        if row.kind != "comparisons":
            raise InvalidInput(
                f"dataset {dataset_id} is a {row.kind} dataset; only comparison snapshots export as preference pairs",
                [{"field": "dataset_id", "message": f"dataset {dataset_id} holds {row.kind}"}],
            )
        batch_ids = _batch_ids(session, row.id)
    return export_response(database, batch_ids, format, f"dataset-{row.name}-v{row.version}.{format}.jsonl")


@router.get("/preference-models", response_model=Page[PreferenceModelPublic], responses=responses(401, 403, 422))
def preference_models(_: Labeler, session: SessionDep, paging: PagingDep) -> Any:
    rows = list_pms(session, limit=paging.limit, after_id=paging.after_id)
    return paging.page(rows, PreferenceModelPublic.model_validate)


@router.get("/preference-models/{pm_id}", response_model=PreferenceModelPublic, responses=READ)
def preference_model(pm_id: IdPath, _: Labeler, session: SessionDep) -> Any:
    return get_pm(session, pm_id)


@router.get("/preference-models/{pm_id}/lineage", response_model=LineagePublic, responses=READ)
def preference_model_lineage(pm_id: IdPath, _: Labeler, session: SessionDep) -> Any:
    return LineagePublic.of(lineage_back(session, kind="pm", id=pm_id), "back")


@router.get("/policies", response_model=Page[PolicyPublic], responses=responses(401, 403, 422))
def policies(_: Labeler, session: SessionDep, paging: PagingDep) -> Any:
    rows = list_policies(session, limit=paging.limit, after_id=paging.after_id)
    return paging.page(rows, PolicyPublic.model_validate)


@router.get("/policies/{policy_id}", response_model=PolicyPublic, responses=READ)
def policy(policy_id: IdPath, _: Labeler, session: SessionDep) -> Any:
    return get_policy(session, policy_id)


@router.get("/policies/{policy_id}/lineage", response_model=LineagePublic, responses=READ)
def policy_lineage(policy_id: IdPath, _: Labeler, session: SessionDep) -> Any:
    """Everything the policy came from: init and reference policies, its PM, the PM's
    dataset and the feedback batches in it."""
    return LineagePublic.of(lineage_back(session, kind="policy", id=policy_id), "back")
