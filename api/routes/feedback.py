"""Feedback batches: register (JSON), import (JSONL), list, read, export."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select

from api.batches import parse_batch, parse_batch_streaming
from api.deps import IdPath, DatabaseDep, Labeler, PagingDep, SessionDep, SettingsDep
from api.errors import PayloadTooLarge, RequestTimedOut, TooManyRequests, responses
from api.formats import DecodedTooLarge, FormatError, JsonlImportParser, export_record
from api.schemas.common import NO_NUL, LineagePublic, Page
from api.schemas.feedback import (
    AgreementPublic,
    ExportFormat,
    FeedbackBatchDetail,
    FeedbackBatchPublic,
    ImportResult,
    SkippedLine,
)
from api.schemas.feedback import MAX_TEXT_CHARS
from store.db import Database
from store.errors import InvalidInput, ServiceUnavailable
from store.feedback import (
    BatchWriter,
    NewComparison,
    comparison_problems,
    create_feedback_batch,
    find_replay,
    get_feedback_batch,
    list_feedback_batches,
    rater_agreement,
)
from store.feedback_async import AsyncFeedbackWriter
from store.lineage import lineage_forward
from store.models import Comparison

router = APIRouter(prefix="/v1/feedback-batches", tags=["feedback"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        pattern=NO_NUL,
        description="Retry-safe key: a replay returns the first answer; the same key with another body is 409",
    ),
]
IMPORT_CHUNK_RECORDS = 2_000
MAX_SKIPPED_REPORTED = 1_000


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
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/FeedbackBatchCreate"}}},
        }
    },
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
    # from the event loop (no thread hop, one round trip). Larger ones: parsed
    # and written through COPY in one thread-pool call.
    inline: AsyncFeedbackWriter | None = request.app.state.inline_writer
    if inline is not None and len(body.data) <= settings.inline_batch_bytes:
        batch, created = await _register_inline(inline, settings, body, api_key_id=key.id, idempotency_key=idempotency_key)
    else:
        batch, created = await run_in_threadpool(
            _register, database, settings, body, api_key_id=key.id, idempotency_key=idempotency_key
        )
    if not created:
        response.status_code = 200
    return batch


async def _register_inline(
    writer: AsyncFeedbackWriter, settings, body: JsonBody, *, api_key_id: int, idempotency_key: str | None
) -> tuple[FeedbackBatchPublic, bool]:
    request_sha256 = body.sha256
    try:
        batch = parse_batch(body.data, max_records=settings.max_batch_records)
    except (InvalidInput, PayloadTooLarge):
        # As on the COPY path: a key already used for another request is 409 first.
        if idempotency_key is not None:
            await writer.find_replay(idempotency_key, request_sha256)
        raise
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


class ImportSlots:
    """How many imports this process, and each API key, is streaming now.

    An import holds a database connection and a transaction for as long as
    its body takes to arrive, so both are bounded: a key over its share is
    answered 429 (the caller is the one to slow down: its own imports are in
    the way), a process at its total 503 (the server is busy, whoever asks);
    both with Retry-After. Counted on the event loop, so no lock is needed.
    """

    def __init__(self, *, total: int, per_key: int):
        self.total = total
        self.per_key = per_key
        self._by_key: Counter[int] = Counter()

    def running(self, key_id: int | None = None) -> int:
        """Imports running now: of ``key_id``, or of every key."""
        return sum(self._by_key.values()) if key_id is None else self._by_key[key_id]

    @contextmanager
    def hold(self, key_id: int) -> Iterator[None]:
        """Count an import of ``key_id`` while the block runs; 429 or 503 over the limits."""
        if self._by_key[key_id] >= self.per_key:
            raise TooManyRequests(
                f"this API key already runs {self._by_key[key_id]} import(s), its limit (RATCHET_MAX_IMPORTS_PER_KEY);"
                " retry when one has finished"
            )
        if self.running() >= self.total:
            raise ServiceUnavailable(
                f"the server already runs {self.total} imports, its limit (RATCHET_MAX_IMPORTS); retry later"
            )
        self._by_key[key_id] += 1
        try:
            yield
        finally:
            self._by_key[key_id] -= 1
            if not self._by_key[key_id]:
                del self._by_key[key_id]


def import_slots(request: Request) -> ImportSlots:
    """The app's ``ImportSlots``, made from its settings on first use."""
    state = request.app.state
    if getattr(state, "import_slots", None) is None:
        settings = state.settings
        state.import_slots = ImportSlots(total=settings.max_imports, per_key=settings.max_imports_per_key)
    return state.import_slots


class _ImportJob:
    """One streamed import: a transaction held open while the body arrives.

    Parsed lines are written in chunks; the batch row comes last. Any error,
    a dropped connection or a killed server rolls the whole import back.
    Every method runs in a worker thread; ``abort`` answers with the store
    error the session scope made of a database error.
    """

    def __init__(
        self, database: Database, *, source: str, rater_id: str, api_key_id: int, fmt: str, max_records: int
    ):
        self._scope = database.session()
        self.session = self._scope.__enter__()
        self._open = True
        try:
            self.writer = BatchWriter(self.session, source=source, api_key_id=api_key_id, metadata={"import_format": fmt})
        except BaseException as exc:
            raise self.abort(exc) from None
        self.rater_id = rater_id
        self.max_records = max_records
        self.pending: list[NewComparison] = []
        self.skipped: list[SkippedLine] = []
        self.skipped_count = 0

    def consume(self, parser: JsonlImportParser, chunk: bytes) -> None:
        """Parse the next chunk of the body, piece by decoded piece, writing as the lines come."""
        for lines in parser.feed_pieces(chunk):
            self.take(lines)
            if len(self.pending) >= IMPORT_CHUNK_RECORDS:
                self.flush()

    def end(self, parser: JsonlImportParser) -> None:
        """Take the body's last line (one without a newline)."""
        self.take(parser.close())

    def take(self, lines) -> None:
        for parsed in lines:
            if parsed.error is None:
                comp = NewComparison(
                    prompt=parsed.prompt, response_a=parsed.chosen, response_b=parsed.rejected,
                    choice="a", rater_id=self.rater_id,
                )
                problems = comparison_problems(comp, parsed.line)
                if not problems:
                    self.pending.append(comp)
                    if self.writer.count + len(self.pending) > self.max_records:
                        raise PayloadTooLarge(
                            f"the import has more than {self.max_records} comparisons (at line {parsed.line}):"
                            f" over the limit of {self.max_records} per batch"
                        )
                    continue
                reason = "; ".join(p["message"] for p in problems)
            else:
                reason = parsed.error
            self.skipped_count += 1
            if len(self.skipped) < MAX_SKIPPED_REPORTED:
                self.skipped.append(SkippedLine(line=parsed.line, reason=reason))

    def flush(self) -> None:
        self.writer.add(self.pending, prevalidated=True)
        self.pending = []

    def finish(self, *, idempotency_key: str | None, request_sha256: str) -> Any:
        self.flush()
        report = {
            "imported": self.writer.count,
            "skipped": self.skipped_count,
            "skipped_lines": [s.model_dump() for s in self.skipped[:100]],
        }
        batch = self.writer.finish(idempotency_key=idempotency_key, request_sha256=request_sha256, metadata=report)
        self._open = False
        self._scope.__exit__(None, None, None)  # commits; a failed commit raises the translated error
        return batch

    def abort(self, exc: BaseException) -> BaseException:
        """Roll back (once); the error to answer with: the store error the scope made of ``exc``, or ``exc``."""
        if not self._open:
            return exc
        self._open = False
        try:
            self._scope.__exit__(type(exc), exc, exc.__traceback__)
        except BaseException as translated:  # noqa: BLE001 - returned for the caller to raise
            return translated
        return exc


def _import_result(batch) -> ImportResult:
    meta = batch.meta or {}
    return ImportResult(
        batch=FeedbackBatchPublic.model_validate(batch),
        imported=meta.get("imported", batch.comparison_count),
        skipped=meta.get("skipped", 0),
        skipped_lines=[SkippedLine(**s) for s in meta.get("skipped_lines", [])],
    )


@router.post(
    "/import",
    status_code=201,
    response_model=ImportResult,
    summary="Import a JSONL file of preference pairs (hh-rlhf or trl), optionally gzip-encoded",
    responses={
        200: {"model": ImportResult, "description": "A replay: the import first made under this Idempotency-Key"},
        **responses(401, 403, 409, 413, 422, 503),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/jsonl": {"schema": {"type": "string", "format": "binary"}},
                "application/x-ndjson": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
)
async def import_batch(
    request: Request,
    key: Labeler,
    database: DatabaseDep,
    settings: SettingsDep,
    response: Response,
    format: Annotated[ExportFormat, Query(description="hh-rlhf: {chosen, rejected} dialogues; trl: {prompt, chosen, rejected}")],
    source: Annotated[str | None, Query(min_length=1, max_length=200, pattern=NO_NUL, description="default: import:<format>")] = None,
    rater_id: Annotated[str | None, Query(min_length=1, max_length=200, pattern=NO_NUL, description="default: the source")] = None,
    strict: Annotated[bool, Query(description="refuse the whole import (422) if any line is skipped")] = False,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    limit = settings.max_import_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"import body of {declared} bytes is over the limit of {limit} bytes")
    gzip = True if request.headers.get("content-encoding", "").lower() == "gzip" else None
    source = source or f"import:{format}"
    hasher, size = hashlib.sha256(), 0
    chunks = _body_chunks(request, settings.import_idle_timeout_s)

    with import_slots(request).hold(key.id):
        if idempotency_key is not None:
            first = await run_in_threadpool(_replay_of, database, idempotency_key)
            if first is not None:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"import body is over the limit of {limit} bytes")
                    hasher.update(chunk)
                await run_in_threadpool(_replay_of, database, idempotency_key, hasher.hexdigest())
                response.status_code = 200
                return _import_result(first)

        parser = JsonlImportParser(format, gzip=gzip, max_decoded_bytes=limit, max_text_chars=MAX_TEXT_CHARS)
        job = await run_in_threadpool(
            _ImportJob, database, source=source, rater_id=rater_id or source, api_key_id=key.id, fmt=format,
            max_records=settings.max_batch_records,
        )
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"import body is over the limit of {limit} bytes")
                hasher.update(chunk)
                await run_in_threadpool(job.consume, parser, chunk)
            await run_in_threadpool(job.end, parser)
            if strict and job.skipped_count:
                raise InvalidInput(
                    f"{job.skipped_count} line(s) could not be imported (strict mode): nothing was written",
                    [{"index": s.line, "field": "line", "message": s.reason} for s in job.skipped],
                )
            if job.writer.count + len(job.pending) == 0:
                raise InvalidInput(
                    f"no line could be imported ({job.skipped_count} skipped)",
                    [{"index": s.line, "field": "line", "message": s.reason} for s in job.skipped],
                )
            batch = await run_in_threadpool(job.finish, idempotency_key=idempotency_key, request_sha256=hasher.hexdigest())
        except FormatError as exc:
            await run_in_threadpool(job.abort, exc)
            raise InvalidInput(f"the body could not be read: {exc}", [{"field": "body", "message": str(exc)}]) from None
        except DecodedTooLarge as exc:
            await run_in_threadpool(job.abort, exc)
            raise PayloadTooLarge(str(exc)) from None
        except BaseException as exc:
            # Shielded: a cancelled request (client gone) must still roll back and return its connection.
            raise await asyncio.shield(run_in_threadpool(job.abort, exc))
        return _import_result(batch)


async def _body_chunks(request: Request, idle_timeout_s: float):
    """The request body's chunks; ``RequestTimedOut`` when none arrives within ``idle_timeout_s``."""
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(anext(stream), idle_timeout_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimedOut(
                f"no part of the import body arrived for {idle_timeout_s:g} s (RATCHET_IMPORT_IDLE_TIMEOUT_S):"
                " nothing was written"
            ) from None
        yield chunk


def _replay_of(database: Database, idempotency_key: str, request_sha256: str | None = None):
    with database.session() as session:
        return find_replay(session, idempotency_key=idempotency_key, request_sha256=request_sha256)


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


EXPORT_RESPONSES = {
    200: {
        "description": "JSONL, one preference pair a line; ties are left out (neither format has them) "
        "and counted in the X-Ratchet-Skipped-Ties header",
        "content": {"application/jsonl": {"schema": {"type": "string"}}},
    },
    **responses(401, 403, 404, 422),
}


def export_response(database: Database, batch_ids: list[int], fmt: str, filename: str) -> StreamingResponse:
    """Stream the comparisons of ``batch_ids`` as ``fmt`` JSONL."""
    with database.session() as session:
        ties = session.scalar(
            select(func.count()).select_from(Comparison).where(Comparison.batch_id.in_(batch_ids), Comparison.choice == "tie")
        )

    def lines() -> Iterator[bytes]:
        with database.session() as session:
            query = (
                select(Comparison.prompt, Comparison.response_a, Comparison.response_b, Comparison.choice)
                .where(Comparison.batch_id.in_(batch_ids), Comparison.choice != "tie")
                .order_by(Comparison.batch_id, Comparison.position)
                .execution_options(yield_per=1000)
            )
            for prompt, a, b, choice in session.execute(query):
                chosen, rejected = (a, b) if choice == "a" else (b, a)
                yield export_record(fmt, prompt=prompt, chosen=chosen, rejected=rejected)

    return StreamingResponse(
        lines(),
        media_type="application/jsonl",
        headers={"X-Ratchet-Skipped-Ties": str(ties), "Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/{batch_id}/export", response_class=StreamingResponse, responses=EXPORT_RESPONSES)
def export_batch(
    batch_id: IdPath,
    _: Labeler,
    database: DatabaseDep,
    format: Annotated[ExportFormat, Query()] = "hh-rlhf",
) -> StreamingResponse:
    with database.session() as session:
        get_feedback_batch(session, batch_id)
    return export_response(database, [batch_id], format, f"feedback-batch-{batch_id}.{format}.jsonl")


def replayed_batch(database: Database, batch_id: int, *, as_import: bool) -> dict:
    """The answer to a request that lost an idempotency race: the winner's batch."""
    with database.session() as session:
        batch = get_feedback_batch(session, batch_id)
        result = _import_result(batch) if as_import else FeedbackBatchPublic.model_validate(batch)
        return result.model_dump(mode="json")
