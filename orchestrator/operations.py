"""What an operator does to a cycle, the same whichever way it comes (dashboard, API, CLI).

- ``cancel``: the store marks the cycle cancelled (``store.cycles.cancel_cycle``: its open tasks closed,
  what finished kept, the action recorded with the key), then Prefect is told: the cycle's flow run and the
  worker-step flow runs of its week and deployment target (tags ``week:<week>`` and ``target:<target>``) are
  set to Cancelling, so a Prefect worker running them stops their processes; another target's cycle of the
  same week keeps running. A flow running in a process of its own (``ratchet cycle run``, the
  API's thread) sees the cancel itself: its running step stops at its next unit of work
  (``workers.common.stopping``), its commit registers nothing, and the flow run ends Cancelled. Prefect
  being down does not undo the cancel: the store is the record, and the answer says what Prefect did.
- ``rerun``: the corrected params are merged over the cycle's, resolved and checked as a trigger's are,
  and compared with the settings the cycle ran with; ``orchestrator.rerun.plan_rerun`` picks the stages
  kept and run again, and the store records the new attempt (``store.cycles.rerun_cycle``). The caller then
  starts the flow, which resumes the cycle as after a failure.
"""

from __future__ import annotations

import logging
from typing import Any

from orchestrator.cycle import jsonable
from orchestrator.rerun import plan_rerun
from orchestrator.runners import cycle_tags
from orchestrator.settings import CycleSettings, merge_params, resolve, with_later_fields
from store.cycles import (
    DEFAULT_TARGET,
    cancel_cycle,
    check_rerun,
    current_attempt,
    cycle_label,
    get_cycle,
    rerun_cycle,
)
from store.db import Database
from store.models import Cycle

log = logging.getLogger(__name__)

PREFECT_TIMEOUT_S = 10.0


def cancel(database: Database, *, cycle_id: int, actor: str, api_key_id: int | None = None, via: str = "api",
           reason: str = "", prefect: bool = True) -> dict[str, Any]:
    """Cancel a running or failed cycle; what the store and Prefect did, as plain values."""
    with database.session() as session:
        cycle = cancel_cycle(session, cycle_id=cycle_id, actor=actor, api_key_id=api_key_id, via=via, reason=reason)
        week, target, flow_run_id, why = cycle.week, cycle.deploy_target, cycle.flow_run_id, cycle.reason
    out: dict[str, Any] = {"cycle_id": cycle_id, "week": week, "target": target, "status": "cancelled", "reason": why,
                           "prefect": cancel_flow_runs(week, target, flow_run_id) if prefect else {"asked": False}}
    log.warning("cycle %s cancelled by %s (%s)", cycle_label(week, target), actor, via)
    return out


def cancel_flow_runs(week: str, target: str, flow_run_id: str | None) -> dict[str, Any]:
    """Set the cycle's flow run and the step flow runs of its week and target that have not finished to
    Cancelling (best effort: what was cancelled, or why Prefect could not be asked)."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return {"asked": False, "why": "PREFECT_API_URL is not set"}
    try:
        return {"asked": True, "cancelled": _cancel_runs(week, target, flow_run_id)}
    except Exception as exc:  # noqa: BLE001 - the store already holds the cancel
        log.warning("cycle %s: could not cancel its Prefect flow runs: %s", cycle_label(week, target), exc)
        return {"asked": True, "error": f"{type(exc).__name__}: {exc}"}


def _cancel_runs(week: str, target: str, flow_run_id: str | None) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.states import Cancelling

    cancelled = []
    with get_client(sync_client=True) as client:
        tagged = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"week:{week}"])))
        runs = [run for run in tagged if of_target(run.tags, week, target)]
        if flow_run_id:
            runs.append(client.read_flow_run(flow_run_id))
        for run in runs:
            if run.state is not None and run.state.is_final():
                continue
            message = f"cycle {cycle_label(week, target)} cancelled"
            client.set_flow_run_state(run.id, Cancelling(message=message), force=True)
            cancelled.append(str(run.id))
    return cancelled


def of_target(tags: list[str], week: str, target: str) -> bool:
    """Whether a step flow run tagged ``week:<week>`` belongs to ``target``'s cycle: it carries the cycle's tags
    (``cycle_tags``), or, for the default target, no target tag at all (a step run started before targets)."""
    if set(cycle_tags(week, target)) <= set(tags):
        return True
    return target == DEFAULT_TARGET and not any(tag.startswith("target:") for tag in tags)


def rerun(database: Database, defaults: CycleSettings, *, cycle_id: int, params: dict[str, Any], actor: str,
          trusted: bool, api_key_id: int | None = None, via: str = "api", reason: str = "") -> dict[str, Any]:
    """Record a re-run of a failed or cancelled cycle with ``params`` merged over its own; the plan as plain
    values (``InvalidInput`` for bad params, ``Conflict`` for a cycle that cannot be re-run)."""
    with database.session() as session:
        cycle = get_cycle(session, cycle_id)
        merged, settings, old, plan = _planned(cycle, defaults, params, trusted)
        attempt = rerun_cycle(session, cycle_id=cycle_id, params=merged, settings=settings if old else None,
                              changed=plan.changed, rerun=plan.rerun, actor=actor, api_key_id=api_key_id, via=via,
                              reason=reason)
        return _plan_values(cycle, attempt.number, plan)


def preview_rerun(database: Database, defaults: CycleSettings, *, cycle_id: int, params: dict[str, Any],
                  trusted: bool) -> dict[str, Any]:
    """The plan ``rerun`` would record for these params, checked the same way (``InvalidInput``, ``Conflict``);
    nothing is written (the dashboard's confirmation page shows it)."""
    with database.session() as session:
        cycle = get_cycle(session, cycle_id)
        _, _, _, plan = _planned(cycle, defaults, params, trusted)
        check_rerun(cycle, changed=plan.changed, rerun=plan.rerun)
        latest = current_attempt(session, cycle_id)
        return _plan_values(cycle, (latest.number if latest else 1) + 1, plan)


def _planned(cycle: Cycle, defaults: CycleSettings, params: dict[str, Any] | None, trusted: bool):
    """The merged params, the new resolved settings, the settings the cycle ran with (None if its open stage
    never finished) and the plan."""
    merged = merge_params(dict(cycle.params), params or {})
    settings = jsonable(resolve(defaults, merged, trusted=trusted and cycle.trigger != "api",
                                target=cycle.deploy_target).model_dump(mode="json"))
    runs = {run.stage: run for run in cycle.stages}
    opened = runs.get("open")
    old = opened.outputs.get("settings") if opened is not None and opened.status == "succeeded" else None
    old = with_later_fields(old) if old is not None else None
    return merged, settings, old, plan_rerun(old, settings, {name: run.status for name, run in runs.items()})


def _plan_values(cycle: Cycle, attempt: int, plan) -> dict[str, Any]:
    return {"cycle_id": cycle.id, "week": cycle.week, "target": cycle.deploy_target, "attempt": attempt,
            "changed": plan.changed, "kept": plan.kept, "rerun": plan.rerun, "why": plan.why}
