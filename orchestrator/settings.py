"""The settings of one weekly cycle: what to sample, how to train, when to deploy.

A cycle's settings are the server's defaults (the JSON file named by
``RATCHET_CYCLE_CONFIG``, else the built-in ones below) overridden by the
``params`` a trigger passed (``POST /v1/cycles``, ``ratchet cycle run
--param``), deep-merged: ``{"ppo": {"learning_rate": 1e-4}}`` changes one
field. The resolved settings are recorded in the cycle's ``open`` stage, so
a resumed cycle runs with exactly the settings it started with.

The fields of a worker step are not repeated here: the step's config
dataclass (``workers.sample.SampleConfig``, ``workers.train_pm.TrainPMConfig``,
``workers.ppo.PPOConfig``, ``workers.evaluate.EvaluateConfig``) is their one
definition. A stage's section holds what the orchestrator decides (names,
inputs, stage-level knobs) and, under ``config``, the step's fields this
cycle sets: ``{"ppo": {"config": {"learning_rate": 1e-4}}}``. ``resolve``
checks them against the dataclass, so a typo or a bad value is refused when
the cycle is triggered, with the field named; ``ratchet cycle defaults``
prints every field with its effective value and documentation.

Some fields choose code or machines (the gold function, the runner, work
pools and deployments): those come from the server's file only, never from
a trigger's params (an operator key must not be able to run code of its
choosing).

A cycle runs for one deployment target (``deploy_target``: a trigger's
``target``, else its params', else the server's). A target other than
"default" has its own data by default: each name in ``OWN_NAMES`` (its
prompt sets, its PMs, its comparison snapshot) becomes ``<name>@<target>``
unless it was set explicitly, in the trigger's params or in the server's
file; set explicitly, it is used as given, which is how two targets share a
prompt set or a PM. ``resolve`` applies this once, so the settings a cycle
records name what it really read and registered.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from store.cycles import DEFAULT_TARGET, check_week, target_problem
from store.errors import InvalidInput
from store.raters import QCPolicy
from store.settings import read_cycle_config

SERVER_ONLY_FIELDS = ("gold", "runner", "work_pool", "step_deployments", "step_poll_interval_s")
"""fields a trigger's params may not set (they choose code or machines)"""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


_ARTIFACT = "<artifact>"
"""what stands in for an input path when overrides are checked against a step's config"""


class StepSection(_Section):
    """A stage that runs a worker step: what the orchestrator decides, plus overrides of the step's config.

    The step's config dataclass (``workers.<step>``) is the one definition
    of its fields, their defaults and their documentation; ``config`` names
    only the fields this cycle sets otherwise. ``resolve`` checks them
    against the dataclass (``check``); ``CycleSettings.step_config`` is the
    config a stage runs the step with, and ``ratchet cycle defaults`` prints
    it field by field.
    """

    step: ClassVar[str]
    """the worker step (a key of ``orchestrator.runners.STEPS``)"""
    set_by_stage: ClassVar[dict[str, Any]]
    """config fields the stage sets itself (inputs, outputs, cycle-wide choices), each with the stand-in value
    an override check builds the config with"""

    cycle_defaults: ClassVar[dict[str, Any]] = {}
    """fields of the step's config a cycle sets otherwise unless its ``config`` says (the cycle's own defaults)"""

    config: dict[str, Any] = Field(default={}, validate_default=True)
    """fields of the step's config this cycle sets (over ``cycle_defaults``; the rest keep the step's defaults)"""

    @field_validator("config")
    @classmethod
    def _over_cycle_defaults(cls, value: dict[str, Any]) -> dict[str, Any]:
        return {**cls.cycle_defaults, **value}

    def step_defaults(self) -> dict[str, Any]:
        """The step's defaults of every field a cycle may set (imports the step's module: torch)."""
        from orchestrator.runners import config_class

        out = {}
        for field in dataclasses.fields(config_class(self.step)):
            if field.name in self.set_by_stage:
                continue
            if field.default is not dataclasses.MISSING:
                out[field.name] = field.default
            elif field.default_factory is not dataclasses.MISSING:
                out[field.name] = field.default_factory()
        return out

    def cycle_problems(self, values: dict[str, Any]) -> list[tuple[str, str]]:
        """What the cycle itself needs of the step's fields beyond the step's own checks: (field, message)."""
        return []

    def check(self, where: str) -> list[dict[str, Any]]:
        """Problems of ``config`` against the step's config dataclass, each naming its field under ``where``."""
        from orchestrator.runners import config_class
        from workers.common.config import ConfigError, coerce, from_dict

        cls = config_class(self.step)
        hints = typing.get_type_hints(cls)
        errors, values = [], {}
        for name, value in self.config.items():
            if name not in hints:
                errors.append((name, f"{cls.__name__} has no field {name!r}"))
            elif name in self.set_by_stage:
                errors.append((name, "set by the stage itself, not by the cycle's settings"))
            else:
                try:
                    values[name] = coerce(value, hints[name], name)
                except ConfigError as exc:
                    errors.append((name, str(exc)))
        errors += self.cycle_problems({**self.step_defaults(), **values})
        problems = [{"field": f"{where}.config.{name}", "message": message} for name, message in errors]
        if not problems:
            try:
                from_dict(cls, {**self.set_by_stage, **values}, source=f"{where}.config")
            except ConfigError as exc:  # the step's own checks name the field first: "batch_size (12) must be ..."
                named = str(exc).split(" ", 1)[0]
                field = f"{where}.config.{named}" if named in hints else f"{where}.config"
                problems.append({"field": field, "message": str(exc)})
        return problems


class SampleSettings(StepSection):
    """The sample stage: K responses per prompt from the deployed policy, paired into comparison tasks
    (the step: ``workers.sample.SampleConfig``)."""

    step: ClassVar[str] = "sample"
    set_by_stage: ClassVar[dict[str, Any]] = {"policies": {"policy": _ARTIFACT}, "prompts_path": _ARTIFACT,
                                              "output_dir": _ARTIFACT}

    prompts_per_cycle: int | None = Field(default=None, ge=1)
    """prompts sampled this cycle, a different subset every week (None: the whole prompt set)"""
    pairs_per_prompt: int | None = Field(default=None, ge=1)
    """comparison tasks per prompt (None: every pair of distinct responses, K(K-1)/2)"""
    snapshots: int = Field(default=1, ge=1)
    """how many recently deployed policies to sample from (the paper sampled several, for diversity)"""
    top_up_rounds: int = Field(default=3, ge=0)
    """when the responses are too alike to make the tasks gather.min_comparisons needs (a collapsed policy),
    sample again, up to this many times: more prompts, a hotter temperature, earlier deployed snapshots"""
    top_up_temperature: float = Field(default=0.5, ge=0)
    """added to the temperature in each top-up round"""

    def cycle_problems(self, values: dict[str, Any]) -> list[tuple[str, str]]:
        if values["num_samples"] < 2:
            return [("num_samples", f"num_samples ({values['num_samples']}) must be >= 2: pairs of a prompt's "
                                    "responses become comparison tasks")]
        return []


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


class PMSettings(StepSection):
    """The train_pm stage: the train PM and the test PM, on the two halves of the comparison snapshot
    (the step: ``workers.train_pm.TrainPMConfig``; its ``ensemble_size`` members make the train PM, whose
    mean less ``ppo.config.ensemble_penalty`` times their spread PPO optimises)."""

    step: ClassVar[str] = "train_pm"
    set_by_stage: ClassVar[dict[str, Any]] = {"model_path": _ARTIFACT, "dataset_path": _ARTIFACT,
                                              "warm_start_path": None, "output_dir": _ARTIFACT, "two_pms": True}

    name: str = "pm"
    """name of the train PM's versions (the PM that PPO optimises against)"""
    test_name: str = "test-pm"
    """name of the test PM's versions (the held-out PM the gate checks with)"""
    base_policy: str | None = None
    """"name:version" of the policy whose language model the PMs start from (None: the reference policy)"""
    warm_start: bool = False
    """start from the previous cycle's PMs instead of the base model (the paper retrains from scratch)"""
    cycle_defaults: ClassVar[dict[str, Any]] = {"ensemble_size": 3}


METHODS = ("ppo", "dpo", "online_dpo", "rloo", "grpo", "rejection_sampling")
"""the ways the improve stage can turn feedback into a candidate policy (``ImproveSettings.method``)"""

Method = Literal["ppo", "dpo", "online_dpo", "rloo", "grpo", "rejection_sampling"]

_POLICY_INPUTS: dict[str, Any] = {"policy_path": _ARTIFACT, "reference_path": _ARTIFACT, "pm_path": _ARTIFACT,
                                  "test_pm_path": _ARTIFACT, "prompts_path": _ARTIFACT, "output_dir": _ARTIFACT}
"""what the improve stage sets of a method that samples the policy and scores it with the PMs"""


class ImproveSettings(_Section):
    """The improve stage: the candidate policy C(k), by one method per cycle, from the deployed policy (or the
    reference), with the reference (or the deployed policy) as its KL anchor. Each method's step fields are in
    its own section (``ppo``, ``dpo``, ``online_dpo``, ``rloo``, ``grpo``, ``rejection_sampling``)."""

    method: Method = "ppo"
    """ppo: PPO against the train PM; dpo: DPO on the comparison snapshot (no PM); online_dpo: pairs sampled from
    the policy and labelled by the train PM, DPO on them, in rounds; rloo / grpo: k samples per prompt,
    leave-one-out or group-normalised baselines, no critic; rejection_sampling: best-of-N under the train PM,
    then supervised fine-tuning on the winners, in rounds"""
    init: Literal["deployed", "reference"] = "deployed"
    """start from the deployed policy (iterated online RLHF) or from the reference policy"""
    kl_anchor: Literal["reference", "deployed"] = "reference"
    """what the method's KL term pulls toward: the reference policy (P0, the paper's) or the deployed policy
    (each cycle a bounded step from the last; the gate's KL budget is still measured from the reference)"""


class PPOSettings(StepSection):
    """improve.method ``ppo``: a candidate trained against the train PM with a KL penalty
    (the step: ``workers.ppo.PPOConfig``; its ``seed`` is mixed with the cycle's week)."""

    step: ClassVar[str] = "ppo"
    set_by_stage: ClassVar[dict[str, Any]] = _POLICY_INPUTS
    cycle_defaults: ClassVar[dict[str, Any]] = {"ensemble_penalty": 0.5}


class DPOSettings(StepSection):
    """improve.method ``dpo``: DPO on the cycle's comparison snapshot against the KL anchor
    (the step: ``workers.dpo.DPOConfig``; ties are kept with target 1/2; its ``seed`` is mixed with the week)."""

    step: ClassVar[str] = "dpo"
    set_by_stage: ClassVar[dict[str, Any]] = {"model_path": _ARTIFACT, "dataset_path": _ARTIFACT,
                                              "ref_model_path": _ARTIFACT, "output_dir": _ARTIFACT}


class OnlineDPOSettings(StepSection):
    """improve.method ``online_dpo``: pairs sampled from the policy, labelled by the train PM, DPO on them
    (the step: ``workers.online_dpo.OnlineDPOConfig``)."""

    step: ClassVar[str] = "online_dpo"
    set_by_stage: ClassVar[dict[str, Any]] = _POLICY_INPUTS
    cycle_defaults: ClassVar[dict[str, Any]] = {"ensemble_penalty": 0.5}


class RLOOSettings(StepSection):
    """improve.method ``rloo``: k samples per prompt, REINFORCE with the leave-one-out baseline
    (the step: ``workers.rloo.RLOOConfig``, estimator rloo)."""

    step: ClassVar[str] = "rloo"
    set_by_stage: ClassVar[dict[str, Any]] = _POLICY_INPUTS
    cycle_defaults: ClassVar[dict[str, Any]] = {"estimator": "rloo", "ensemble_penalty": 0.5}


class GRPOSettings(StepSection):
    """improve.method ``grpo``: k samples per prompt, group-normalised advantages, the KL to the anchor a term of
    the loss as DeepSeekMath has it (the step: ``workers.rloo.RLOOConfig``, estimator grpo, kl_in_reward false;
    ``dr_grpo`` centres without scaling)."""

    step: ClassVar[str] = "rloo"
    set_by_stage: ClassVar[dict[str, Any]] = _POLICY_INPUTS
    cycle_defaults: ClassVar[dict[str, Any]] = {"estimator": "grpo", "kl_in_reward": False, "ensemble_penalty": 0.5}


class RejectionSamplingSettings(StepSection):
    """improve.method ``rejection_sampling``: best-of-N under the train PM, then SFT on the winners, in rounds
    (the step: ``workers.rejection_sampling.RejectionSamplingConfig``)."""

    step: ClassVar[str] = "rejection_sampling"
    set_by_stage: ClassVar[dict[str, Any]] = _POLICY_INPUTS
    cycle_defaults: ClassVar[dict[str, Any]] = {"ensemble_penalty": 0.5}


class EvalSettings(StepSection):
    """The evaluate stage: the candidate against the deployed policy on held-out prompts
    (the step: ``workers.evaluate.EvaluateConfig``; the same seed every week, so numbers compare across cycles)."""

    step: ClassVar[str] = "evaluate"
    set_by_stage: ClassVar[dict[str, Any]] = {
        "candidate_path": _ARTIFACT, "baseline_path": _ARTIFACT, "reference_path": _ARTIFACT, "pm_path": _ARTIFACT,
        "test_pm_path": _ARTIFACT, "prompts_path": _ARTIFACT, "output_dir": _ARTIFACT, "gold": None,
    }

    prompt_set: str | None = "eval-prompts"
    """name of the held-out prompt set (None or missing from the store: the training prompt set)"""


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
    deploy_target: str = DEFAULT_TARGET
    """the deployment target the cycle samples from and deploys to; one cycle per (target, week)"""
    snapshot_name: str = "comparisons"
    """name of the comparison snapshot D(k) the snapshot stage registers (a target other than "default":
    <name>@<target> unless set explicitly)"""
    feedback_from: list[str] = []
    """other deployment targets whose cycles' answers this cycle's snapshot and gather also take; by default a
    target takes the answers to its own cycles' tasks and every comparison that answers no task (imports, direct
    posts), and leaves out the answers to other targets' cycles"""
    sample: SampleSettings = SampleSettings()
    """the sample stage"""
    gather: GatherSettings = GatherSettings()
    """the gather stage"""
    pm: PMSettings = PMSettings()
    """the train_pm stage"""
    improve: ImproveSettings = ImproveSettings()
    """the improve stage: its method, where it starts and its KL anchor"""
    ppo: PPOSettings = PPOSettings()
    """improve.method ppo"""
    dpo: DPOSettings = DPOSettings()
    """improve.method dpo"""
    online_dpo: OnlineDPOSettings = OnlineDPOSettings()
    """improve.method online_dpo"""
    rloo: RLOOSettings = RLOOSettings()
    """improve.method rloo"""
    grpo: GRPOSettings = GRPOSettings()
    """improve.method grpo"""
    rejection_sampling: RejectionSamplingSettings = RejectionSamplingSettings()
    """improve.method rejection_sampling"""
    evaluate: EvalSettings = EvalSettings()
    """the evaluate stage"""
    human_eval: HumanEvalSettings = HumanEvalSettings()
    """the human A/B evaluation before the gate"""
    gate: GateSettings = GateSettings()
    """the gate"""
    qc: QCPolicy = QCPolicy()
    """quality control of raters: gold and overlap shares, the thresholds that flag a rater, and whether flagged
    raters are left out of the snapshot (``store.raters.QCPolicy``)"""
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
        "dpo": "ratchet-step/dpo",
        "online_dpo": "ratchet-step/online-dpo",
        "rloo": "ratchet-step/rloo",
        "rejection_sampling": "ratchet-step/rejection-sampling",
        "evaluate": "ratchet-step/evaluate",
    }
    """Prefect deployment of each worker step, "flow/deployment" (server only)"""
    step_poll_interval_s: float = Field(default=10.0, gt=0)
    """seconds between checks of a worker step's flow run (runner deployment; server only)"""
    device: str = "auto"
    """device of the worker steps: auto, cpu, cuda, cuda:N"""
    num_threads: int | None = Field(default=None, ge=1)
    """torch CPU threads of in-process steps (None: torch's default)"""
    stage_retries: int = Field(default=2, ge=0)
    """retries of a failed stage before the cycle fails"""
    retry_delay_s: float = Field(default=30.0, ge=0)
    """delay before the first retry; doubles for each later one"""

    @field_validator("deploy_target")
    @classmethod
    def _target_name(cls, value: str) -> str:
        problem = target_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("gold")
    @classmethod
    def _gold_ref(cls, value: str | None) -> str | None:
        if value is not None and (value.count(":") != 1 or not all(value.split(":"))):
            raise ValueError(f"gold ({value!r}) must be 'module:function'")
        return value

    @model_validator(mode="after")
    def _steps_known(self) -> CycleSettings:
        missing = {"sample", "train_pm", self.method_section().step, "evaluate"} - set(self.step_deployments)
        if missing and self.runner == "deployment":
            raise ValueError(f"step_deployments lacks {', '.join(sorted(missing))} (runner is deployment)")
        return self

    def step_config(self, section: str) -> dict[str, Any]:
        """The config a step section's stage runs its step with, less what the stage sets itself: the step's
        defaults, the cycle's device (no progress bars), then the section's ``config``."""
        step = getattr(self, section)
        return {**step.step_defaults(), "device": self.device, "progress": False, **step.config}

    def feedback_targets(self) -> list[str]:
        """The deployment targets whose cycles' answers this cycle's snapshot and gather take: its own first,
        then ``feedback_from``."""
        return [self.deploy_target, *(t for t in self.feedback_from if t != self.deploy_target)]

    def method_section(self) -> StepSection:
        """The step section of the improve stage's method (``ppo``, ``dpo``, ...)."""
        return getattr(self, self.improve.method)

    def retry_delays(self) -> list[float]:
        """Seconds before each retry: exponential backoff from retry_delay_s."""
        return [self.retry_delay_s * 2**i for i in range(self.stage_retries)]


STEP_SECTIONS = ("sample", "pm", *METHODS, "evaluate")
"""the sections of the stages that run a worker step (``StepSection``)"""


def merge_params(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` deep-merged into it (a section merges field by field; step_deployments is
    replaced whole)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "step_deployments":
            out[key] = merge_params(out[key], value)
        else:
            out[key] = value
    return out


def load_defaults(path: str | Path | None) -> CycleSettings:
    """The server's default cycle settings: the JSON file at ``path``, or the built-in ones. Every
    section is checked, each step section's ``config`` against its step (imports every step's module)."""
    if path is None:
        return CycleSettings()
    return _validated(read_cycle_config(path), f"cycle config {path} is invalid")


OWN_NAMES = ("prompt_set", "evaluate.prompt_set", "pm.name", "pm.test_name", "snapshot_name")
"""the names of what a cycle reads or registers that are its deployment target's own unless set explicitly
(a target other than "default": ``<name>@<target>``)"""


def cycle_target(defaults: CycleSettings, params: dict[str, Any] | None, target: str | None = None) -> str:
    """The deployment target a cycle runs for: ``target`` when given, else the params' ``deploy_target``, else
    the defaults'. ``InvalidInput`` when ``target`` and the params' ``deploy_target`` differ: which one the
    trigger meant cannot be told."""
    asked = (params or {}).get("deploy_target")
    if target is not None and asked is not None and asked != target:
        message = f"the trigger's target {target!r} and params.deploy_target {asked!r} differ: give one of them"
        raise InvalidInput(message, [{"field": "params.deploy_target", "message": message}])
    if target is not None:
        return target
    return asked if isinstance(asked, str) else defaults.deploy_target


def with_own_names(data: dict[str, Any], explicit: dict[str, Any], target: Any) -> dict[str, Any]:
    """``data`` (merged settings) with each of ``OWN_NAMES`` that ``explicit`` (what the server's file and the
    trigger's params set) does not set made the target's own: ``<name>@<target>``. The default target's names,
    names set explicitly, None (``evaluate.prompt_set``: the training set) and names already ending in
    ``@<target>`` are left as they are, so resolving resolved settings again changes nothing."""
    if target == DEFAULT_TARGET or not isinstance(target, str):
        return data
    data = copy.deepcopy(data)  # the caller's dicts stay as they were
    for dotted in OWN_NAMES:
        *sections, field = dotted.split(".")
        where = data
        for section in sections:
            where = where.setdefault(section, {})
        name = where.get(field)
        if _is_set(explicit, dotted) or not isinstance(name, str) or name.endswith(f"@{target}"):
            continue
        where[field] = f"{name}@{target}"
    return data


def _is_set(data: dict[str, Any], dotted: str) -> bool:
    """Whether the nested dicts ``data`` hold the dotted key (``pm.name``)."""
    *sections, field = dotted.split(".")
    for section in sections:
        data = data.get(section) if isinstance(data, dict) else None
    return isinstance(data, dict) and field in data


def resolve(defaults: CycleSettings, params: dict[str, Any] | None, *, trusted: bool = False,
            target: str | None = None) -> CycleSettings:
    """``defaults`` overridden by a trigger's ``params`` (deep merge), validated, for the deployment target
    ``target`` (None: the params' ``deploy_target``, else the defaults'; ``cycle_target``).

    Untrusted params (from the API or a scheduled run) may not set the
    server-only fields; ``InvalidInput`` names every bad field. For a
    target other than "default", the names in ``OWN_NAMES`` neither the
    server's file nor the params set become the target's own
    (``with_own_names``).

    ``defaults`` are taken as checked (``load_defaults`` checks every
    section; the built-in ones are valid), so the step sections checked
    against their steps are only those the params can have made invalid
    (``touched_steps``), and resolving params that touch none imports no
    worker step. The rest of the settings (the sections of no step, the
    top-level fields, and what spans sections, such as ``step_deployments``
    naming the method's step) is validated whole every time: it costs no
    import.
    """
    params = params or {}
    if not trusted:
        locked = [f for f in SERVER_ONLY_FIELDS if f in params]
        if locked:
            raise InvalidInput(
                "these cycle settings come from the server's RATCHET_CYCLE_CONFIG only",
                [{"field": f"params.{f}", "message": "may not be set by a trigger"} for f in locked],
            )
    data = merge_params(defaults.model_dump(), params)
    if target is not None:
        data["deploy_target"] = cycle_target(defaults, params, target)
    explicit = merge_params(defaults.model_dump(exclude_unset=True), params)
    data = with_own_names(data, explicit, data.get("deploy_target"))
    return _validated(data, "invalid cycle params", prefix="params.", steps=touched_steps(params, data))


def touched_steps(params: dict[str, Any], data: dict[str, Any]) -> tuple[str, ...]:
    """The step sections whose check ``params`` can change, over checked defaults: those they set, and the
    section of the improve method when they choose one.

    A section's check reads that section alone (its ``config`` against its
    step, with its own ``cycle_defaults``), so no other override can make
    it invalid. Choosing the method is checked anyway: it is what makes a
    method's section the one the cycle runs, and the section may come from
    settings built in code (the demo's) rather than from ``load_defaults``.
    ``data`` is the merged settings, where the chosen method is read.
    """
    touched = [name for name in STEP_SECTIONS if name in params]
    improve = params.get("improve")
    if isinstance(improve, dict) and "method" in improve:
        method = (data.get("improve") or {}).get("method")
        if method in METHODS and method not in touched:
            touched.append(method)
    return tuple(touched)


def _validated(data: dict[str, Any], what: str, prefix: str = "",
               steps: tuple[str, ...] = STEP_SECTIONS) -> CycleSettings:
    """``data`` as settings, the ``config`` of each step section in ``steps`` checked against the step's config
    dataclass (importing the step's module); ``InvalidInput`` names every bad field."""
    data, settings, problems = with_improve(data), None, []
    try:
        settings = CycleSettings.model_validate(data)
    except ValidationError as exc:
        problems = _errors(exc, prefix=prefix)
    for name in steps:
        section_type = type(CycleSettings.model_fields[name].default)
        try:
            section = section_type.model_validate(data.get(name, {}))
        except ValidationError:
            continue  # reported above
        problems += section.check(prefix + name)
    if problems:
        raise InvalidInput(what, problems)
    return settings


def with_improve(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the ppo section's ``init`` and ``kl_anchor`` (where the ppo stage kept them before the
    improve stage had a method) moved to ``improve``, where they win over what is there: they were set."""
    data = dict(data)
    ppo = dict(data.get("ppo") or {})
    moved = {key: ppo.pop(key) for key in ("init", "kl_anchor") if key in ppo}
    if moved:
        data["ppo"], data["improve"] = ppo, {**(data.get("improve") or {}), **moved}
    return data


LATER_FIELDS = ("snapshot_name", "feedback_from")
"""top-level fields added after cycles were first recorded (with several deployment targets)"""


def with_later_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Settings as an open stage recorded them, with each of ``LATER_FIELDS`` they lack at its default: what a
    cycle recorded before the field existed ran with (its snapshot was named ``comparisons``, and took every
    answer while one target was all there was), so a re-run does not see it as changed."""
    missing = {name: CycleSettings.model_fields[name].get_default(call_default_factory=True)
               for name in LATER_FIELDS if name not in data}
    return {**data, **missing}


def recorded(data: dict[str, Any]) -> CycleSettings:
    """Settings as an open stage recorded them; a section written before ``config`` existed (its step's fields
    beside its own, others under ``extra``) is read with those fields moved under ``config``, and a cycle opened
    before the improve stage had methods (``ppo.init``, ``ppo.kl_anchor``) with them under ``improve``."""
    data = with_improve(data)
    for name in STEP_SECTIONS:
        section = dict(data.get(name) or {})
        own = type(CycleSettings.model_fields[name].default).model_fields
        moved = {key: section.pop(key) for key in list(section) if key not in own and key != "extra"}
        if moved or "extra" in section:
            section["config"] = {**section.get("config", {}), **moved, **section.pop("extra", {})}
        data[name] = section
    return CycleSettings.model_validate(data)


def describe(settings: CycleSettings) -> list[str]:
    """The settings as ``ratchet cycle defaults`` prints them: every field, its value and its documentation,
    each step section's worker config field by field (imports the steps' modules: torch)."""
    from orchestrator.runners import config_class
    from workers.common.config import field_docs

    def entry(indent: str, name: str, value: Any, doc: str | None) -> list[str]:
        return [f"{indent}{name} = {json.dumps(value, default=str)}", *([f"{indent}    {doc}"] if doc else [])]

    def entries(model: BaseModel, indent: str, section_name: str = "") -> list[str]:
        lines = []
        for name, field in type(model).model_fields.items():
            value, doc = getattr(model, name), " ".join((field.description or "").split())
            if name == "config" and isinstance(model, StepSection):
                step = config_class(model.step)
                docs = field_docs(step)
                lines.append(f"{indent}config ({step.__module__}.{step.__name__}; the stage sets "
                             f"{', '.join(model.set_by_stage)}):")
                for key, setting in settings.step_config(section_name).items():
                    mark = "  # this cycle's" if key in model.config else ""
                    lines += entry(indent + "    ", f"{key}", setting, docs.get(key))
                    lines[-1 if key not in docs else -2] += mark
            elif isinstance(value, BaseModel):
                lines += [f"{indent}{name}:  # {doc}", *entries(value, indent + "    ", name)]
            else:
                lines += entry(indent, name, value, doc)
        return lines

    return entries(settings, "")


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
