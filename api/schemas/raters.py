"""Raters and quality control: per-rater numbers, operators' decisions, gold comparisons."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.schemas.common import NO_NUL, JsonObject
from api.schemas.feedback import Text
from store.raters import QCPolicy


class RaterPublic(BaseModel):
    """One rater's numbers, and whether snapshots leave it out."""

    rater_id: str
    answered: int
    """comparisons the rater gave (gold answers and imports included)"""
    gold_answered: int
    gold_accuracy: float | None
    """share of its gold answers equal to the known answer (None: no gold answered)"""
    agreement_pairs: int
    """pairs of its answer with another rater's answer to the same overlap task"""
    kappa: float | None
    """Cohen's kappa against the other raters on the same tasks (None: no pair, or chance agreement certain)"""
    median_seconds: float | None
    """median seconds from taking a task to answering it (None: no task answered through a lease)"""
    flagged: bool
    flags: list[str]
    """why quality control flags the rater"""
    decision: Literal["include", "exclude"] | None
    """an operator's decision over the flags, if any"""
    decision_reason: str
    excluded: bool
    """whether comparison snapshots leave every comparison of this rater out"""


class CycleAgreementPublic(BaseModel):
    cycle_id: int
    week: str
    tasks: int
    """tasks answered by two or more distinct raters"""
    raters: int
    alpha: float | None
    """Krippendorff's alpha (nominal) over those tasks (None: nothing pairable, or no variation)"""


class RaterList(BaseModel):
    data: list[RaterPublic]
    count: int
    policy: QCPolicy
    """the QC policy the flags are computed with (the running or newest cycle's)"""
    gold: dict[str, int]
    """gold comparisons registered, active and retired"""
    cycles: list[CycleAgreementPublic]
    """agreement per cycle, newest first"""


class RaterDecisionCreate(BaseModel):
    """An operator's decision on a rater: include (over its flags), exclude, or null to clear the one in force."""

    model_config = ConfigDict(extra="forbid")

    decision: Literal["include", "exclude"] | None
    reason: Annotated[str, Field(max_length=2000, pattern=NO_NUL)] = ""
    """why (kept with the decision)"""


class GoldComparisonCreate(BaseModel):
    """A comparison with a known answer."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text
    response_a: Text
    response_b: Text
    choice: Literal["a", "b", "tie"]
    """the known answer"""
    metadata: JsonObject | None = None
    """shown with the task as any task's metadata is (a ``prompt_id`` key becomes the task's prompt id)"""

    @model_validator(mode="after")
    def _distinct_unless_tie(self) -> GoldComparisonCreate:
        if not self.prompt.strip():
            raise ValueError("prompt is empty")
        if self.response_a == self.response_b and self.choice != "tie":
            raise ValueError("response_a and response_b are identical, so choice must be 'tie'")
        return self


class GoldBatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comparisons: list[GoldComparisonCreate] = Field(min_length=1, max_length=10_000)


class GoldBatchPublic(BaseModel):
    ids: list[int]
    count: int
    gold: dict[str, int]


class GoldRetire(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[int] = Field(min_length=1, max_length=10_000)


class RaterDecisionPublic(BaseModel):
    rater_id: str
    decision: Literal["include", "exclude"] | None
    reason: str
    actor: str
    at: datetime

