"""The machinery every stage of a cycle runs on: its env, its context, the stage protocol.

Each stage is idempotent on (cycle, stage):

1. ``run_stage`` skips a stage whose stage run succeeded (or was skipped)
   and returns the outputs it recorded; otherwise it marks the stage running.
2. The stage does its work. Worker output directories are keyed by
   (target, week, stage), so a step re-run after a crash resumes or reuses
   what it wrote; uploads go to keys of the same (target, week, stage), so a
   re-upload lands on the same artifact (``CycleContext.step_request``: the
   default target's keys are ``<week>:<stage>`` and ``cycles/<week>/<stage>``,
   another target's ``<week>@<target>:<stage>`` and
   ``cycles/<target>/<week>/<stage>``).
3. ``CycleContext.commit`` registers the stage's versions (datasets, PMs,
   policies, deployments, tasks) and marks the stage succeeded with its
   outputs in ONE transaction, holding the stage row's lock. A crash
   before the commit leaves no version; a crash after it leaves a finished
   stage that the re-run skips. No version is ever written twice.

Only the orchestrator writes to the store; workers are handed their input
artifacts by config field (a runner turns them into paths) and return
checksums and metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
import traceback
from collections.abc import Callable
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from orchestrator.alerts import deliver as deliver_alerts, stage_failed
from orchestrator.faults import kill_point
from orchestrator.outputs import OpenOutputs, StageOutputs
from orchestrator.runners import DeploymentRunner, InProcessRunner, StepOutcome, StepRequest, StepRunner, cycle_tags
from orchestrator.settings import CycleSettings
from store.artifacts import ArtifactRef, ArtifactStore, get_artifact
from store.cycles import (
    DEFAULT_TARGET,
    CycleNotRunning,
    claim_cycle,
    cycle_label,
    current_attempt,
    finish_cycle,
    finish_stage,
    get_cycle,
    get_stage,
    lock_running,
    open_cycle,
    start_stage,
)
from store.db import Database
from store.errors import InvalidInput, NotFound
from store.models import Policy, PreferenceModel, utcnow
from workers.common.stopping import stop_when

log = logging.getLogger("ratchet.cycle")

STAGES = ("open", "sample", "gather", "snapshot", "train_pm", "improve", "evaluate", "human_eval", "gate", "deploy")
"""the stages of a cycle, in order"""

DONE = ("succeeded", "skipped")
"""stage statuses a re-run does not repeat"""

O = TypeVar("O", bound=StageOutputs)


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
            return DeploymentRunner(self.artifacts, settings.step_deployments, work_pool=settings.work_pool,
                                    poll_interval_s=settings.step_poll_interval_s)
        return InProcessRunner(self.artifacts, self.work_dir, num_threads=settings.num_threads)


class CycleFinished(Exception):
    """The (target, week)'s cycle already finished; nothing to run."""

    def __init__(self, cycle_id: int, week: str, status: str, target: str = DEFAULT_TARGET):
        super().__init__(f"cycle {cycle_label(week, target)} already {status}")
        self.cycle_id, self.week, self.status, self.target = cycle_id, week, status, target


def claim(env: CycleEnv, *, week: str, params: dict[str, Any] | None, trigger: str, flow_run_id: str | None,
          target: str = DEFAULT_TARGET) -> int:
    """The cycle of (``target``, ``week``) (created, or found: one per target and week), claimed by this flow run
    in its own transaction, so a failure of its open stage is recorded against it; ``CycleFinished`` when it
    already finished."""
    with env.database.session() as session:
        cycle, created = open_cycle(session, week=week, target=target, trigger=trigger, params=params or {})
        if cycle.status in ("succeeded", "cancelled"):
            raise CycleFinished(cycle.id, week, cycle.status, target)
        claim_cycle(session, cycle_id=cycle.id, flow_run_id=flow_run_id)
        if not created and params and params != cycle.params:
            option = "" if target == DEFAULT_TARGET else f" --target {target}"
            log.warning("cycle %s runs with params %s; ignoring the new params %s (to change a failed or cancelled "
                        "cycle's settings: `ratchet cycle rerun --week %s%s --param key=value`)",
                        cycle_label(week, target), cycle.params, params, week, option)
        return cycle.id


class CycleContext:
    """One cycle in flight: its id, week and deployment target, its env, and (once its open stage recorded them)
    its settings."""

    def __init__(self, env: CycleEnv, *, cycle_id: int, week: str, target: str = DEFAULT_TARGET):
        self.env = env
        self.cycle_id = cycle_id
        self.week = week
        self.target = target

    @property
    def db(self) -> Database:
        return self.env.database

    @property
    def label(self) -> str:
        """How messages name the cycle: ``2026-W48``, or ``2026-W48@<target>`` for a target other than the default."""
        return cycle_label(self.week, self.target)

    @property
    def folder(self) -> str:
        """The artifact folder of the cycle: ``cycles/<week>`` for the default target (as before targets),
        ``cycles/<target>/<week>`` for another, so two targets' cycles of a week never share a key. (No default
        folder's second part can be a week label, so the two forms never meet.)"""
        return f"cycles/{self.week}" if self.target == DEFAULT_TARGET else f"cycles/{self.target}/{self.week}"

    @cached_property
    def settings(self) -> CycleSettings:
        """The settings the open stage resolved and recorded (every re-run uses them)."""
        return self.outputs("open", OpenOutputs).settings

    @cached_property
    def runner(self) -> StepRunner:
        return self.env.runner_for(self.settings)

    @cached_property
    def attempt(self) -> int:
        """The cycle's attempt this run belongs to: 1, or the number of an operator's re-run."""
        with self.db.session() as session:
            row = current_attempt(session, self.cycle_id)
            return row.number if row is not None else 1

    @cached_property
    def restarted_at(self) -> datetime | None:
        """When an operator's re-run (attempt 2 on) was asked for; None in the first attempt. A wait for
        labelers run again counts its deadline from here, not from when its tasks first appeared."""
        with self.db.session() as session:
            row = current_attempt(session, self.cycle_id)
            return row.created_at if row is not None and row.number > 1 else None

    def wait_from(self, since: datetime) -> datetime:
        """Where a deadline counts from: ``since``, or the re-run's request if that came later."""
        return since if self.restarted_at is None else max(since, self.restarted_at)

    @cached_property
    def eval_task_floor(self) -> int | None:
        """Eval tasks with this id or lower were made for an earlier attempt's candidate (None: none were)."""
        with self.db.session() as session:
            row = current_attempt(session, self.cycle_id)
            return row.eval_task_floor if row is not None else None

    def check_running(self, session: Session) -> None:
        """``CycleNotRunning`` once an operator has cancelled the cycle (a long wait asks at every poll)."""
        cycle = get_cycle(session, self.cycle_id)
        if cycle.status != "running":
            raise CycleNotRunning(f"cycle {self.label} is {cycle.status}: {cycle.reason or 'no reason given'}")

    def still_running(self) -> bool:
        with self.db.session() as session:
            return get_cycle(session, self.cycle_id).status == "running"

    def outputs(self, stage: str, model: type[O]) -> O:
        """The recorded outputs of a finished stage of this cycle, as ``model``."""
        return model.model_validate(self.recorded(stage))

    def recorded(self, stage: str) -> dict[str, Any]:
        """The outputs a finished stage of this cycle recorded, as stored."""
        with self.db.session() as session:
            run = get_stage(session, cycle_id=self.cycle_id, stage=stage)
            if run is None or run.status not in DONE:
                raise NotFound(f"stage {stage!r} of cycle {self.label} has not finished")
            return dict(run.outputs)

    def commit(
        self,
        stage: str,
        register: Callable[[Session], StageOutputs],
        *,
        compute_s: float | None = None,
        status: str = "succeeded",
    ) -> dict[str, Any]:
        """Register the stage's versions and finish the stage with their outputs, in one transaction; returns
        the outputs as stored.

        The cycle row is locked first (``CycleNotRunning`` if an operator
        cancelled it: nothing is registered), then the stage row: if another
        run finished the stage in the meantime, its outputs are returned and
        nothing is registered.
        """
        with self.db.session() as session:
            lock_running(session, self.cycle_id)
            run = get_stage(session, cycle_id=self.cycle_id, stage=stage, for_update=True)
            if run is None:
                raise NotFound(f"stage {stage!r} of cycle {self.label} was never started")
            if run.status in DONE:
                return dict(run.outputs)
            outputs = stored(register(session))
            finish_stage(session, cycle_id=self.cycle_id, stage=stage, outputs=outputs, compute_s=compute_s, status=status)
            kill_point(stage, "in_commit")
        deliver_alerts(self.env)  # what the stage's transaction recorded (orchestrator.alerts); never raises
        return outputs

    def step_request(
        self, stage: str, step: str, config: dict[str, Any], inputs: dict[str, ArtifactRef], outputs: list[str],
        *, input_sets: dict[str, dict[str, ArtifactRef]] | None = None, part: str | None = None,
    ) -> StepRequest:
        """A run of worker ``step`` for ``stage``; its artifacts go under ``<folder>/<stage>``
        (``<folder>/a<n>/<stage>`` in an operator's re-run, attempt n: a stage run again with other
        settings starts from a clean folder, and its outputs never land on the keys of the first attempt's).

        Its key is ``<week>:<stage>`` (``<week>:a<n>:<stage>``) for the default target, as before targets, and
        ``<week>@<target>:<stage>`` for another; ``folder`` is ``cycles/<week>`` or ``cycles/<target>/<week>``.
        Two targets' cycles of one week so never share a step run, an output folder or an artifact.

        ``inputs`` (and ``input_sets``, for a field naming several) are the
        config fields that name an input artifact. A stage that runs a step
        more than once names each further run with a ``part`` (its own key,
        output folder and artifact keys: ``<stage>-<part>``).
        """
        name = stage if part is None else f"{stage}-{part}"
        if self.attempt > 1:
            name = f"a{self.attempt}/{name}"
        return StepRequest(
            step=step,
            key=f"{self.label}:{name.replace('/', ':')}",
            config=config,
            inputs=inputs,
            input_sets=input_sets or {},
            outputs=outputs,
            artifact_prefix=f"{self.folder}/{name}",
            tags=cycle_tags(self.week, self.target),
        )

    def run_step(self, stage: str, request: StepRequest) -> StepOutcome:
        """Run a worker step for ``stage`` with the cycle's runner; it stops at its next unit of work once
        an operator cancels the cycle (``workers.common.stopping``), and then ``CycleNotRunning``."""
        log.info("cycle %s: running %s", self.label, request.step)
        try:
            with stop_when(lambda: not self.still_running()):
                outcome = self.runner.run(request)
        except Exception as exc:
            if not self.still_running():
                raise CycleNotRunning(f"cycle {self.label} stopped running while {request.step} ran; "
                                      f"the step stopped ({type(exc).__name__}: {exc})") from exc
            raise
        kill_point(stage, "ran")
        return outcome

    def read_jsonl(self, ref: ArtifactRef) -> list[dict[str, Any]]:
        """The rows of a JSON-lines artifact (its checksum verified)."""
        data = self.env.artifacts.read_bytes(ref.uri, ref.sha256)
        return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


# -- the stage protocol ------------------------------------------------------------------------


def run_stage(ctx: CycleContext, stage: str, function: Callable[[CycleContext], dict[str, Any]]) -> dict[str, Any]:
    """Run ``stage`` (``function``) unless it is done; record a failure with its error before re-raising.
    Returns the stage's outputs as stored."""
    with ctx.db.session() as session:
        run = get_stage(session, cycle_id=ctx.cycle_id, stage=stage)
        if run is not None and run.status in DONE:
            log.info("cycle %s: stage %s already %s; skipping", ctx.label, stage, run.status)
            return dict(run.outputs)
        lock_running(session, ctx.cycle_id)
        start_stage(session, cycle_id=ctx.cycle_id, stage=stage)
    kill_point(stage, "started")
    try:
        return function(ctx)
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
            stage_failed(session, cycle_id=cycle_id, stage=stage, reason=reason)
    deliver_alerts(env)


def skip_stage(ctx: CycleContext, stage: str, reason: str) -> dict[str, Any]:
    """Record ``stage`` as skipped with ``reason`` (the later stages of a halted cycle), unless it finished."""
    with ctx.db.session() as session:
        run = get_stage(session, cycle_id=ctx.cycle_id, stage=stage)
        if run is not None and run.status in DONE:
            return dict(run.outputs)
        start_stage(session, cycle_id=ctx.cycle_id, stage=stage)
    return ctx.commit(stage, lambda session: StageOutputs(skipped=reason), status="skipped")


# -- values the store takes -------------------------------------------------------------------


def stored(outputs: StageOutputs) -> dict[str, Any]:
    """A stage's outputs as its stage row stores them: the fields the stage set, as JSON."""
    data = outputs.model_dump(mode="json")
    return jsonable({name: value for name, value in data.items() if name in outputs.model_fields_set})


def jsonable(value: Any) -> Any:
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


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics of a step's result, as JSON."""
    return jsonable({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None})


def ref_of(artifact) -> ArtifactRef:
    """An artifact row as the ref a step is handed."""
    return ArtifactRef(uri=artifact.uri, sha256=artifact.sha256, size_bytes=artifact.size_bytes, is_dir=artifact.is_dir)


def artifact_of(session: Session, row: Policy | PreferenceModel, what: str) -> ArtifactRef:
    """The artifact of a policy or PM version; ``InvalidInput`` when it has none."""
    if row.artifact_id is None:
        raise InvalidInput(f"{what} {row.name} v{row.version} has no artifact to load")
    return ref_of(get_artifact(session, row.artifact_id))
