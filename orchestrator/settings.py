"""The settings of one weekly cycle: what to sample, how to train, when to deploy.

A cycle's settings are the server's defaults (the JSON file named by
``RATCHET_CYCLE_CONFIG``, else the built-in ones below) overridden by the
``params`` a trigger passed (``POST /v1/cycles``, ``ratchet cycle run
--param``), deep-merged: ``{"ppo": {"learning_rate": 1e-4}}`` changes one
field. The resolved settings are recorded in the cycle's ``open`` stage, so
a resumed cycle runs with exactly the settings it started with.

Some fields choose code or machines (the gold function, the runner, work
pools and deployments): those come from the server's file only, never from
a trigger's params (an operator key must not be able to run code of its
choosing). Worker-step fields without a typed setting pass through
``extra`` and are checked by the step's own config (a typo fails the stage
with the field named).
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from store.cycles import check_week
from store.errors import InvalidInput

SERVER_ONLY_FIELDS = ("gold", "runner", "work_pool", "step_deployments")
"""fields a trigger's params may not set (they choose code or machines)"""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SampleSettings(_Section):
    """The sample stage: K responses per prompt from the deployed policy, paired into comparison tasks."""

    prompts_per_cycle: int | None = Field(default=None, ge=1)
    """prompts sampled this cycle, a different subset every week (None: the whole prompt set)"""
    num_samples: int = Field(default=4, ge=2)
    """responses per prompt and policy (K); pairs of them become comparison tasks"""
    pairs_per_prompt: int | None = Field(default=None, ge=1)
    """comparison tasks per prompt (None: every pair of distinct responses, K(K-1)/2)"""
    snapshots: int = Field(default=1, ge=1)
    """how many recently deployed policies to sample from (the paper sampled several, for diversity)"""
    max_new_tokens: int = Field(default=128, ge=1)
    """longest response in tokens"""
    temperature: float = Field(default=1.0, ge=0)
    """sampling temperature"""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """nucleus sampling mass"""
    batch_size: int = Field(default=32, ge=1)
    """sequences generated together"""
    top_up_rounds: int = Field(default=3, ge=0)
    """when the responses are too alike to make the tasks gather.min_comparisons needs (a collapsed policy),
    sample again, up to this many times: more prompts, a hotter temperature, earlier deployed snapshots"""
    top_up_temperature: float = Field(default=0.5, ge=0)
    """added to the temperature in each top-up round"""
    extra: dict[str, Any] = {}
    """other SampleConfig fields, passed through"""


class GatherSettings(_Section):
    """The gather stage: wait for labelers."""

    min_comparisons: int = Field(default=1000, ge=0)
    """comparisons to wait for: those in feedback batches registered since the cycle opened (answers to its
    tasks, imports, other tools)"""
    deadline_s: float = Field(default=5 * 24 * 3600, ge=0)
    """stop waiting this long after sampling finished, with whatever has arrived"""
    poll_interval_s: float = Field(default=30.0, gt=0)
    """seconds between counts"""
    all_tasks: bool = False
    """also wait until every comparison task of this cycle is answered (or the deadline)"""


class HumanEvalSettings(_Section):
    """The human_eval stage: blinded A/B comparisons of the candidate against the deployed policy by labelers.

    After evaluate, each held-out prompt's pair of responses (candidate,
    deployed policy; the evaluate step's samples) becomes an eval task, A/B
    order random per task; which side is the candidate only the server knows.
    Labelers answer them through the same task API; the gate then needs the
    lower confidence bound of the candidate's human win rate above
    0.5 + gate.human_margin. Off: the gate trusts the PMs alone (they share
    blind spots, and PPO finds them).
    """

    enabled: bool = True
    """run the human A/B evaluation before the gate (False: the gate decides on the PMs and the KL alone)"""
    max_tasks: int | None = Field(default=None, ge=1)
    """most eval tasks per cycle (None: every held-out pair whose two responses differ)"""
    min_comparisons: int = Field(default=50, ge=1)
    """answers the gate needs; fewer by the deadline means no deploy"""
    deadline_s: float = Field(default=2 * 24 * 3600, ge=0)
    """stop waiting this long after the eval tasks appeared"""
    poll_interval_s: float = Field(default=30.0, gt=0)
    """seconds between counts"""
    all_tasks: bool = True
    """wait until every eval task is answered (or the deadline), not only min_comparisons"""
    train_on: bool = False
    """later cycles' comparison snapshots may train PMs on these answers (never the cycle's own PMs); off keeps
    the held-out prompts held out"""


class PMSettings(_Section):
    """The train_pm stage: the train PM and the test PM, on the two halves of the comparison snapshot."""

    name: str = "pm"
    """name of the train PM's versions (the PM that PPO optimises against)"""
    test_name: str = "test-pm"
    """name of the test PM's versions (the held-out PM the gate checks with)"""
    base_policy: str | None = None
    """"name:version" of the policy whose language model the PMs start from (None: the reference policy)"""
    warm_start: bool = False
    """start from the previous cycle's PMs instead of the base model (the paper retrains from scratch)"""
    heldout_fraction: float = Field(default=0.1, ge=0, lt=1)
    """comparisons held out for accuracy and calibration"""
    batch_size: int = Field(default=32, ge=1)
    """comparisons per optimizer step"""
    learning_rate: float = Field(default=1e-5, gt=0)
    """peak learning rate"""
    num_epochs: float = Field(default=1.0, gt=0)
    """passes over the training comparisons"""
    max_steps: int | None = Field(default=None, ge=1)
    """optimizer steps per PM (None: from num_epochs)"""
    max_length: int | None = Field(default=None, ge=4)
    """longest prompt + response in tokens"""
    ensemble_size: int = Field(default=3, ge=1)
    """members of the train PM: seeds and bootstrap resamples of its half, each selected on its out-of-bag
    comparisons; PPO optimises their mean less ppo.ensemble_penalty times their spread"""
    test_ensemble_size: int = Field(default=1, ge=1)
    """members of the test PM (on the other half, disjoint from every train-PM member's data)"""
    seed: int = 0
    """seed of the PMs"""
    extra: dict[str, Any] = {}
    """other TrainPMConfig fields, passed through"""


class PPOSettings(_Section):
    """The ppo stage: a candidate policy trained against the train PM with a KL penalty to the reference."""

    init: Literal["deployed", "reference"] = "deployed"
    """start from the deployed policy (iterated online RLHF) or from the reference policy"""
    kl_anchor: Literal["reference", "deployed"] = "reference"
    """what the per-token KL penalty pulls toward: the reference policy (P0, the paper's) or the deployed policy
    (each cycle a bounded step from the last; the gate's KL budget is still measured from the reference)"""
    total_episodes: int = Field(default=256, ge=1)
    """responses generated and scored over the run"""
    rollout_batch_size: int = Field(default=16, ge=1)
    """prompts per rollout"""
    mini_batch_size: int = Field(default=8, ge=1)
    """responses per gradient step"""
    ppo_epochs: int = Field(default=4, ge=1)
    """passes over each rollout"""
    response_length: int = Field(default=32, ge=1)
    """longest response in tokens"""
    temperature: float = Field(default=1.0, gt=0)
    """rollout sampling temperature"""
    kl_coef: float = Field(default=0.001, ge=0)
    """per-token KL penalty coefficient (the paper: 0.001)"""
    kl_target: float | None = None
    """adaptive KL coefficient aiming at this KL (None: fixed)"""
    learning_rate: float = Field(default=1e-5, gt=0)
    """policy learning rate"""
    lam: float = Field(default=0.95, ge=0, le=1)
    """GAE lambda (1: Monte Carlo returns, credit reaches the first token undiminished)"""
    ensemble_penalty: float = Field(default=0.5, ge=0)
    """the conservative reward's lambda: the train-PM ensemble's mean minus this times its spread"""
    seed: int = 0
    """seed of the run"""
    extra: dict[str, Any] = {}
    """other PPOConfig fields, passed through"""


class EvalSettings(_Section):
    """The evaluate stage: the candidate against the deployed policy on held-out prompts."""

    prompt_set: str | None = "eval-prompts"
    """name of the held-out prompt set (None or missing from the store: the training prompt set)"""
    max_new_tokens: int = Field(default=32, ge=1)
    """longest response in tokens"""
    temperature: float = Field(default=1.0, gt=0)
    """sampling temperature"""
    num_samples: int = Field(default=1, ge=1)
    """responses per prompt and policy"""
    seed: int = 0
    """seed of the samples"""
    extra: dict[str, Any] = {}
    """other EvaluateConfig fields, passed through"""


class GateSettings(_Section):
    """Thresholds of the deploy gate (``orchestrator.gate.GateConfig``)."""

    human_margin: float = Field(default=0.0, ge=0, lt=0.5)
    """the lower confidence bound of the candidate's human win rate must be above 0.5 + human_margin"""
    confidence: float = Field(default=0.9, gt=0.5, lt=1)
    """level of the one-sided lower bounds: the human win rate's and each PM's held-out accuracy's"""
    interval: Literal["wilson", "bootstrap"] = "bootstrap"
    """the human win rate's bound: a seeded percentile bootstrap of the answers (ties count half), or Wilson's
    score interval on wins + ties / 2 (which treats every tie as a coin flip and so errs low when ties are many)"""
    min_pm_accuracy: float = Field(default=0.5, ge=0, lt=1)
    """each PM's held-out accuracy must have its lower bound above this: a PM no better than chance is no evidence"""

    win_margin: float = Field(default=0.02, ge=0, lt=0.5)
    """the candidate must win 0.5 + win_margin of comparisons under the test PM"""
    kl_budget: float = Field(default=1.0, ge=0)
    """largest mean KL(candidate || reference) per response, in nats"""
    max_pm_gap: float = Field(default=0.2, ge=0)
    """largest train-PM minus test-PM win rate"""


class CycleSettings(_Section):
    """Everything one weekly cycle needs besides the store."""

    prompt_set: str = "prompts"
    """name of the prompt-set dataset sampled and trained on (its newest version when the cycle opens)"""
    policy_name: str | None = None
    """name of the candidate policy versions (None: the deployed policy's name)"""
    reference_policy: str | None = None
    """"name:version" of the KL reference (None: the deployed policy's reference, or the deployed policy itself)"""
    deploy_target: str = "default"
    """the deployment target the cycle samples from and deploys to"""
    sample: SampleSettings = SampleSettings()
    """the sample stage"""
    gather: GatherSettings = GatherSettings()
    """the gather stage"""
    pm: PMSettings = PMSettings()
    """the train_pm stage"""
    ppo: PPOSettings = PPOSettings()
    """the ppo stage"""
    evaluate: EvalSettings = EvalSettings()
    """the evaluate stage"""
    human_eval: HumanEvalSettings = HumanEvalSettings()
    """the human A/B evaluation before the gate"""
    gate: GateSettings = GateSettings()
    """the gate"""
    gold: str | None = None
    """"module:function" scoring (prompt, response) by a known gold preference, for evaluation (server only)"""
    runner: Literal["in_process", "deployment"] = "in_process"
    """where worker steps run: in this process, or as Prefect deployments on work_pool (server only)"""
    work_pool: str = "gpu"
    """the Prefect work pool of worker-step deployments (server only)"""
    step_deployments: dict[str, str] = {
        "sample": "ratchet-step/sample",
        "train_pm": "ratchet-step/train-pm",
        "ppo": "ratchet-step/ppo",
        "evaluate": "ratchet-step/evaluate",
    }
    """Prefect deployment of each worker step, "flow/deployment" (server only)"""
    device: str = "auto"
    """device of the worker steps: auto, cpu, cuda, cuda:N"""
    num_threads: int | None = Field(default=None, ge=1)
    """torch CPU threads of in-process steps (None: torch's default)"""
    stage_retries: int = Field(default=2, ge=0)
    """retries of a failed stage before the cycle fails"""
    retry_delay_s: float = Field(default=30.0, ge=0)
    """delay before the first retry; doubles for each later one"""

    @field_validator("gold")
    @classmethod
    def _gold_ref(cls, value: str | None) -> str | None:
        if value is not None and (value.count(":") != 1 or not all(value.split(":"))):
            raise ValueError(f"gold ({value!r}) must be 'module:function'")
        return value

    @model_validator(mode="after")
    def _steps_known(self) -> CycleSettings:
        missing = {"sample", "train_pm", "ppo", "evaluate"} - set(self.step_deployments)
        if missing and self.runner == "deployment":
            raise ValueError(f"step_deployments lacks {', '.join(sorted(missing))} (runner is deployment)")
        return self

    def retry_delays(self) -> list[float]:
        """Seconds before each retry: exponential backoff from retry_delay_s."""
        return [self.retry_delay_s * 2**i for i in range(self.stage_retries)]


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("extra", "step_deployments"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_defaults(path: str | Path | None) -> CycleSettings:
    """The server's default cycle settings: the JSON file at ``path``, or the built-in ones."""
    if path is None:
        return CycleSettings()
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInput(f"cycle config {path} (RATCHET_CYCLE_CONFIG) does not exist") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"cycle config {path} is not valid JSON: {exc}") from None
    try:
        return CycleSettings.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"cycle config {path} is invalid", _errors(exc)) from None


def resolve(defaults: CycleSettings, params: dict[str, Any] | None, *, trusted: bool = False) -> CycleSettings:
    """``defaults`` overridden by a trigger's ``params`` (deep merge), validated.

    Untrusted params (from the API or a scheduled run) may not set the
    server-only fields; ``InvalidInput`` names every bad field.
    """
    params = params or {}
    if not trusted:
        locked = [f for f in SERVER_ONLY_FIELDS if f in params]
        if locked:
            raise InvalidInput(
                "these cycle settings come from the server's RATCHET_CYCLE_CONFIG only",
                [{"field": f"params.{f}", "message": "may not be set by a trigger"} for f in locked],
            )
    try:
        return CycleSettings.model_validate(_merge(defaults.model_dump(), params))
    except ValidationError as exc:
        raise InvalidInput("invalid cycle params", _errors(exc, prefix="params.")) from None


def _errors(exc: ValidationError, prefix: str = "") -> list[dict[str, Any]]:
    return [
        {"field": prefix + ".".join(str(p) for p in err["loc"]) if err["loc"] else prefix.rstrip(".") or "(root)",
         "message": err["msg"]}
        for err in exc.errors()
    ]


# -- weeks -------------------------------------------------------------------------------


def week_of(when: datetime) -> str:
    """The ISO week label of ``when`` (UTC), e.g. ``2026-W48``."""
    year, week, _ = when.astimezone(UTC).isocalendar()
    return f"{year}-W{week:02d}"


def week_monday(week: str) -> date:
    """The Monday of an ISO week label; ``InvalidInput`` saying why for a week that does not exist."""
    year, number = check_week(week).split("-W")
    return date.fromisocalendar(int(year), int(number), 1)


def shift_week(week: str, weeks: int) -> str:
    """The ISO week ``weeks`` after ``week`` (before, when negative)."""
    monday = week_monday(week) + timedelta(weeks=weeks)
    year, number, _ = monday.isocalendar()
    return f"{year}-W{number:02d}"
