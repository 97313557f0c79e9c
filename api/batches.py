"""Reading a feedback batch's JSON body: whole, or record by record as the store writes it.

A small batch is validated whole (``parse_batch``). A large one is parsed
into plain JSON values first and its records are validated a chunk at a
time while the store streams the chunk before into PostgreSQL
(``parse_batch_streaming``), so the database works while Python validates.
Either way every invalid record is named (index and field, up to the cap)
and nothing is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError

from api.errors import MAX_REPORTED_ERRORS, PayloadTooLarge, pydantic_field_errors
from api.schemas.feedback import ComparisonCreate, FeedbackBatchCreate, FeedbackBatchEnvelope
from store.errors import InvalidInput

_RECORDS = TypeAdapter(list[ComparisonCreate])
CHUNK_RECORDS = 500


def _invalid(fields: list[dict]) -> InvalidInput:
    return InvalidInput(f"{len(fields)} invalid field(s) in the feedback batch", fields)


def _batch_errors(body: bytes, exc: ValidationError) -> list[dict]:
    """Field errors of a batch body; a JSON syntax error is placed in the record it breaks."""
    if any(e.get("type") == "json_invalid" for e in exc.errors()):
        located = json_error_location(body)
        if located is not None:
            return [located]
    return pydantic_field_errors(exc, record_key="comparisons")


def json_error_location(body: bytes) -> dict | None:
    """``{index, field, message}`` for the first JSON syntax error in a batch body: ``index`` is
    the comparison it is in (None outside ``comparisons``), ``field`` the key being read there,
    else ``comparisons`` or ``(body)``; the message gives line and column. None when the
    body is valid JSON (the error was of another kind) or not UTF-8."""
    try:
        text = body.decode("utf-8")
        json.loads(text)
        return None
    except UnicodeDecodeError:
        return None
    except RecursionError:
        return {"index": None, "field": "(body)", "message": "invalid JSON: nested too deeply"}
    except json.JSONDecodeError as exc:
        error = exc
    index, field = _record_at(text, error.pos)
    where = "" if index is None else f" in comparison {index}"
    return {
        "index": index,
        "field": field,
        "message": f"invalid JSON{where}: {error.msg} at line {error.lineno} column {error.colno}",
    }


def _record_at(text: str, pos: int) -> tuple[int | None, str]:
    """Which comparison (index) and key of it ``text[pos]`` lies in, scanning the JSON before it."""
    stack: list[str] = []  # the open containers
    top_key = record_key = last_string = None
    index: int | None = None
    i, end = 0, min(pos, len(text))
    while i < end:
        ch = text[i]
        if ch == '"':
            close = i + 1
            while close < end and text[close] != '"':
                close += 2 if text[close] == "\\" else 1
            last_string = text[i + 1 : close]
            i = close + 1
            continue
        if ch in "{[":
            if ch == "[" and stack == ["{"] and top_key == "comparisons":
                index = 0
            stack.append(ch)
            if len(stack) == 3 and index is not None:
                record_key = None
        elif ch in "}]":
            if stack:
                stack.pop()
            if len(stack) < 2:
                index = None
        elif ch == ":":
            if len(stack) == 1:
                top_key = last_string
            elif len(stack) == 3 and index is not None:
                record_key = last_string
        elif ch == "," and len(stack) == 2 and index is not None:
            index += 1
            record_key = None
        i += 1
    if index is not None and len(stack) >= 2:
        return index, (record_key or "(record)") if len(stack) >= 3 else "(record)"
    return None, "comparisons" if top_key == "comparisons" and len(stack) == 1 else "(body)"


def _check_count(count: int, limit: int) -> None:
    if count > limit:
        raise PayloadTooLarge(f"{count} comparisons is over the limit of {limit} per batch")


def parse_batch(body: bytes, *, max_records: int) -> FeedbackBatchCreate:
    """The whole batch, validated; 422 naming each bad record and field, 413 over ``max_records``."""
    try:
        batch = FeedbackBatchCreate.model_validate_json(body)
    except ValidationError as exc:
        raise _invalid(_batch_errors(body, exc)) from None
    _check_count(len(batch.comparisons), max_records)
    return batch


def parse_batch_streaming(body: bytes, *, max_records: int) -> tuple[FeedbackBatchEnvelope, LazyComparisons]:
    """The batch's own fields, validated, and its records, validated as they are read."""
    try:
        envelope = FeedbackBatchEnvelope.model_validate_json(body)
    except ValidationError as exc:
        raise _invalid(_batch_errors(body, exc)) from None
    _check_count(len(envelope.comparisons), max_records)
    return envelope, LazyComparisons(envelope.comparisons)


class LazyComparisons(Sequence[ComparisonCreate]):
    """JSON records that become ``ComparisonCreate`` a chunk at a time, when read.

    Reading a slice validates it. An invalid chunk validates every record
    and raises one ``InvalidInput`` naming all the bad ones (by index in the
    whole batch), so the caller's transaction rolls back with the full list.
    ``task_ids`` reads the task ids without validating.
    """

    def __init__(self, records: list[Any]):
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self._records))
            if step != 1:
                raise ValueError("LazyComparisons slices must be contiguous")
            return self._validate(start, stop)
        position = range(len(self._records))[index]
        return self._validate(position, position + 1)[0]

    def __iter__(self) -> Iterator[ComparisonCreate]:
        for start in range(0, len(self._records), CHUNK_RECORDS):
            yield from self._validate(start, start + CHUNK_RECORDS)

    def task_ids(self) -> set[int]:
        """The task ids the records name (JSON integers; validation refuses anything else)."""
        return {
            r["task_id"] for r in self._records
            if isinstance(r, dict) and type(r.get("task_id")) is int
        }

    def _validate(self, start: int, stop: int) -> list[ComparisonCreate]:
        try:
            return _RECORDS.validate_python(self._records[start:stop])
        except ValidationError:
            raise _invalid(self._all_errors()) from None

    def _all_errors(self) -> list[dict]:
        fields: list[dict] = []
        for chunk in range(0, len(self._records), CHUNK_RECORDS):
            try:
                _RECORDS.validate_python(self._records[chunk : chunk + CHUNK_RECORDS])
            except ValidationError as exc:
                fields.extend(pydantic_field_errors(exc, first_record=chunk))
            if len(fields) >= MAX_REPORTED_ERRORS:
                break
        return fields[:MAX_REPORTED_ERRORS]
