"""Feedback batches: register (JSON), list, read, lineage, export."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from api.batches import parse_batch, parse_batch_streaming
from api.deps import DatabaseDep, IdempotencyKey, IdPath, Labeler, PagingDep, SessionDep, SettingsDep
from api.errors import PayloadTooLarge, raw_body, responses
from api.exports import EXPORT_RESPONSES, export_response
from api.formats import FormatName
from api.schemas.common import LineagePublic, Page
from api.schemas.feedback import AgreementPublic, FeedbackBatchDetail, FeedbackBatchPublic
from store.db import Database
from store.errors import InvalidInput
from store.exports import batch_export
from store.feedback import (
    IdempotentReplay,
    create_feedback_batch,
    find_replay,
    get_feedback_batch,
    list_feedback_batches,
    rater_agreement,
)
from store.feedback_async import AsyncFeedbackWriter
from store.imports import replay_winner
from store.lineage import lineage_forward

router = APIRouter(prefix="/v1/feedback-batches", tags=["feedback"])


@dataclass(frozen=True)
class JsonBody:
    """A request body read whole, with its sha256 (hashed as it arrived)."""

    data: bytes
    sha256: str


async def read_json_body(request: Request, settings: SettingsDep) -> JsonBody:
    """The request body, refused with 413 as soon as it passes the byte limit.

    It is hashed chunk by chunk while the rest is still arriving, so a large
    body costs no separate hashing pass afterwards."""
    limit = settings.max_request_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size, hasher = [], 0, hashlib.sha256()
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        hasher.update(chunk)
        chunks.append(chunk)
    return JsonBody(b"".join(chunks), hasher.hexdigest())


@router.post(
    "",
    status_code=201,
    response_model=FeedbackBatchPublic,
    summary="Register a feedback batch (all or nothing)",
    responses={
        200: {"model": FeedbackBatchPublic, "description": "A replay: the batch first registered under this Idempotency-Key"},
        **responses(401, 403, 409, 413, 422, 503),
    },
    openapi_extra=raw_body({"application/json": {"schema": {"$ref": "#/components/schemas/FeedbackBatchCreate"}}}),
)
async def create_batch(
    request: Request,
    key: Labeler,
    database: DatabaseDep,
    settings: SettingsDep,
    response: Response,
    body: Annotated[JsonBody, Depends(read_json_body)],
    idempotency_key: IdempotencyKey = None,
) -> Any:
    # Small batches on PostgreSQL: parsed here and written in one statement
    # from the event loop (no thread hop, one round trip). Larger ones, and
    # those that answer tasks (the lease rules lock the tasks and check each
    # answer): parsed and written through COPY in one thread-pool call.
    inline: AsyncFeedbackWriter | None = request.app.state.inline_writer
    written = None
    if inline is not None and len(body.data) <= settings.inline_batch_bytes:
        written = await _register_inline(inline, settings, body, api_key_id=key.id, idempotency_key=idempotency_key)
    if written is not None:
        batch, created = written
    else:
        batch, created = await run_in_threadpool(
            _register, database, settings, body, api_key_id=key.id, idempotency_key=idempotency_key
        )
    if not created:
        response.status_code = 200
    return batch


async def _register_inline(
    writer: AsyncFeedbackWriter, settings, body: JsonBody, *, api_key_id: int, idempotency_key: str | None
) -> tuple[FeedbackBatchPublic, bool] | None:
    """Register a small batch from the event loop; None when it answers tasks (the caller takes the other path)."""
    request_sha256 = body.sha256
    try:
        batch = parse_batch(body.data, max_records=settings.max_batch_records)
    except (InvalidInput, PayloadTooLarge):
        # As on the COPY path: a key already used for another request is 409 first.
        if idempotency_key is not None:
            await writer.find_replay(idempotency_key, request_sha256)
        raise
    if any(c.task_id is not None for c in batch.comparisons):
        return None
    row, created = await writer.register(
        source=batch.source,
        comparisons=batch.comparisons,
        idempotency_key=idempotency_key,
        request_sha256=request_sha256,
        api_key_id=api_key_id,
        metadata=batch.metadata,
    )
    return FeedbackBatchPublic.model_validate(row), created


def _register(
    database: Database, settings, body: JsonBody, *, api_key_id: int, idempotency_key: str | None
) -> tuple[FeedbackBatchPublic, bool]:
    request_sha256 = body.sha256
    try:
        with database.session() as session:
            if idempotency_key is not None:
                first = find_replay(session, idempotency_key=idempotency_key, request_sha256=request_sha256)
                if first is not None:
                    return FeedbackBatchPublic.model_validate(first), False
            # Records are validated chunk by chunk as the COPY reads them, so
            # PostgreSQL ingests one chunk while Python validates the next.
            batch, records = parse_batch_streaming(body.data, max_records=settings.max_batch_records)
            row, created = create_feedback_batch(
                session,
                source=batch.source,
                comparisons=records,
                task_ids=records.task_ids(),
                idempotency_key=idempotency_key,
                request_sha256=request_sha256,
                api_key_id=api_key_id,
                metadata=batch.metadata,
                prevalidated=True,
            )
            return FeedbackBatchPublic.model_validate(row), created
    except IdempotentReplay as lost:  # a concurrent request with this key committed first
        return FeedbackBatchPublic.model_validate(replay_winner(database, lost)), False


@router.get("", response_model=Page[FeedbackBatchPublic], responses=responses(401, 403, 422))
def list_batches(_: Labeler, session: SessionDep, paging: PagingDep) -> Any:
    rows = list_feedback_batches(session, limit=paging.limit, after_id=paging.after_id)
    return paging.page(rows, FeedbackBatchPublic.model_validate)


@router.get("/{batch_id}", response_model=FeedbackBatchDetail, responses=responses(401, 403, 404, 422))
def read_batch(batch_id: IdPath, _: Labeler, session: SessionDep) -> Any:
    batch = get_feedback_batch(session, batch_id)
    return FeedbackBatchDetail(
        **FeedbackBatchPublic.model_validate(batch).model_dump(),
        agreement=AgreementPublic(**rater_agreement(session, [batch.id])),
    )


@router.get("/{batch_id}/lineage", response_model=LineagePublic, responses=responses(401, 403, 404, 422))
def batch_lineage(batch_id: IdPath, _: Labeler, session: SessionDep) -> Any:
    """Everything trained on this batch: snapshots, PMs, policies."""
    return LineagePublic.of(lineage_forward(session, kind="feedback_batch", id=batch_id), "forward")


@router.get("/{batch_id}/export", response_class=StreamingResponse, responses=EXPORT_RESPONSES)
def export_batch(
    batch_id: IdPath,
    _: Labeler,
    session: SessionDep,
    database: DatabaseDep,
    format: Annotated[FormatName, Query()] = "hh-rlhf",
) -> StreamingResponse:
    export = batch_export(session, batch_id=batch_id)
    return export_response(database, export, format, f"feedback-batch-{batch_id}.{format}.jsonl")
