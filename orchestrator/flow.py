"""The Prefect flow ``weekly-cycle``: one task per stage, each idempotent on (cycle, stage).

    open -> sample -> gather -> snapshot -> train_pm -> ppo -> evaluate -> human_eval -> gate -> deploy

The stage logic lives in ``orchestrator.stages`` (plain functions over a
``CycleContext``, run by ``orchestrator.cycle.run_stage``); this module gives each stage a Prefect task with retries
and exponential backoff, derives the week of a scheduled run from its
scheduled start time (scheduled runs get no parameters), marks the cycle
failed after a stage's last retry, and publishes the cycle's report as a
Prefect markdown artifact.

What a cycle runs against (the store, the artifact store, the step runner)
comes from the ``RATCHET_*`` settings, or from ``use_env`` (tests, the demo).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled

from orchestrator.cycle import STAGES, CycleContext, CycleEnv, CycleFinished, fail_cycle, run_stage, skip_stage
from orchestrator.report import cycle_markdown, cycle_summary
from orchestrator.settings import cycle_target, week_of
from orchestrator.stages import STAGE_FUNCTIONS, finish, open_stage
from store.cycles import DEFAULT_TARGET, CycleNotRunning, cycle_label, find_cycle
from store.errors import InvalidInput, NotFound

log = logging.getLogger("ratchet.cycle")

# -- the environment -----------------------------------------------------------------------

_override: list[CycleEnv] = []
_from_settings: dict[tuple, CycleEnv] = {}
_lock = threading.Lock()


@contextmanager
def use_env(env: CycleEnv) -> Iterator[CycleEnv]:
    """Run cycles against ``env`` inside the block (any thread of this process)."""
    _override.append(env)
    try:
        yield env
    finally:
        _override.remove(env)


def current_env() -> CycleEnv:
    """The env of ``use_env``, or one built from the ``RATCHET_*`` settings (one per process)."""
    if _override:
        return _override[-1]
    from orchestrator.hooks import hook_from_settings
    from orchestrator.settings import load_defaults
    from store.artifacts import ArtifactStore
    from store.db import open_database
    from store.settings import get_settings

    settings = get_settings()
    key = (settings.resolved_database_url, settings.resolved_artifacts_url, str(settings.resolved_work_dir))
    with _lock:
        if key not in _from_settings:
            _from_settings[key] = CycleEnv(
                open_database(settings.resolved_database_url),
                ArtifactStore(settings.resolved_artifacts_url),
                work_dir=settings.resolved_work_dir,
                defaults=load_defaults(settings.cycle_config),
                deploy_hook=hook_from_settings(settings),
            )
        return _from_settings[key]


# -- tasks ---------------------------------------------------------------------------------

NOT_RETRYABLE = (InvalidInput, NotFound, CycleNotRunning)
"""errors a retry cannot fix (bad settings, a missing prompt set, a cycle an operator cancelled); a worker's
WorkerError (its config or inputs are wrong: the message says what to fix) too"""


def _retryable(task_, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False) if state is not None else None
    if isinstance(exc, NOT_RETRYABLE):
        return False
    from workers.common.config import WorkerError  # no torch: workers.common.config imports it lazily

    return not isinstance(exc, WorkerError)


@task(name="stage", cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=_retryable)
def stage_task(ctx: CycleContext, stage: str) -> dict[str, Any]:
    """One stage of the cycle (skipped when it already succeeded)."""
    return run_stage(ctx, stage, STAGE_FUNCTIONS[stage])


def _run_name() -> str:
    from prefect.runtime import flow_run

    parameters = flow_run.parameters or {}
    week = parameters.get("week") or week_of(flow_run.scheduled_start_time)
    target = parameters.get("target") or (parameters.get("params") or {}).get("deploy_target") or DEFAULT_TARGET
    return f"cycle-{cycle_label(week, target)}"


def scheduled_week() -> str:
    """The ISO week of this flow run's scheduled start (now, for an unscheduled run)."""
    from prefect.runtime import flow_run

    return week_of(flow_run.scheduled_start_time)


@flow(name="weekly-cycle", flow_run_name=_run_name, log_prints=True, validate_parameters=True)
def weekly_cycle(week: str | None = None, params: dict[str, Any] | None = None, trigger: str | None = None,
                 target: str | None = None) -> dict[str, Any]:
    """One iteration of the loop for ``week`` (default: the week of the scheduled start time) and the deployment
    target ``target`` (default: the params' ``deploy_target``, else the server's; a ``target`` and a params
    ``deploy_target`` that differ are ``InvalidInput``).

    Two runs for the same target and week are one cycle: a finished cycle is
    not run again (its report is returned), a crashed or failed one is
    resumed, and its finished stages are skipped; a resume (no params) of a
    target other than the server's must name it. A cycle an operator cancels
    while it runs ends the flow run Cancelled (calling the flow then raises
    Prefect's ``CancelledRun``).
    """
    from prefect.context import FlowRunContext

    env = current_env()
    week = week or scheduled_week()
    target = cycle_target(env.defaults, params, target)
    run = FlowRunContext.get().flow_run if FlowRunContext.get() else None
    trigger = trigger or ("schedule" if run is not None and run.auto_scheduled else "manual")
    flow_run_id = str(run.id) if run is not None else None
    try:
        ctx = open_stage(env, week=week, params=params, trigger=trigger, flow_run_id=flow_run_id, target=target)
    except CycleFinished as done:
        log.info("cycle %s is already %s; nothing to do", cycle_label(week, target), done.status)
        return cycle_summary(env.database, done.cycle_id)
    except Exception as exc:
        cycle_id = _cycle_id(env, week, target)
        if cycle_id is not None:
            fail_cycle(env, cycle_id, "open", exc)
            _publish(env, cycle_id)
        raise
    stage = "open"
    try:
        for index, stage in enumerate(STAGES[1:], start=1):
            options = {"name": stage, "retries": ctx.settings.stage_retries,
                       "retry_delay_seconds": ctx.settings.retry_delays() or 0}
            outputs = stage_task.with_options(**options)(ctx, stage)
            if outputs.get("halt"):
                # Nothing left to learn this week (no new feedback): the later stages are skipped, not run.
                log.warning("cycle %s: %s; skipping %s", ctx.label, outputs["halt"], ", ".join(STAGES[index + 1 :]))
                for later in STAGES[index + 1 :]:
                    skip_stage(ctx, later, outputs["halt"])
                break
        finish(ctx)
    except Exception as exc:
        # A cancel shows up as CycleNotRunning, or as whatever the stopped step or Prefect raised next.
        cancelled = _cancelled(env, ctx.cycle_id)
        if cancelled is not None:
            log.warning("cycle %s: %s; the flow run ends cancelled (%s: %s)", ctx.label, cancelled, type(exc).__name__,
                        exc)
            return Cancelled(message=f"cycle {ctx.label} {cancelled}")
        if isinstance(exc, CycleNotRunning):
            raise
        fail_cycle(env, ctx.cycle_id, stage, exc)
        raise
    finally:
        _publish(env, ctx.cycle_id)
    return cycle_summary(env.database, ctx.cycle_id)


def _cancelled(env: CycleEnv, cycle_id: int) -> str | None:
    """The reason an operator gave, if the cycle was cancelled (None if not, or if the store cannot say)."""
    from store.cycles import get_cycle

    try:
        with env.database.session() as session:
            cycle = get_cycle(session, cycle_id)
            return (cycle.reason or "cancelled") if cycle.status == "cancelled" else None
    except Exception:  # noqa: BLE001 - the error being handled is the one to raise
        return None


def _cycle_id(env: CycleEnv, week: str, target: str) -> int | None:
    """The id of the cycle of (target, week), or None when there is none (it could not be opened)."""
    with env.database.session() as session:
        cycle = find_cycle(session, week=week, target=target)
        return cycle.id if cycle is not None else None


def report_key(week: str, target: str) -> str:
    """The key of a cycle's Prefect report artifact: ``cycle-<week>`` (lower case) for the default target,
    ``cycle-<target>-<week>`` for another, its target reduced to what a key may hold (lower-case letters, digits
    and dashes), so two targets' reports of one week are two artifacts."""
    if target == DEFAULT_TARGET:
        return f"cycle-{week.lower()}"
    return f"cycle-{re.sub(r'[^a-z0-9-]+', '-', target.lower()).strip('-')}-{week.lower()}"


def _publish(env: CycleEnv, cycle_id: int) -> None:
    """The cycle's report as a Prefect markdown artifact (best effort: the store holds the record)."""
    from prefect.artifacts import create_markdown_artifact

    try:
        summary = cycle_summary(env.database, cycle_id)
        label = cycle_label(summary["week"], summary["deploy_target"])
        create_markdown_artifact(
            markdown=cycle_markdown(summary),
            key=report_key(summary["week"], summary["deploy_target"]),
            description=f"Ratchet cycle {label}: {summary['status']}",
        )
    except Exception:  # noqa: BLE001 - a report must never fail the cycle it reports on
        log.exception("could not publish the report of cycle %s", cycle_id)
