"""Datasets, preference models, policies, deployments, cycles."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from api.schemas.common import NO_NUL, JsonObject, Public
from api.schemas.feedback import AgreementPublic
from store.cycles import target_problem, week_problem


class ArtifactPublic(Public):
    uri: str
    sha256: str
    size_bytes: int
    is_dir: bool


class DatasetPublic(Public):
    id: int
    name: str
    version: int
    kind: str
    """prompts, samples or comparisons"""
    content_sha256: str
    row_count: int
    artifact: ArtifactPublic | None
    source_dataset_id: int | None
    cycle_id: int | None
    created_at: datetime
    metadata: dict[str, Any] = Field(validation_alias=AliasChoices("meta", "metadata"))


class DatasetDetail(DatasetPublic):
    batch_ids: list[int]
    """the feedback batches in a comparison snapshot"""
    agreement: AgreementPublic | None
    """rater agreement over the snapshot (comparison snapshots only)"""


class PreferenceModelPublic(Public):
    id: int
    name: str
    version: int
    role: str
    """train or test (the held-out PM the gate uses)"""
    dataset_id: int
    base_model: str
    init_pm_id: int | None
    artifact: ArtifactPublic | None
    cycle_id: int | None
    config: dict[str, Any]
    metrics: dict[str, Any]
    created_at: datetime


class PolicyPublic(Public):
    id: int
    name: str
    version: int
    base_model: str
    init_policy_id: int | None
    reference_policy_id: int | None
    pm_id: int | None
    artifact: ArtifactPublic | None
    cycle_id: int | None
    config: dict[str, Any]
    metrics: dict[str, Any]
    created_at: datetime


class DeploymentPublic(Public):
    id: int
    name: str
    version: int
    policy_id: int
    previous_id: int | None
    rolled_back_id: int | None
    action: str
    """deploy or rollback"""
    reason: str
    actor: str
    cycle_id: int | None
    created_at: datetime


class RollbackCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="default", min_length=1, max_length=200, pattern=NO_NUL)
    """the deployment target"""
    reason: str = Field(default="", max_length=2000, pattern=NO_NUL)
    """why (kept in the deployment log)"""


class StageRunPublic(Public):
    stage: str
    status: str
    attempts: int
    outputs: dict[str, Any]
    error: str | None
    compute_s: float | None
    started_at: datetime
    finished_at: datetime | None


class CyclePublic(Public):
    id: int
    week: str
    """ISO week, e.g. 2026-W48: one cycle per deployment target and week"""
    deploy_target: str
    """the deployment target the cycle samples from and deploys to ("default" unless the trigger named another)"""
    status: str
    trigger: str
    flow_run_id: str | None
    params: dict[str, Any]
    reason: str | None
    created_at: datetime
    finished_at: datetime | None


class CycleAttemptPublic(Public):
    number: int
    """1 for the run the cycle opened with; 2 on for each operator's re-run"""
    params: dict[str, Any]
    changed: list[str]
    """the settings (dotted keys) that differ from the attempt before"""
    kept: list[str]
    """finished stages the attempt kept as they were"""
    rerun: list[str]
    """stages the attempt ran again"""
    actor: str
    reason: str
    created_at: datetime


class CycleDetail(CyclePublic):
    stages: list[StageRunPublic]
    attempts: list[CycleAttemptPublic]


class CycleCancel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=2000)
    """why, recorded with the cancel and shown on the cycle's page"""


class CycleCancelled(BaseModel):
    cycle: CyclePublic
    prefect: dict[str, Any]
    """what Prefect was told: ``asked`` and the flow runs set to Cancelling, or why it could not be asked"""


class CycleRerun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    params: JsonObject = {}
    """corrections, merged over the cycle's params and checked as a trigger's are"""
    reason: str = Field(default="", max_length=2000)


class CycleRerunPlan(BaseModel):
    cycle: CyclePublic
    attempt: int
    changed: list[str]
    """the settings (dotted keys) that differ from those the cycle ran with"""
    kept: list[str]
    """finished stages kept: nothing they read changed"""
    rerun: list[str]
    """stages that run again, each with ``why``"""
    why: dict[str, str]


class CycleCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    week: str | None = Field(default=None, pattern=r"^[0-9]{4}-W[0-9]{2}$")
    """the ISO week to run (default: the current one); it must exist: 2026 has 53 weeks, 2027 has 52"""
    params: JsonObject = {}
    """overrides of the cycle's settings"""
    target: str | None = Field(default=None, min_length=1, max_length=200, pattern=NO_NUL)
    """the deployment target whose cycle to start (default: params.deploy_target, else the server's, "default");
    each target has its own cycle of a week. A deployment name that can also be a segment of keys and folders
    (no "/", "\\" or ":"); one that differs from params.deploy_target is refused"""

    @field_validator("week")
    @classmethod
    def _existing_week(cls, week: str | None) -> str | None:
        problem = None if week is None else week_problem(week)
        if problem is not None:
            raise PydanticCustomError("iso_week", "{problem}", {"problem": problem})
        return week

    @field_validator("target")
    @classmethod
    def _usable_target(cls, target: str | None) -> str | None:
        problem = None if target is None else target_problem(target)
        if problem is not None:
            raise PydanticCustomError("deploy_target", "{problem}", {"problem": problem})
        return target


class CycleStarted(BaseModel):
    cycle: CyclePublic
    created: bool
    """False when the cycle of the target and week already existed (two triggers for one target and week are one
    cycle)"""
