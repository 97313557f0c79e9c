"""The stages of a weekly cycle, as plain functions over a ``CycleContext``.

Each stage is idempotent on (cycle, stage):

1. ``run_stage`` skips a stage whose stage run succeeded (or was skipped)
   and returns the outputs it recorded; otherwise it marks the stage running.
2. The stage does its work. Worker output directories are keyed by
   (week, stage), so a step re-run after a crash resumes or reuses what it
   wrote; uploads go to keys of the same (week, stage), so a re-upload lands
   on the same artifact.
3. ``CycleContext.commit`` registers the stage's versions (datasets, PMs,
   policies, deployments, tasks) and marks the stage succeeded with its
   outputs in ONE transaction, holding the stage row's lock. A crash
   before the commit leaves no version; a crash after it leaves a finished
   stage that the re-run skips. No version is ever written twice.

Only the orchestrator writes to the store; workers get artifact URIs (a
runner turns them into paths) and return checksums and metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.faults import kill_point
from orchestrator.elo import Match, fit_elo
from orchestrator.gate import GateConfig, GateInput, HumanVerdict, PMEvidence, decide
from orchestrator.hooks import deploy_event
from orchestrator.runners import DeploymentRunner, InProcessRunner, StepOutcome, StepRequest, StepRunner
from orchestrator.settings import CycleSettings, resolve
from store.artifacts import ArtifactRef, ArtifactStore, get_artifact, register_artifact
from store.cycles import claim_cycle, finish_cycle, finish_stage, get_cycle, get_stage, open_cycle, start_stage
from store.datasets import create_dataset, get_dataset, get_dataset_version, snapshot_comparisons
from store.db import Database
from store.deployments import active_deployment, cycle_deployment, deploy, deployed_policy_ids
from store.errors import InvalidInput, NotFound
from store.feedback import count_comparisons
from store.models import Cycle, Policy, PreferenceModel, StageRun, utcnow
from store.pms import create_pm, get_pm, get_pm_version
from store.policies import create_policy, get_policy, get_policy_version
from store.tasks import close_tasks, create_tasks, eval_judgements, eval_tasks_of, task_counts

log = logging.getLogger("ratchet.cycle")

STAGES = ("open", "sample", "gather", "snapshot", "train_pm", "ppo", "evaluate", "human_eval", "gate", "deploy")
"""the stages of a cycle, in order"""

DONE = ("succeeded", "skipped")
"""stage statuses a re-run does not repeat"""


# -- what a cycle runs against -----------------------------------------------------------


class CycleEnv:
    """The store, the artifact store, where steps run, and the server's default settings."""

    def __init__(
        self,
        database: Database,
        artifacts: ArtifactStore,
        *,
        work_dir: str | Path,
        defaults: CycleSettings | None = None,
        runner: StepRunner | None = None,
        deploy_hook: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        clock: Callable[[], datetime] = utcnow,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.database = database
        self.artifacts = artifacts
        self.work_dir = Path(work_dir)
        self.defaults = defaults or CycleSettings()
        self._runner = runner
        self.deploy_hook = deploy_hook
        self.clock = clock
        self.sleep = sleep

    def runner_for(self, settings: CycleSettings) -> StepRunner:
        """The runner the cycle's settings ask for (a runner given to the env wins: tests)."""
        if self._runner is not None:
            return self._runner
        if settings.runner == "deployment":
            return DeploymentRunner(self.artifacts, settings.step_deployments, work_pool=settings.work_pool)
        return InProcessRunner(self.artifacts, self.work_dir, num_threads=settings.num_threads)


class CycleContext:
    """One cycle in flight: its id and week, its resolved settings, its env."""

    def __init__(self, env: CycleEnv, *, cycle_id: int, week: str, settings: CycleSettings):
        self.env = env
        self.cycle_id = cycle_id
        self.week = week
        self.settings = settings
        self.runner = env.runner_for(settings)

    @property
    def db(self) -> Database:
        return self.env.database

    def outputs(self, stage: str) -> dict[str, Any]:
        """The recorded outputs of a finished stage of this cycle."""
        with self.db.session() as session:
            run = get_stage(session, cycle_id=self.cycle_id, stage=stage)
            if run is None or run.status not in DONE:
                raise NotFound(f"stage {stage!r} of cycle {self.week} has not finished")
            return dict(run.outputs)

    def commit(
        self,
        stage: str,
        register: Callable[[Session], dict[str, Any]],
        *,
        compute_s: float | None = None,
        status: str = "succeeded",
    ) -> dict[str, Any]:
        """Register the stage's versions and finish the stage, in one transaction.

        The stage row is locked first: if another run finished the stage in
        the meantime, its outputs are returned and nothing is registered.
        """
        with self.db.session() as session:
            run = get_stage(session, cycle_id=self.cycle_id, stage=stage, for_update=True)
            if run is None:
                raise NotFound(f"stage {stage!r} of cycle {self.week} was never started")
            if run.status in DONE:
                return dict(run.outputs)
            outputs = _jsonable(register(session))
            finish_stage(session, cycle_id=self.cycle_id, stage=stage, outputs=outputs, compute_s=compute_s, status=status)
            kill_point(stage, "in_commit")
        return outputs

    def run_step(
        self, stage: str, step: str, config: dict[str, Any], inputs: list[ArtifactRef], outputs: list[str],
        *, part: str | None = None,
    ) -> StepOutcome:
        """Run a worker step for ``stage`` with the cycle's runner; its artifacts go under ``cycles/<week>/<stage>``.

        A stage that runs a step more than once names each further run with a
        ``part`` (its own key, output folder and artifact keys: ``<stage>-<part>``).
        """
        name = stage if part is None else f"{stage}-{part}"
        request = StepRequest(
            step=step,
            key=f"{self.week}:{name}",
            config=config,
            inputs=inputs,
            outputs=outputs,
            artifact_prefix=f"cycles/{self.week}/{name}",
        )
        log.info("cycle %s: running %s", self.week, step)
        outcome = self.runner.run(request)
        kill_point(stage, "ran")
        return outcome


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON the store's JSON columns take: NaN and infinities become None
    (PostgreSQL refuses them), numpy scalars become numbers."""
    return _finite(json.loads(json.dumps(value, default=_json_default)))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, datetime):
        return obj.isoformat()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _ref(artifact) -> ArtifactRef:
    return ArtifactRef(uri=artifact.uri, sha256=artifact.sha256, size_bytes=artifact.size_bytes, is_dir=artifact.is_dir)


def _artifact_of(session: Session, row: Policy | PreferenceModel, what: str) -> ArtifactRef:
    if row.artifact_id is None:
        raise InvalidInput(f"{what} {row.name} v{row.version} has no artifact to load")
    return _ref(get_artifact(session, row.artifact_id))


def _seed(*parts: Any) -> int:
    """A stable 31-bit seed from ``parts`` (the cycle's week and a stage's own seed)."""
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:4], "big") >> 1


def _unit(*parts: Any) -> float:
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "big") / 2**64


def _worker_common(settings: CycleSettings) -> dict[str, Any]:
    return {"device": settings.device, "progress": False}


# -- open ------------------------------------------------------------------------------------


class CycleFinished(Exception):
    """The week's cycle already finished; nothing to run."""

    def __init__(self, cycle_id: int, week: str, status: str):
        super().__init__(f"cycle {week} already {status}")
        self.cycle_id, self.week, self.status = cycle_id, week, status


def open_stage(env: CycleEnv, *, week: str, params: dict[str, Any] | None, trigger: str, flow_run_id: str | None) -> CycleContext:
    """Open (or resume) the week's cycle and record what it runs with.

    The cycle row is created (or found: one per week) and claimed by this
    flow run in its own transaction, so a failure of the open stage is
    recorded against it. The open stage then fixes, once, what every later
    stage and every re-run uses: the resolved settings, the deployed
    (baseline) policy, the reference policy, the prompt sets.
    """
    with env.database.session() as session:
        cycle, created = open_cycle(session, week=week, trigger=trigger, params=params or {})
        if cycle.status in ("succeeded", "cancelled"):
            raise CycleFinished(cycle.id, week, cycle.status)
        claim_cycle(session, cycle_id=cycle.id, flow_run_id=flow_run_id)
        cycle_id = cycle.id
        if not created and params and params != cycle.params:
            log.warning("cycle %s was opened with params %s; ignoring the new params %s", week, cycle.params, params)
        run = get_stage(session, cycle_id=cycle_id, stage="open")
        if run is not None and run.status in DONE:
            settings = CycleSettings.model_validate(run.outputs["settings"])
            return CycleContext(env, cycle_id=cycle_id, week=week, settings=settings)
        start_stage(session, cycle_id=cycle_id, stage="open")
    kill_point("open", "started")
    try:
        with env.database.session() as session:
            cycle = get_cycle(session, cycle_id)
            settings = resolve(env.defaults, cycle.params, trusted=cycle.trigger != "api")
        ctx = CycleContext(env, cycle_id=cycle_id, week=week, settings=settings)
        ctx.commit("open", lambda session: _open_outputs(session, settings, week, cycle_id))
    except Exception as exc:
        record_failure(env, cycle_id, "open", exc)
        raise
    return ctx


def _open_outputs(session: Session, settings: CycleSettings, week: str, cycle_id: int) -> dict[str, Any]:
    active = active_deployment(session, name=settings.deploy_target)
    if active is None:
        raise InvalidInput(
            f"nothing is deployed on target {settings.deploy_target!r}: register and deploy an initial policy first "
            "(`ratchet demo` does this for the demo world)"
        )
    baseline = get_policy(session, active.policy_id)
    if settings.reference_policy:
        name, _, version = settings.reference_policy.partition(":")
        reference = get_policy_version(session, name=name, version=int(version.lstrip("v")) if version else None)
    else:
        reference = get_policy(session, baseline.reference_policy_id) if baseline.reference_policy_id else baseline
    if settings.pm.base_policy:
        name, _, version = settings.pm.base_policy.partition(":")
        pm_base = get_policy_version(session, name=name, version=int(version.lstrip("v")) if version else None)
    else:
        pm_base = reference
    prompts = get_dataset_version(session, name=settings.prompt_set)
    if prompts.kind != "prompts" or prompts.artifact_id is None:
        raise InvalidInput(f"dataset {prompts.name} v{prompts.version} is a {prompts.kind} dataset, not a prompt set")
    eval_prompts = prompts
    if settings.evaluate.prompt_set:
        try:
            eval_prompts = get_dataset_version(session, name=settings.evaluate.prompt_set)
        except NotFound:
            log.warning("no prompt set %r: evaluating on %r", settings.evaluate.prompt_set, settings.prompt_set)
    warm = {}
    if settings.pm.warm_start:
        for role, name in (("train", settings.pm.name), ("test", settings.pm.test_name)):
            try:
                warm[role] = get_pm_version(session, name=name).id
            except NotFound:
                pass
    for row, what in ((baseline, "deployed policy"), (reference, "reference policy"), (pm_base, "PM base policy")):
        _artifact_of(session, row, what)
    return {
        "settings": settings.model_dump(mode="json"),
        "week": week,
        "deployment_id": active.id,
        "baseline_policy_id": baseline.id,
        "reference_policy_id": reference.id,
        "pm_base_policy_id": pm_base.id,
        "policy_name": settings.policy_name or baseline.name,
        "sample_policy_ids": deployed_policy_ids(session, name=settings.deploy_target, limit=settings.sample.snapshots),
        # earlier deployed snapshots a top-up round may add (most recent first)
        "top_up_policy_ids": deployed_policy_ids(
            session, name=settings.deploy_target, limit=settings.sample.snapshots + settings.sample.top_up_rounds
        )[settings.sample.snapshots :],
        "prompt_dataset_id": prompts.id,
        "eval_prompt_dataset_id": eval_prompts.id,
        "warm_start_pm_ids": warm,
        "opened_at": get_cycle(session, cycle_id).created_at.isoformat(),
    }


# -- the generic stage wrapper -----------------------------------------------------------------


def run_stage(ctx: CycleContext, stage: str) -> dict[str, Any]:
    """Run ``stage`` unless it is done; record a failure with its error before re-raising."""
    with ctx.db.session() as session:
        run = get_stage(session, cycle_id=ctx.cycle_id, stage=stage)
        if run is not None and run.status in DONE:
            log.info("cycle %s: stage %s already %s; skipping", ctx.week, stage, run.status)
            return dict(run.outputs)
        start_stage(session, cycle_id=ctx.cycle_id, stage=stage)
    kill_point(stage, "started")
    try:
        return STAGE_FUNCTIONS[stage](ctx)
    except Exception as exc:
        record_failure(ctx.env, ctx.cycle_id, stage, exc)
        raise


def record_failure(env: CycleEnv, cycle_id: int, stage: str, exc: BaseException) -> None:
    """Mark a running stage failed with the error (a later attempt restarts it)."""
    error = f"{type(exc).__name__}: {exc}"
    log.error("stage %s failed: %s\n%s", stage, error, "".join(traceback.format_exception(exc))[-4000:])
    try:
        with env.database.session() as session:
            run = get_stage(session, cycle_id=cycle_id, stage=stage)
            if run is not None and run.status == "running":
                finish_stage(session, cycle_id=cycle_id, stage=stage, status="failed", error=error[:10_000])
    except Exception:  # noqa: BLE001 - the original error is the one to report
        log.exception("could not record the failure of stage %s", stage)


def fail_cycle(env: CycleEnv, cycle_id: int, stage: str, exc: BaseException) -> None:
    """The final failure: the cycle is failed, with the stage and its error as the reason."""
    reason = f"stage {stage} failed: {type(exc).__name__}: {exc}"
    with env.database.session() as session:
        if get_cycle(session, cycle_id).status == "running":
            finish_cycle(session, cycle_id=cycle_id, status="failed", reason=reason[:10_000])


# -- sample ----------------------------------------------------------------------------------


def _read_jsonl(env: CycleEnv, ref: ArtifactRef) -> list[dict[str, Any]]:
    data = env.artifacts.read_bytes(ref.uri, ref.sha256)
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def rank_prompts(prompts: list[dict[str, Any]], *, week: str) -> list[dict[str, Any]]:
    """The prompt set in this week's order: by a hash of (week, id), a different order every week."""
    return sorted(prompts, key=lambda p: _unit("prompts", week, p["id"]))


def choose_prompts(prompts: list[dict[str, Any]], *, n: int | None, week: str) -> list[dict[str, Any]]:
    """This week's prompts: the first ``n`` of ``rank_prompts``; all (in file order) when ``n`` is None."""
    if n is None or n >= len(prompts):
        return prompts
    return rank_prompts(prompts, week=week)[:n]


def storable(text: str) -> str:
    """``text`` as the store and the API accept it: a NUL character (a model can emit one) becomes U+FFFD."""
    return text.replace("\x00", "\ufffd")


def make_tasks(samples: list[dict[str, Any]], *, pairs_per_prompt: int | None, week: str) -> list[dict[str, Any]]:
    """Comparison tasks from the K responses per prompt: pairs of distinct responses.

    Identical responses make no pair (there is nothing to compare). Which
    pairs (when ``pairs_per_prompt`` caps them) and which response is A are
    decided by a hash of (week, prompt, samples), so a re-run makes the same
    tasks. Texts are made storable (``storable``).
    """
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        s = {**s, "prompt": storable(s["prompt"]), "response": storable(s["response"])}
        by_prompt[json.dumps(s["prompt_id"])].append(s)
    tasks = []
    for key, group in by_prompt.items():
        seen: dict[str, dict[str, Any]] = {}
        for s in sorted(group, key=lambda s: (s["policy"], s["sample_index"])):
            seen.setdefault(s["response"], s)
        distinct = list(seen.values())
        pairs = [(a, b) for i, a in enumerate(distinct) for b in distinct[i + 1 :]]
        pairs.sort(key=lambda ab: _unit("pair", week, key, ab[0]["policy"], ab[0]["sample_index"], ab[1]["policy"], ab[1]["sample_index"]))
        if pairs_per_prompt is not None:
            pairs = pairs[:pairs_per_prompt]
        for a, b in pairs:
            if _unit("order", week, key, a["sample_index"], b["sample_index"]) < 0.5:
                a, b = b, a
            tasks.append({
                "prompt_id": str(a["prompt_id"]),
                "prompt": a["prompt"],
                "response_a": a["response"],
                "response_b": b["response"],
                "metadata": {
                    "policy_a": a["policy"], "sample_a": a["sample_index"],
                    "policy_b": b["policy"], "sample_b": b["sample_index"],
                },
            })
    return tasks


def stage_sample(ctx: CycleContext) -> dict[str, Any]:
    """K responses per prompt from the deployed policy (or several recent ones); pairs become tasks.

    A policy that has collapsed to a few distinct responses makes few pairs.
    When the tasks fall short of what gather waits for, the stage samples
    again (``top_up_rounds`` at most), each round with more of this week's
    prompts, a hotter temperature and one more earlier deployed snapshot,
    and pairs the distinct responses of all rounds; if it still falls short,
    its outputs say why.
    """
    opened = ctx.outputs("open")
    s = ctx.settings.sample
    needed = ctx.settings.gather.min_comparisons
    with ctx.db.session() as session:
        prompt_set = get_dataset(session, opened["prompt_dataset_id"])
        prompts_ref = _ref(get_artifact(session, prompt_set.artifact_id))
        policies = {}
        for policy_id in opened["sample_policy_ids"] + opened.get("top_up_policy_ids", []):
            policy = get_policy(session, policy_id)
            policies[f"{policy.name}-v{policy.version}"] = _artifact_of(session, policy, "policy")
    ranked = rank_prompts(_read_jsonl(ctx.env, prompts_ref), week=ctx.week)
    first = s.prompts_per_cycle or len(ranked)
    labels = list(policies)
    samples: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    compute_s = 0.0
    tasks: list[dict[str, Any]] = []
    for r in range(s.top_up_rounds + 1):
        # Round r: the first (r + 1) blocks of this week's prompts, temperature raised r times, r earlier snapshots.
        chosen = ranked[: first * (r + 1)]
        used = labels[: len(opened["sample_policy_ids"]) + r]
        body = "".join(json.dumps({"id": p["id"], "prompt": p["prompt"]}, ensure_ascii=False) + "\n" for p in chosen)
        suffix = "" if r == 0 else f"-r{r}"
        week_prompts = ctx.env.artifacts.put_bytes(f"cycles/{ctx.week}/sample/prompts{suffix}.jsonl", body.encode("utf-8"))
        temperature = s.temperature + r * s.top_up_temperature
        config = {
            "policies": {label: policies[label].uri for label in used},
            "prompts_path": week_prompts.uri,
            "num_samples": s.num_samples,
            "max_new_tokens": s.max_new_tokens,
            "temperature": temperature,
            "top_p": s.top_p,
            "batch_size": s.batch_size,
            "seed": _seed(ctx.week, "sample") if r == 0 else _seed(ctx.week, "sample", r),
            **_worker_common(ctx.settings),
            **s.extra,
        }
        outcome = ctx.run_step("sample", "sample", config, [week_prompts, *(policies[label] for label in used)],
                               ["samples"], part=None if r == 0 else f"top-up-{r}")
        compute_s += outcome.compute_s
        got = _read_jsonl(ctx.env, outcome.outputs["samples"])
        # Each round's sample indices follow the last round's, so (policy, index) names one response.
        samples += [{**row, "sample_index": row["sample_index"] + r * s.num_samples, "round": r} for row in got]
        tasks = make_tasks(samples, pairs_per_prompt=s.pairs_per_prompt, week=ctx.week)
        rounds.append({"chosen": chosen, "used": used, "round": r, "prompts": len(chosen), "policies": used,
                       "temperature": temperature, "responses": len(got), "tasks_so_far": len(tasks),
                       "outcome": outcome, "metrics": _scalar_metrics(outcome.metrics)})
        if len(tasks) >= needed:
            break
    short = None
    if len(tasks) < needed:
        distinct = len({(row["prompt_id"], row["response"]) for row in samples})
        short = (
            f"only {len(tasks)} comparison tasks after {len(rounds) - 1} top-up round(s) ({distinct} distinct "
            f"responses to {len(rounds[-1]['chosen'])} prompts); gather.min_comparisons is {needed}, so gather "
            "ends when every task is answered"
        )
        log.warning("cycle %s: %s", ctx.week, short)
    if len(rounds) == 1:
        samples_ref = rounds[0]["outcome"].outputs["samples"]
    else:
        body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in samples)
        samples_ref = ctx.env.artifacts.put_bytes(f"cycles/{ctx.week}/sample/samples-all.jsonl", body.encode("utf-8"))

    def register(session: Session) -> dict[str, Any]:
        dataset, _ = create_dataset(
            session,
            name="samples",
            kind="samples",
            content_sha256=samples_ref.sha256,
            row_count=len(samples),
            artifact=samples_ref,
            source_dataset_id=opened["prompt_dataset_id"],
            cycle_id=ctx.cycle_id,
            metadata={"week": ctx.week, "prompts": len(rounds[-1]["chosen"]), "num_samples": s.num_samples,
                      "policies": rounds[-1]["used"], "rounds": len(rounds)},
        )
        rows = create_tasks(session, tasks=tasks, cycle_id=ctx.cycle_id, samples_dataset_id=dataset.id)
        return {
            "samples_dataset_id": dataset.id,
            "samples_version": dataset.version,
            "prompts": len(rounds[-1]["chosen"]),
            "responses": len(samples),
            "tasks": len(rows),
            "policies": rounds[-1]["used"],
            "top_up_rounds": len(rounds) - 1,
            "rounds": [{k: v for k, v in r_.items() if k not in ("chosen", "used", "outcome")} for r_ in rounds],
            "short": short,
            "metrics": rounds[0]["metrics"],
        }

    return ctx.commit("sample", register, compute_s=compute_s)


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return _jsonable({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None})


# -- gather ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrivals:
    """What a waiting stage counts: answers so far and the tasks they answer."""

    answers: int
    """comparisons that count towards the minimum"""
    open_tasks: int
    """tasks of this cycle (of the kind waited on) still unanswered"""
    tasks: int
    """tasks of this cycle of that kind, in all"""


@dataclass(frozen=True)
class Waited:
    """How a wait for labelers ended."""

    outcome: str
    """enough (the minimum arrived, and every task with all_tasks), answered (every task answered, or none made,
    with fewer than the minimum: no more can come from this cycle's tasks), or deadline"""
    arrivals: Arrivals
    seconds: float


def wait_for_labelers(
    ctx: CycleContext, count: Callable[[Session], Arrivals], *, minimum: int, all_tasks: bool, deadline: datetime,
    poll_interval_s: float, what: str,
) -> Waited:
    """Poll ``count`` until the wait's outcome can no longer change: enough answers, every task answered, or
    the deadline (the env's clock and sleep, so tests need not wait)."""
    t0 = time.perf_counter()
    while True:
        with ctx.db.session() as session:
            arrived = count(session)
        if arrived.answers >= minimum and (not all_tasks or arrived.open_tasks == 0):
            outcome = "enough"
            break
        if arrived.open_tasks == 0:
            outcome = "answered"
            log.warning("cycle %s: every %s task is answered, with %d of the %d %s wanted; going on",
                        ctx.week, what, arrived.answers, minimum, what)
            break
        remaining = (deadline - ctx.env.clock()).total_seconds()
        if remaining <= 0:
            outcome = "deadline"
            log.warning("cycle %s: deadline reached with %d of %d %s", ctx.week, arrived.answers, minimum, what)
            break
        ctx.env.sleep(min(poll_interval_s, remaining))
    return Waited(outcome=outcome, arrivals=arrived, seconds=time.perf_counter() - t0)


def stage_gather(ctx: CycleContext) -> dict[str, Any]:
    """Wait until ``min_comparisons`` comparisons arrived since the cycle opened (and, with
    ``all_tasks``, every task of the cycle is answered), every task is answered, or the deadline.

    Counted: every comparison in a feedback batch registered since the cycle
    opened, whatever its source (answers to this cycle's tasks through the
    API, imports, other tools), except answers to eval tasks; the snapshot
    takes all batches anyway. Once every task of the cycle is answered the
    stage goes on even short of the minimum: waiting longer could only bring
    imports. The deadline runs from the end of sampling (when the tasks
    appeared), as recorded in the store, so a re-run after a crash keeps the
    same deadline.
    """
    g = ctx.settings.gather
    with ctx.db.session() as session:
        opened_at = get_cycle(session, ctx.cycle_id).created_at
        sampled_at = get_stage(session, cycle_id=ctx.cycle_id, stage="sample").finished_at
    deadline = sampled_at + timedelta(seconds=g.deadline_s)

    def count(session: Session) -> Arrivals:
        tasks = task_counts(session, cycle_id=ctx.cycle_id, kind="train")
        return Arrivals(answers=count_comparisons(session, since=opened_at, training_only=True),
                        open_tasks=tasks["open"], tasks=sum(tasks.values()))

    waited = wait_for_labelers(ctx, count, minimum=g.min_comparisons, all_tasks=g.all_tasks, deadline=deadline,
                               poll_interval_s=g.poll_interval_s, what="comparisons")
    with ctx.db.session() as session:
        tasks = task_counts(session, cycle_id=ctx.cycle_id, kind="train")
    outputs = {
        "comparisons": waited.arrivals.answers,
        "min_comparisons": g.min_comparisons,
        "outcome": waited.outcome,
        "deadline": deadline.isoformat(),
        "tasks": tasks,
        "waited_s": waited.seconds,
    }
    # The wait is labelers' time, not the orchestrator's: it is the stage's own (compute) time.
    return ctx.commit("gather", lambda session: outputs, compute_s=waited.seconds)


# -- snapshot --------------------------------------------------------------------------------


def stage_snapshot(ctx: CycleContext) -> dict[str, Any]:
    """D(k): every feedback batch so far, as a content-addressed comparisons dataset, less eval answers.

    Answers to eval tasks stay out: this cycle's always (they judge its own
    candidate), earlier cycles' unless ``human_eval.train_on``. When there is
    no feedback at all, or no comparison the PMs have not already been
    trained on (the snapshot is a version PMs were trained on), there is
    nothing to learn from: the stage halts the cycle with that reason, and
    the later stages are skipped.
    """
    p = ctx.settings.pm

    def register(session: Session) -> dict[str, Any]:
        try:
            dataset, created = snapshot_comparisons(
                session, artifacts=ctx.env.artifacts, name="comparisons", cycle_id=ctx.cycle_id,
                include_eval=ctx.settings.human_eval.train_on,
            )
        except InvalidInput as exc:
            if not str(exc).startswith("there are no feedback batches"):
                raise
            return {"dataset_id": None, "rows": 0, "new_version": False,
                    "halt": "no feedback: there are no comparisons to train a PM on"}
        outputs = {
            "dataset_id": dataset.id,
            "version": dataset.version,
            "rows": dataset.row_count,
            "batches": dataset.meta.get("batch_count"),
            "excluded_eval_comparisons": dataset.meta.get("excluded_eval_comparisons", 0),
            "new_version": created,
        }
        trained = None if created else session.scalar(
            select(PreferenceModel).where(PreferenceModel.dataset_id == dataset.id, PreferenceModel.name == p.name)
            .order_by(PreferenceModel.version.desc()).limit(1)
        )
        if trained is not None:
            outputs["halt"] = (
                f"no new feedback: comparisons v{dataset.version} ({dataset.row_count} comparisons) is what "
                f"{trained.name} v{trained.version} was trained on; nothing to retrain"
            )
        return outputs

    return ctx.commit("snapshot", register)


# -- train_pm --------------------------------------------------------------------------------


def _split_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    if prefix:
        return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
    return {k: v for k, v in metrics.items() if not k.startswith("test_pm/")}


def stage_train_pm(ctx: CycleContext) -> dict[str, Any]:
    """M(k) and the test PM, on the two halves of D(k) (``TrainPMConfig.two_pms``)."""
    opened, snap = ctx.outputs("open"), ctx.outputs("snapshot")
    p = ctx.settings.pm
    with ctx.db.session() as session:
        dataset = get_dataset(session, snap["dataset_id"])
        data_ref = _ref(get_artifact(session, dataset.artifact_id))
        base = get_policy(session, opened["pm_base_policy_id"])
        base_ref = _artifact_of(session, base, "PM base policy")
        base_name = f"{base.name}:v{base.version}"
        warm = None
        if opened["warm_start_pm_ids"].get("train"):
            warm_pm = get_pm(session, opened["warm_start_pm_ids"]["train"])
            warm = (warm_pm.id, _artifact_of(session, warm_pm, "warm-start PM"))
    config = {
        "model_path": base_ref.uri,
        "dataset_path": data_ref.uri,
        "two_pms": True,
        "heldout_fraction": p.heldout_fraction,
        "batch_size": p.batch_size,
        "learning_rate": p.learning_rate,
        "num_epochs": p.num_epochs,
        "max_steps": p.max_steps,
        "max_length": p.max_length,
        "ensemble_size": p.ensemble_size,
        "test_ensemble_size": p.test_ensemble_size,
        "seed": p.seed,
        **_worker_common(ctx.settings),
        **p.extra,
    }
    inputs = [base_ref, data_ref]
    if warm is not None:
        config["warm_start_path"] = warm[1].uri
        inputs.append(warm[1])
    outcome = ctx.run_step("train_pm", "train_pm", config, inputs, ["pm", "test_pm"])
    metrics = _jsonable(outcome.metrics)

    def register(session: Session) -> dict[str, Any]:
        common = {"dataset_id": dataset.id, "base_model": base_name, "cycle_id": ctx.cycle_id, "config": _jsonable(config)}
        pm = create_pm(
            session, name=p.name, role="train", artifact=outcome.outputs["pm"],
            init_pm_id=warm[0] if warm else None, metrics=_split_metrics(metrics, ""), **common,
        )
        test_pm = create_pm(
            session, name=p.test_name, role="test", artifact=outcome.outputs["test_pm"],
            init_pm_id=warm[0] if warm else None, metrics=_split_metrics(metrics, "test_pm/"), **common,
        )
        return {
            "pm_id": pm.id,
            "pm_version": pm.version,
            "test_pm_id": test_pm.id,
            "test_pm_version": test_pm.version,
            "dataset_id": dataset.id,
            "heldout_accuracy": metrics.get("heldout/accuracy"),
            "heldout_decisive": metrics.get("heldout/decisive", 0),
            "heldout_ece": metrics.get("heldout/ece"),
            "test_pm_heldout_accuracy": metrics.get("test_pm/heldout/accuracy"),
            "test_pm_heldout_decisive": metrics.get("test_pm/heldout/decisive", 0),
            "ensemble_size": p.ensemble_size,
            "ensemble_spread": metrics.get("ensemble/heldout_spread"),
            "train_comparisons": metrics.get("data/train_comparisons"),
        }

    return ctx.commit("train_pm", register, compute_s=outcome.compute_s)


# -- ppo ---------------------------------------------------------------------------------------


def stage_ppo(ctx: CycleContext) -> dict[str, Any]:
    """C(k): PPO from the deployed policy (or the reference) against M(k), with a per-token KL penalty to the
    reference (``ppo.kl_anchor: reference``) or to the deployed policy (``deployed``).

    The candidate's lineage names the cycle's reference policy either way (P0: the root its KL budget and its
    PMs' base are measured from); the anchor the penalty pulled toward is in its config and the stage's outputs.
    """
    opened, pms = ctx.outputs("open"), ctx.outputs("train_pm")
    p = ctx.settings.ppo
    with ctx.db.session() as session:
        init = get_policy(session, opened["baseline_policy_id"] if p.init == "deployed" else opened["reference_policy_id"])
        reference = get_policy(session, opened["reference_policy_id"])
        anchor = get_policy(session, opened["baseline_policy_id"]) if p.kl_anchor == "deployed" else reference
        pm, test_pm = get_pm(session, pms["pm_id"]), get_pm(session, pms["test_pm_id"])
        prompt_set = get_dataset(session, opened["prompt_dataset_id"])
        refs = {
            "init": _artifact_of(session, init, "init policy"),
            "reference": _artifact_of(session, anchor, "KL anchor policy"),
            "pm": _artifact_of(session, pm, "PM"),
            "test_pm": _artifact_of(session, test_pm, "test PM"),
            "prompts": _ref(get_artifact(session, prompt_set.artifact_id)),
        }
        base_model = init.base_model
    config = {
        "policy_path": refs["init"].uri,
        "reference_path": refs["reference"].uri,
        "pm_path": refs["pm"].uri,
        "test_pm_path": refs["test_pm"].uri,
        "prompts_path": refs["prompts"].uri,
        "total_episodes": p.total_episodes,
        "rollout_batch_size": p.rollout_batch_size,
        "mini_batch_size": p.mini_batch_size,
        "ppo_epochs": p.ppo_epochs,
        "response_length": p.response_length,
        "temperature": p.temperature,
        "kl_coef": p.kl_coef,
        "kl_target": p.kl_target,
        "learning_rate": p.learning_rate,
        "lam": p.lam,
        "ensemble_penalty": p.ensemble_penalty,
        "seed": _seed(ctx.week, "ppo", p.seed),
        **_worker_common(ctx.settings),
        **p.extra,
    }
    outcome = ctx.run_step("ppo", "ppo", config, list(refs.values()), ["policy"])
    metrics = _scalar_metrics(outcome.metrics)

    def register(session: Session) -> dict[str, Any]:
        policy = create_policy(
            session,
            name=opened["policy_name"],
            base_model=base_model,
            artifact=outcome.outputs["policy"],
            init_policy_id=init.id,
            reference_policy_id=reference.id,
            pm_id=pms["pm_id"],
            cycle_id=ctx.cycle_id,
            config=_jsonable(config),
            metrics=metrics,
        )
        return {
            "policy_id": policy.id,
            "policy_version": policy.version,
            "init_policy_id": init.id,
            "kl_anchor_policy_id": anchor.id,
            "reward": metrics.get("ppo/reward"),
            "reward_test_pm": metrics.get("ppo/reward_test_pm"),
            "reward_spread": metrics.get("ppo/reward_spread"),
            "kl": metrics.get("ppo/kl"),
            "episodes": metrics.get("ppo/episodes"),
        }

    return ctx.commit("ppo", register, compute_s=outcome.compute_s)


# -- evaluate ----------------------------------------------------------------------------------


def stage_evaluate(ctx: CycleContext) -> dict[str, Any]:
    """The candidate against the deployed policy on held-out prompts, under both PMs (and gold, when known)."""
    opened, pms, ppo = ctx.outputs("open"), ctx.outputs("train_pm"), ctx.outputs("ppo")
    e = ctx.settings.evaluate
    with ctx.db.session() as session:
        refs = {
            "candidate": _artifact_of(session, get_policy(session, ppo["policy_id"]), "candidate policy"),
            "baseline": _artifact_of(session, get_policy(session, opened["baseline_policy_id"]), "deployed policy"),
            "reference": _artifact_of(session, get_policy(session, opened["reference_policy_id"]), "reference policy"),
            "pm": _artifact_of(session, get_pm(session, pms["pm_id"]), "PM"),
            "test_pm": _artifact_of(session, get_pm(session, pms["test_pm_id"]), "test PM"),
            "prompts": _ref(get_artifact(session, get_dataset(session, opened["eval_prompt_dataset_id"]).artifact_id)),
        }
    config = {
        "candidate_path": refs["candidate"].uri,
        "baseline_path": refs["baseline"].uri,
        "reference_path": refs["reference"].uri,
        "pm_path": refs["pm"].uri,
        "test_pm_path": refs["test_pm"].uri,
        "prompts_path": refs["prompts"].uri,
        "max_new_tokens": e.max_new_tokens,
        "temperature": e.temperature,
        "num_samples": e.num_samples,
        "gold": ctx.settings.gold,
        # The same seed every week: both policies answer with the same random numbers, and a policy
        # evaluated in two cycles gets the same samples, so numbers compare across cycles.
        "seed": e.seed,
        **_worker_common(ctx.settings),
        **e.extra,
    }
    outcome = ctx.run_step("evaluate", "evaluate", config, list(refs.values()), ["report", "samples"])
    metrics = _scalar_metrics(outcome.metrics)

    def register(session: Session) -> dict[str, Any]:
        report = register_artifact(session, outcome.outputs["report"])
        samples = register_artifact(session, outcome.outputs["samples"])
        return {"report_artifact_id": report.id, "report_uri": report.uri, "samples_artifact_id": samples.id,
                "candidate_policy_id": ppo["policy_id"], "metrics": metrics}

    return ctx.commit("evaluate", register, compute_s=outcome.compute_s)


# -- human_eval --------------------------------------------------------------------------------


def eval_pairs(samples: list[dict[str, Any]], prompts: dict[str, str], *, week: str,
               max_tasks: int | None) -> tuple[list[dict[str, Any]], int]:
    """Blinded eval tasks from the evaluate step's samples, and how many pairs were identical.

    Each (prompt, sample) whose candidate and deployed-policy responses
    differ is one task; which of the two is A is decided per task by a hash
    of (week, prompt, sample), and recorded only in ``candidate_side`` (the
    task API never shows it). Identical pairs are left out: there is nothing
    to judge. With ``max_tasks`` the first tasks in hash order are kept.
    """
    tasks, identical = [], 0
    for row in samples:
        key = json.dumps(row["prompt_id"])
        candidate, baseline = storable(row["candidate"]["response"]), storable(row["baseline"]["response"])
        if candidate == baseline:
            identical += 1
            continue
        side = "a" if _unit("eval-order", week, key, row.get("sample", 0)) < 0.5 else "b"
        a, b = (candidate, baseline) if side == "a" else (baseline, candidate)
        tasks.append({"prompt_id": str(row["prompt_id"]), "prompt": storable(prompts[key]), "response_a": a,
                      "response_b": b, "candidate_side": side, "rank": _unit("eval-pick", week, key, row.get("sample", 0))})
    tasks.sort(key=lambda t: t.pop("rank"))
    return (tasks if max_tasks is None else tasks[:max_tasks]), identical


def human_matches(session: Session, *, deploy_target: str) -> list[Match]:
    """Every finished human evaluation of the target's cycles, as Elo matches (candidate vs deployed policy)."""
    runs = session.scalars(select(StageRun).where(StageRun.stage == "human_eval", StageRun.status == "succeeded"))
    out = []
    for run in runs:
        o = run.outputs
        if o.get("deploy_target", "default") == deploy_target and o.get("answers"):
            out.append(Match(a=o["candidate_policy_id"], b=o["baseline_policy_id"], wins_a=o["wins"], ties=o["ties"],
                             wins_b=o["losses"]))
    return out


def stage_human_eval(ctx: CycleContext) -> dict[str, Any]:
    """Blinded A/B comparisons of the candidate against the deployed policy by labelers, on held-out prompts.

    1. The eval tasks: the evaluate step's responses of both policies to the
       held-out prompts, paired, A/B order random per task (created once per
       cycle: a re-run finds them).
    2. Wait like gather: ``min_comparisons`` answers (and every task with
       ``all_tasks``), every task answered, or the deadline, counted from when
       the tasks appeared.
    3. The verdict: wins, ties and losses of the candidate (one answer per
       task and rater), and Elo ratings of every policy evaluated so far.
    """
    h = ctx.settings.human_eval
    if not h.enabled:
        outputs = {"enabled": False, "reason": "human evaluation is off (human_eval.enabled): the gate trusts the PMs"}
        return ctx.commit("human_eval", lambda session: outputs, status="skipped")
    opened, evaluation = ctx.outputs("open"), ctx.outputs("evaluate")

    # 1. The eval tasks, once (a re-run finds them; the stage row's lock keeps two runs from both creating them).
    with ctx.db.session() as session:
        samples_ref = _ref(get_artifact(session, evaluation["samples_artifact_id"]))
        prompts_ref = _ref(get_artifact(session, get_dataset(session, opened["eval_prompt_dataset_id"]).artifact_id))
        prompts = {json.dumps(p["id"]): p["prompt"] for p in _read_jsonl(ctx.env, prompts_ref)}
        pairs, identical = eval_pairs(_read_jsonl(ctx.env, samples_ref), prompts, week=ctx.week, max_tasks=h.max_tasks)
        get_stage(session, cycle_id=ctx.cycle_id, stage="human_eval", for_update=True)
        existing = eval_tasks_of(session, cycle_id=ctx.cycle_id)
        if not existing:
            existing = create_tasks(session, tasks=pairs, cycle_id=ctx.cycle_id, kind="eval")
        created_at = min((t.created_at for t in existing), default=ctx.env.clock())
        task_count = len(existing)
    kill_point("human_eval", "tasks")

    # 2. Wait for the labelers.
    deadline = created_at + timedelta(seconds=h.deadline_s)

    def count(session: Session) -> Arrivals:
        tasks = task_counts(session, cycle_id=ctx.cycle_id, kind="eval")
        return Arrivals(answers=len(eval_judgements(session, cycle_id=ctx.cycle_id)), open_tasks=tasks["open"],
                        tasks=sum(tasks.values()))

    waited = wait_for_labelers(ctx, count, minimum=h.min_comparisons, all_tasks=h.all_tasks, deadline=deadline,
                               poll_interval_s=h.poll_interval_s, what="eval answers")

    # 3. The verdict and the Elo ratings.
    with ctx.db.session() as session:
        outcomes = [j.outcome for j in eval_judgements(session, cycle_id=ctx.cycle_id)]
        matches = human_matches(session, deploy_target=ctx.settings.deploy_target)
    wins, ties = sum(o == 1.0 for o in outcomes), sum(o == 0.5 for o in outcomes)
    verdict = {
        "enabled": True,
        "deploy_target": ctx.settings.deploy_target,
        "candidate_policy_id": evaluation["candidate_policy_id"],
        "baseline_policy_id": opened["baseline_policy_id"],
        "tasks": task_count,
        "identical_pairs": identical,
        "answers": len(outcomes),
        "wins": wins,
        "ties": ties,
        "losses": len(outcomes) - wins - ties,
        "win_rate": (wins + 0.5 * ties) / len(outcomes) if outcomes else None,
        "min_comparisons": h.min_comparisons,
        "outcome": waited.outcome,
        "deadline": deadline.isoformat(),
        "waited_s": waited.seconds,
    }
    if outcomes:
        matches.append(Match(a=verdict["candidate_policy_id"], b=verdict["baseline_policy_id"], wins_a=wins,
                             ties=ties, wins_b=verdict["losses"]))
    played = {m.a for m in matches} | {m.b for m in matches}
    # P0 (the reference) at 0; if it never played, the earliest policy that did
    anchor = opened["reference_policy_id"] if opened["reference_policy_id"] in played else None
    ratings = fit_elo(matches, anchor=anchor)
    verdict["elo"] = {str(k): round(v, 1) for k, v in sorted(ratings.items())}
    verdict["elo_candidate"] = verdict["elo"].get(str(verdict["candidate_policy_id"]))
    verdict["elo_baseline"] = verdict["elo"].get(str(verdict["baseline_policy_id"]))
    return ctx.commit("human_eval", lambda session: verdict, compute_s=waited.seconds)


# -- gate --------------------------------------------------------------------------------------


def gate_input(metrics: dict[str, Any], human: dict[str, Any] | None = None,
               pms: dict[str, Any] | None = None) -> GateInput:
    """The gate's measurements: the evaluate step's metrics, the human verdict (None: off), the PMs' held-out accuracy."""
    names = {
        "win_rate_test_pm": "eval/win_rate_test_pm",
        "win_rate_train_pm": "eval/win_rate_train_pm",
        "kl": "eval/kl",
        "test_pm_delta": "eval/test_pm_delta",
        "train_pm_delta": "eval/train_pm_delta",
    }
    missing = [key for key in names.values() if not isinstance(metrics.get(key), (int, float))]
    if missing:
        raise InvalidInput(f"the evaluate step reported no {', '.join(missing)}; the gate cannot decide")
    extra: dict[str, Any] = {}
    if human is not None and human.get("enabled"):
        extra["human"] = HumanVerdict(wins=human["wins"], ties=human["ties"], losses=human["losses"],
                                      required=human["min_comparisons"], tasks=human.get("tasks"),
                                      outcome=human.get("outcome", "deadline"))
    if pms is not None:
        extra["train_pm"] = PMEvidence(accuracy=pms.get("heldout_accuracy"), decisive=pms.get("heldout_decisive") or 0)
        extra["test_pm"] = PMEvidence(accuracy=pms.get("test_pm_heldout_accuracy"),
                                      decisive=pms.get("test_pm_heldout_decisive") or 0)
    return GateInput(**{field: float(metrics[key]) for field, key in names.items()}, **extra)


def stage_gate(ctx: CycleContext) -> dict[str, Any]:
    """Deploy or reject the candidate, with every failed check's reason."""
    evaluation, human, pms = ctx.outputs("evaluate"), ctx.outputs("human_eval"), ctx.outputs("train_pm")
    measured = gate_input(evaluation["metrics"], human, pms)
    scalars = {k: v for k, v in asdict(measured).items() if isinstance(v, float)}
    if any(math.isnan(v) for v in scalars.values()):
        raise InvalidInput(f"the evaluate step reported NaN measurements: {scalars}")
    config = GateConfig(**ctx.settings.gate.model_dump())
    decision = decide(measured, config)
    outputs = {**decision.as_dict(), "measured": asdict(measured), "thresholds": asdict(config),
               "candidate_policy_id": evaluation["candidate_policy_id"]}
    return ctx.commit("gate", lambda session: outputs)


# -- deploy ------------------------------------------------------------------------------------


def stage_deploy(ctx: CycleContext) -> dict[str, Any]:
    """Deploy a candidate that passed the gate, then call the deploy hook.

    The deployment row is committed first (exactly once: a re-run finds the
    cycle's deployment), then the hook runs (at least once), then the stage
    is finished. Nothing is deployed when the gate rejected the candidate,
    or when the deployment changed while the cycle ran (a rollback or another
    deploy): the candidate was judged against a policy no longer serving.
    """
    opened, gate = ctx.outputs("open"), ctx.outputs("gate")
    target = ctx.settings.deploy_target
    if not gate["deploy"]:
        outputs = {"deployed": False, "reasons": gate["reasons"]}
        return ctx.commit("deploy", lambda session: outputs, status="skipped")
    stale = None
    with ctx.db.session() as session:
        deployment = cycle_deployment(session, cycle_id=ctx.cycle_id, name=target)
        active = active_deployment(session, name=target, lock=True)  # held until this deploy commits
        if deployment is None and (active is None or active.id != opened["deployment_id"]):
            stale = (
                f"the deployment of {target!r} changed while the cycle ran (it was deployment "
                f"{opened['deployment_id']}, now {active.id if active else 'none'}); the candidate was judged "
                "against a policy that no longer serves, so it is not deployed"
            )
        elif deployment is None:
            candidate = get_policy(session, gate["candidate_policy_id"])
            deployment = deploy(
                session,
                policy_id=candidate.id,
                name=target,
                reason=f"cycle {ctx.week}: {candidate.name} v{candidate.version} passed the gate ({_evidence(gate)})",
                actor="orchestrator",
                cycle_id=ctx.cycle_id,
            )
        event = deploy_event(session, deployment) if stale is None else None
    if stale is not None:
        outputs = {"deployed": False, "reasons": [stale]}
        return ctx.commit("deploy", lambda session: outputs, status="skipped")
    kill_point("deploy", "deployed")
    hook = None
    if ctx.env.deploy_hook is not None:
        hook = ctx.env.deploy_hook(event)
    outputs = {
        "deployed": True,
        "deployment_id": event["deployment"]["id"],
        "deployment_version": event["deployment"]["version"],
        "policy_id": event["policy"]["id"],
        "policy_version": event["policy"]["version"],
        "hook": hook,
    }
    return ctx.commit("deploy", lambda session: outputs)


def _evidence(gate: dict[str, Any]) -> str:
    """The gate's headline numbers, for a deployment's reason."""
    measures, measured = gate.get("measures", {}), gate["measured"]
    parts = []
    if measures.get("human_win_rate") is not None:
        parts.append(f"human win rate {measures['human_win_rate']:.3f}, lower bound {measures['human_lower_bound']:.3f}")
    parts.append(f"test-PM win rate {measured['win_rate_test_pm']:.3f}, KL {measured['kl']:.4f}")
    return "; ".join(parts)


STAGE_FUNCTIONS: dict[str, Callable[[CycleContext], dict[str, Any]]] = {
    "sample": stage_sample,
    "gather": stage_gather,
    "snapshot": stage_snapshot,
    "train_pm": stage_train_pm,
    "ppo": stage_ppo,
    "evaluate": stage_evaluate,
    "human_eval": stage_human_eval,
    "gate": stage_gate,
    "deploy": stage_deploy,
}


# -- finishing -----------------------------------------------------------------------------------


def skip_stage(ctx: CycleContext, stage: str, reason: str) -> dict[str, Any]:
    """Record ``stage`` as skipped with ``reason`` (the later stages of a halted cycle), unless it finished."""
    with ctx.db.session() as session:
        run = get_stage(session, cycle_id=ctx.cycle_id, stage=stage)
        if run is not None and run.status in DONE:
            return dict(run.outputs)
        start_stage(session, cycle_id=ctx.cycle_id, stage=stage)
    return ctx.commit(stage, lambda session: {"skipped": reason}, status="skipped")


def finish(ctx: CycleContext) -> Cycle:
    """Mark the cycle succeeded (closing its open tasks); a halt or a rejected candidate's reasons become its reason."""
    with ctx.db.session() as session:
        runs = {r.stage: r for r in get_cycle(session, ctx.cycle_id).stages}
        halt = next((runs[st].outputs["halt"] for st in STAGES if st in runs and runs[st].outputs.get("halt")), None)
    reason = halt
    if halt is None:
        deployed = ctx.outputs("deploy")
        if not deployed["deployed"]:
            ppo = ctx.outputs("ppo")
            reason = (
                f"candidate policy {ctx.outputs('open')['policy_name']} v{ppo['policy_version']} was not deployed: "
                + "; ".join(deployed["reasons"])
            )
    with ctx.db.session() as session:
        cycle = get_cycle(session, ctx.cycle_id)
        if cycle.status == "running":
            cycle = finish_cycle(session, cycle_id=ctx.cycle_id, status="succeeded", reason=reason)
        return cycle
