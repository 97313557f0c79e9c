"""Imports: a JSONL file of preference pairs (hh-rlhf, trl or trl-conversational) streamed into one feedback batch.

A conversational line's prompt messages are kept in its comparison's metadata (``messages``); its prompt is
their HH-RLHF text (``api.formats``). What becomes of each line is ``store.imports.PreferenceImport``'s, which
``ratchet feedback import`` uses too; the route streams the body into it."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from api.deps import DatabaseDep, IdempotencyKey, Labeler, SettingsDep
from api.errors import PayloadTooLarge, RequestTimedOut, TooManyRequests, raw_body, responses
from api.formats import DecodedTooLarge, FormatError, FormatName, JsonlImportParser
from api.schemas.common import NO_NUL
from api.schemas.feedback import MAX_TEXT_CHARS, FeedbackBatchPublic, ImportResult, SkippedLine
from store.errors import InvalidInput, ServiceUnavailable
from store.feedback import IdempotentReplay
from store.imports import PreferenceImport, TooManyComparisons, import_counts, replay_of, replay_winner
from store.models import FeedbackBatch

router = APIRouter(prefix="/v1/feedback-batches", tags=["feedback"])

FORMAT_HELP = (
    "hh-rlhf: {chosen, rejected} dialogues; trl: {prompt, chosen, rejected} strings; trl-conversational: the same "
    "as message lists, or {chosen, rejected} conversations sharing all but their last (assistant) message"
)


@router.post(
    "/import",
    status_code=201,
    response_model=ImportResult,
    summary="Import a JSONL file of preference pairs (hh-rlhf, trl or trl-conversational), optionally gzip-encoded",
    responses={
        200: {"model": ImportResult, "description": "A replay: the import first made under this Idempotency-Key"},
        **responses(401, 403, 409, 413, 422, 503),
    },
    openapi_extra=raw_body({
        "application/jsonl": {"schema": {"type": "string", "format": "binary"}},
        "application/x-ndjson": {"schema": {"type": "string", "format": "binary"}},
    }),
)
async def import_batch(
    request: Request,
    key: Labeler,
    database: DatabaseDep,
    settings: SettingsDep,
    response: Response,
    format: Annotated[FormatName, Query(description=FORMAT_HELP)],
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
    hasher, size = hashlib.sha256(), 0
    chunks = _body_chunks(request, settings.import_idle_timeout_s)

    with import_slots(request).hold(key.id):
        if idempotency_key is not None:
            first = await run_in_threadpool(replay_of, database, idempotency_key=idempotency_key)
            if first is not None:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"import body is over the limit of {limit} bytes")
                    hasher.update(chunk)
                await run_in_threadpool(
                    replay_of, database, idempotency_key=idempotency_key, request_sha256=hasher.hexdigest()
                )
                response.status_code = 200
                return _import_result(first)

        parser = JsonlImportParser(format, gzip=gzip, max_decoded_bytes=limit, max_text_chars=MAX_TEXT_CHARS)
        job = await run_in_threadpool(
            PreferenceImport, database, parser, fmt=format, source=source, rater_id=rater_id, api_key_id=key.id,
            max_records=settings.max_batch_records,
        )
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"import body is over the limit of {limit} bytes")
                hasher.update(chunk)
                await run_in_threadpool(job.consume, chunk)
            await run_in_threadpool(job.end)
            batch = await run_in_threadpool(
                job.finish, strict=strict, idempotency_key=idempotency_key, request_sha256=hasher.hexdigest()
            )
        except FormatError as exc:
            await run_in_threadpool(job.abort, exc)
            raise InvalidInput(f"the body could not be read: {exc}", [{"field": "body", "message": str(exc)}]) from None
        except (DecodedTooLarge, TooManyComparisons) as exc:
            await run_in_threadpool(job.abort, exc)
            raise PayloadTooLarge(str(exc)) from None
        except IdempotentReplay as lost:  # a concurrent import with this key committed first
            await asyncio.shield(run_in_threadpool(job.abort, lost))
            response.status_code = 200
            return _import_result(await run_in_threadpool(replay_winner, database, lost))
        except BaseException as exc:
            # Shielded: a cancelled request (client gone) must still roll back and return its connection.
            raise await asyncio.shield(run_in_threadpool(job.abort, exc))
        return _import_result(batch)


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


def _import_result(batch: FeedbackBatch) -> ImportResult:
    counts = import_counts(batch)
    return ImportResult(
        batch=FeedbackBatchPublic.model_validate(batch),
        imported=counts.imported,
        skipped=counts.skipped,
        skipped_lines=[SkippedLine(line=s.line, reason=s.reason) for s in counts.skipped_lines],
    )


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
