"""Datasets: prompt sets, sample sets and comparison snapshots; a snapshot exports as JSONL."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from api.deps import DatabaseDep, IdPath, Labeler, PagingDep, SessionDep
from api.errors import responses
from api.exports import EXPORT_RESPONSES, export_response
from api.formats import FormatName
from api.schemas.common import Page
from api.schemas.feedback import AgreementPublic
from api.schemas.registry import DatasetDetail, DatasetPublic
from store.datasets import dataset_batch_ids, get_dataset, list_datasets
from store.exports import dataset_export
from store.feedback import rater_agreement

router = APIRouter(prefix="/v1/datasets", tags=["registry"])


@router.get("", response_model=Page[DatasetPublic], responses=responses(401, 403, 422))
def datasets(
    _: Labeler,
    session: SessionDep,
    paging: PagingDep,
    kind: Annotated[str | None, Query(pattern="^(prompts|samples|comparisons)$")] = None,
) -> Any:
    rows = list_datasets(session, kind=kind, limit=paging.limit, after_id=paging.after_id)
    return paging.page(rows, DatasetPublic.model_validate)


@router.get("/{dataset_id}", response_model=DatasetDetail, responses=responses(401, 403, 404, 422))
def dataset(dataset_id: IdPath, _: Labeler, session: SessionDep) -> Any:
    row = get_dataset(session, dataset_id)
    batch_ids = dataset_batch_ids(session, dataset_id=row.id)
    agreement = None
    if row.kind == "comparisons":
        # stored with the snapshot; computed here only for snapshots made before it was stored
        agreement = AgreementPublic(**(row.meta.get("agreement") or rater_agreement(session, batch_ids)))
    return DatasetDetail(**DatasetPublic.model_validate(row).model_dump(), batch_ids=batch_ids, agreement=agreement)


@router.get("/{dataset_id}/export", response_class=StreamingResponse, responses=EXPORT_RESPONSES)
def export_dataset(
    dataset_id: IdPath,
    _: Labeler,
    session: SessionDep,
    database: DatabaseDep,
    format: Annotated[FormatName, Query()] = "hh-rlhf",
) -> StreamingResponse:
    """A comparison snapshot as hh-rlhf, trl or trl-conversational JSONL."""
    row, export = dataset_export(session, dataset_id=dataset_id)
    return export_response(database, export, format, f"dataset-{row.name}-v{row.version}.{format}.jsonl")
