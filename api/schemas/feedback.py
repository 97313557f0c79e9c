"""Feedback batches, comparisons, imports and comparison tasks."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from api.schemas.common import JsonObject, Public
from store.feedback import MAX_STRENGTH, strength_problem

MAX_TEXT_CHARS = 200_000
"""longest prompt or response accepted, in characters"""
MAX_NAME_CHARS = 200

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]


def _no_nul(value: str, field: str) -> str:
    if "\x00" in value:
        raise PydanticCustomError("nul_character", "{field} contains a NUL character", {"field": field})
    return value


class ComparisonCreate(BaseModel):
    """One judgement: which response to the prompt is better (or a tie)."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text
    """the prompt (for dialogues: the whole conversation up to the last Assistant turn)"""
    response_a: Text
    """the first response; may be empty (saying nothing can be the best reply)"""
    response_b: Text
    """the second response; may be empty"""
    choice: Literal["a", "b", "tie"]
    """which response the rater preferred"""
    rater_id: Name
    """who judged (a labeler's id in the vendor's system)"""
    task_id: Annotated[int, Field(ge=1, le=2**31 - 1, strict=True)] | None = None
    """the comparison task this answers, when it came from GET /v1/comparison-tasks (a JSON integer)"""
    metadata: JsonObject | None = None
    """free-form JSON kept with the comparison"""
    strength: Annotated[float, Field(ge=0, le=MAX_STRENGTH, allow_inf_nan=False)] | None = None
    """how much better the chosen response is on the labeling scale: 0 for a tie (about the same), above 0 for
    A or B (the default scale: 1 slightly, 2 better, 3 much better); omitted when the rater gave none"""

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("empty_prompt", "prompt is empty")
        return _no_nul(value, "prompt")

    @field_validator("response_a", "response_b", "rater_id")
    @classmethod
    def _texts(cls, value: str, info) -> str:
        if info.field_name == "rater_id" and not value.strip():
            raise PydanticCustomError("empty_rater", "rater_id is empty")
        return _no_nul(value, info.field_name)

    @model_validator(mode="after")
    def _distinct_unless_tie(self) -> ComparisonCreate:
        if self.response_a == self.response_b and self.choice != "tie":
            raise PydanticCustomError(
                "identical_responses",
                "response_a and response_b are identical, so choice must be 'tie', not {choice}",
                {"choice": repr(self.choice)},
            )
        problem = strength_problem(self.choice, self.strength)
        if problem:
            raise PydanticCustomError("strength", "{problem}", {"problem": problem})
        return self


class _BatchFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Name
    """where the batch comes from (a vendor, a tool, an import)"""
    metadata: JsonObject | None = None
    """free-form JSON kept with the batch"""

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        return _no_nul(value, "source")


class FeedbackBatchCreate(_BatchFields):
    """A batch of comparisons, registered whole or not at all."""

    comparisons: Annotated[list[ComparisonCreate], Field(min_length=1)]
    """the comparisons, at least one"""


class FeedbackBatchEnvelope(_BatchFields):
    """A batch whose comparisons are still plain JSON values, validated later
    a chunk at a time (api.batches.LazyComparisons); not part of the API."""

    comparisons: Annotated[list[Any], Field(min_length=1)]


class AgreementPublic(BaseModel):
    """Agreement among raters who judged the same pair."""

    pairs_with_multiple_raters: int
    rater_pairs: int
    agreement: float | None
    """fraction of rater pairs (on the same pair) that agreed; None when no pair was judged twice"""


class FeedbackBatchPublic(Public):
    id: int
    source: str
    comparison_count: int
    content_sha256: str
    idempotency_key: str | None
    cycle_id: int | None
    created_at: datetime
    metadata: dict[str, Any] = Field(validation_alias=AliasChoices("meta", "metadata"))


class FeedbackBatchDetail(FeedbackBatchPublic):
    agreement: AgreementPublic


class SkippedLine(BaseModel):
    line: int
    reason: str


class ImportResult(BaseModel):
    """What an import did: the batch and the lines it could not use."""

    batch: FeedbackBatchPublic | None
    """the batch created (None when no line could be imported)"""
    imported: int
    skipped: int
    skipped_lines: list[SkippedLine]
    """the first skipped lines with their reasons (all counted in ``skipped``)"""


class ComparisonTaskPublic(Public):
    """A task as a rater sees it. What the server knows about it stays there: which policy wrote which
    response (the comparison is blind), whether it is an eval or gold task, and a gold task's answer."""

    id: int
    cycle_id: int | None
    prompt_id: str | None
    prompt: str
    response_a: str
    response_b: str
    leased_until: datetime | None
    """when the rater's lease runs out"""


class ComparisonTaskList(BaseModel):
    data: list[ComparisonTaskPublic]
    count: int
    lease_s: int
    """how long these tasks are held for the caller"""
    rater_id: str
    """the rater the tasks are leased to (answers must name it)"""


class TaskLeasePublic(BaseModel):
    """A rater's lease on a task, after a renewal or a release."""

    task_id: int
    rater_id: str
    leased_until: datetime
    released: bool


ExportFormat = Literal["hh-rlhf", "trl"]
