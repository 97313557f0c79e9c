"""What each stage of a cycle records: one small model per stage.

A stage's outputs are stored as JSON in its stage row (``StageRun.outputs``)
under these field names, and later stages read them back typed
(``ctx.outputs("train_pm", TrainPMOutputs).pm_id``). Fields a stage only
sometimes writes (a halt, a stage that was skipped) default to None, and a
row written before a field existed reads with its default, so a resumed
cycle reads the outputs its earlier stages recorded.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from orchestrator.settings import CycleSettings, recorded

Number = int | float
"""a number a worker reported (kept as the worker wrote it)"""


class StageOutputs(BaseModel):
    """The outputs of one stage, as recorded in its stage row."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    halt: str | None = None
    """why the cycle stops after this stage (nothing left to learn); the later stages are skipped"""
    skipped: str | None = None
    """why this stage was skipped (a halt before it)"""


class OpenOutputs(StageOutputs):
    """What every later stage and every re-run uses, fixed once when the cycle opens."""

    settings: CycleSettings
    """the resolved settings of the cycle"""
    week: str
    deployment_id: int
    """the deployment serving when the cycle opened (deploy refuses if it changed since)"""
    baseline_policy_id: int
    """the deployed policy"""
    reference_policy_id: int
    """the KL reference (P0)"""
    pm_base_policy_id: int
    """the policy whose language model the PMs start from"""
    policy_name: str
    """the name of the candidate's version"""
    sample_policy_ids: list[int]
    """the deployed snapshots sampled from, most recent first"""
    top_up_policy_ids: list[int] = []
    """earlier deployed snapshots a top-up round may add (most recent first)"""
    prompt_dataset_id: int
    eval_prompt_dataset_id: int
    warm_start_pm_ids: dict[str, int] = {}
    """the PMs warm-started from, by role (train, test)"""
    opened_at: str

    @field_validator("settings", mode="before")
    @classmethod
    def _settings(cls, value: Any) -> Any:
        return recorded(value) if isinstance(value, dict) else value


class SampleOutputs(StageOutputs):
    samples_dataset_id: int
    samples_version: int
    prompts: int
    responses: int
    tasks: int
    """comparison tasks made"""
    policies: list[str]
    top_up_rounds: int = 0
    rounds: list[dict[str, Any]] = []
    """each round's prompts, policies, temperature, responses and tasks so far"""
    short: str | None = None
    """why the tasks fall short of gather.min_comparisons (None: they do not)"""
    prompts_cut: int = 0
    """prompts longer than the step's max_prompt_tokens (default: what the policy's positions leave after
    max_new_tokens), sampled on their BOS and their end (``samples/prompts_cut``)"""
    metrics: dict[str, Any] = {}


class GatherOutputs(StageOutputs):
    comparisons: int
    min_comparisons: int
    outcome: str
    deadline: str
    tasks: dict[str, int]
    waited_s: Number


class SnapshotOutputs(StageOutputs):
    dataset_id: int | None
    """the comparisons dataset (None: there was no feedback)"""
    version: int | None = None
    rows: int
    batches: int | None = None
    excluded_eval_comparisons: int = 0
    excluded_gold_comparisons: int = 0
    """answers to gold tasks (quality control, never trained on)"""
    excluded_raters: list[dict[str, Any]] = []
    """raters left out, each ``{rater_id, reason, comparisons}``"""
    new_version: bool


class TrainPMOutputs(StageOutputs):
    pm_id: int
    pm_version: int
    test_pm_id: int
    test_pm_version: int
    dataset_id: int
    heldout_accuracy: Number | None = None
    heldout_decisive: Number = 0
    heldout_ece: Number | None = None
    test_pm_heldout_accuracy: Number | None = None
    test_pm_heldout_decisive: Number = 0
    ensemble_size: int = 1
    ensemble_spread: Number | None = None
    train_comparisons: Number | None = None


class ImproveOutputs(StageOutputs):
    method: str = "ppo"
    policy_id: int
    policy_version: int
    init_policy_id: int
    kl_anchor_policy_id: int | None = None
    reward: Number | None = None
    reward_test_pm: Number | None = None
    reward_spread: Number | None = None
    kl: Number | None = None
    episodes: Number | None = None


class EvaluateOutputs(StageOutputs):
    report_artifact_id: int
    report_uri: str
    samples_artifact_id: int
    candidate_policy_id: int
    metrics: dict[str, Any]


class HumanEvalOutputs(StageOutputs):
    """The human verdict; with human evaluation off only ``enabled`` and ``reason``."""

    enabled: bool
    reason: str | None = None
    """why there is no verdict (human evaluation is off)"""
    deploy_target: str = "default"
    candidate_policy_id: int | None = None
    baseline_policy_id: int | None = None
    tasks: int | None = None
    identical_pairs: int = 0
    answers: int = 0
    """answers the verdict counts"""
    excluded_answers: int = 0
    """answers of raters quality control leaves out (``excluded_raters``), not counted"""
    excluded_raters: dict[str, str] = {}
    """rater -> why its answers are not counted"""
    wins: int = 0
    ties: int = 0
    losses: int = 0
    win_rate: Number | None = None
    min_comparisons: int = 0
    outcome: str = "deadline"
    deadline: str | None = None
    waited_s: Number | None = None
    elo: dict[str, float] = {}
    elo_candidate: float | None = None
    elo_baseline: float | None = None


class GateOutputs(StageOutputs):
    """The gate's ``Decision`` (``orchestrator.gate``), what it measured and the thresholds it applied."""

    deploy: bool
    reasons: list[str]
    checks: dict[str, bool] = {}
    measures: dict[str, Any] = {}
    measured: dict[str, Any]
    thresholds: dict[str, Any]
    candidate_policy_id: int


class DeployOutputs(StageOutputs):
    deployed: bool
    reasons: list[str] = []
    """why nothing was deployed"""
    deployment_id: int | None = None
    deployment_version: int | None = None
    policy_id: int | None = None
    policy_version: int | None = None
    hook: dict[str, Any] | None = None
