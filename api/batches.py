"""Reading a feedback batch's JSON body: whole, or record by record as the store writes it.

A small batch is validated whole (``parse_batch``). A large one is parsed
into plain JSON values first and its records are validated a chunk at a
time while the store streams the chunk before into PostgreSQL
(``parse_batch_streaming``), so the database works while Python validates.
Either way every invalid record is named (index and field, up to the cap)
and nothing is written.
"""

from __future__ import annotations

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


def _check_count(count: int, limit: int) -> None:
    if count > limit:
        raise PayloadTooLarge(f"{count} comparisons is over the limit of {limit} per batch")


def parse_batch(body: bytes, *, max_records: int) -> FeedbackBatchCreate:
    """The whole batch, validated; 422 naming each bad record and field, 413 over ``max_records``."""
    try:
        batch = FeedbackBatchCreate.model_validate_json(body)
    except ValidationError as exc:
        raise _invalid(pydantic_field_errors(exc, record_key="comparisons")) from None
    _check_count(len(batch.comparisons), max_records)
    return batch


def parse_batch_streaming(body: bytes, *, max_records: int) -> tuple[FeedbackBatchEnvelope, LazyComparisons]:
    """The batch's own fields, validated, and its records, validated as they are read."""
    try:
        envelope = FeedbackBatchEnvelope.model_validate_json(body)
    except ValidationError as exc:
        raise _invalid(pydantic_field_errors(exc, record_key="comparisons")) from None
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
