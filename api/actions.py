"""Operators' actions on cycles and deployments, one path for the API and the dashboard's forms.

The API server holds the orchestrator's launcher (``app.state.cycle_launcher``;
the API may not import the orchestrator). Each action on a cycle goes through it,
so a cycle is started, cancelled or re-run by the same store functions
whichever way the operator asked, and the store records the key that did it
(``store.actions``; a start is recorded here, once the launcher created the
cycle). Without a launcher (``RATCHET_CYCLE_LAUNCHER=off``) a
cancel still marks the cycle cancelled in the store (Prefect is not told);
starting and re-running need one: 503. A rollback (``roll_back``) is recorded
by the store too, and tells the deploy hook and sends its alert.
"""

from __future__ import annotations

from typing import Any

from fastapi import BackgroundTasks, FastAPI
from sqlalchemy.orm import Session

from api.deps import Caller
from api.schemas.registry import CycleCancelled, CyclePublic, CycleRerunPlan, CycleStarted
from store.actions import record_action
from store.alerts import deliver_pending
from store.cycles import cancel_cycle, get_cycle
from store.deployments import active_deployment, rollback
from store.errors import Conflict, ServiceUnavailable
from store.models import Deployment

NO_LAUNCHER = (
    "no orchestrator is configured for this API server (RATCHET_CYCLE_LAUNCHER=off), so it cannot {what}: serve it "
    "with RATCHET_CYCLE_LAUNCHER=deployment and PREFECT_API_URL set (or =thread on one machine), or {command}"
)


def launcher_of(app: FastAPI, *, what: str, command: str) -> Any:
    """The app's cycle launcher, or ``ServiceUnavailable`` (503, with Retry-After) saying how to get one
    (``what`` it is needed for, the CLI ``command``)."""
    launcher = getattr(app.state, "cycle_launcher", None)
    if launcher is None:
        raise ServiceUnavailable(NO_LAUNCHER.format(what=what, command=command))
    return launcher


def start(app: FastAPI, caller: Caller, *, week: str, params: dict[str, Any], via: str = "api",
          target: str | None = None) -> CycleStarted:
    """Open the cycle of (target, week) and start it (``target`` None: the launcher takes params.deploy_target,
    else the server's). A start that created the cycle is recorded with the key (one that found the cycle
    already there started nothing), in a transaction of its own once the launcher has opened the cycle: the
    launcher's transaction is the orchestrator's."""
    option = "" if target is None else f" --target {target}"
    launcher = launcher_of(app, what="start cycles",
                           command=f"start the week's cycle with `ratchet cycle run --week {week}{option}`")
    started = launcher(week=week, params=params, actor=caller.name, target=target)
    if started.created:
        with app.state.database.session() as session:
            record_action(session, action="start", subject_kind="cycle", subject_id=started.cycle.id, actor=caller.name,
                          api_key_id=caller.id, via=via,
                          detail={"week": week, "target": started.cycle.deploy_target, "params": params})
    return started


def cancel(app: FastAPI, caller: Caller, *, cycle_id: int, reason: str, via: str) -> CycleCancelled:
    launcher = getattr(app.state, "cycle_launcher", None)
    if launcher is None:
        with app.state.database.session() as session:
            cancel_cycle(session, cycle_id=cycle_id, actor=caller.name, api_key_id=caller.id, via=via, reason=reason)
        prefect: dict[str, Any] = {"asked": False, "why": "no orchestrator is configured for this API server"}
    else:
        prefect = launcher.cancel(cycle_id=cycle_id, actor=caller.name, api_key_id=caller.id, via=via,
                                  reason=reason)["prefect"]
    return CycleCancelled(cycle=_cycle(app, cycle_id), prefect=prefect)


def rerun(app: FastAPI, caller: Caller, *, cycle_id: int, params: dict[str, Any], reason: str,
          via: str) -> CycleRerunPlan:
    with app.state.database.session() as session:
        week = get_cycle(session, cycle_id).week  # NotFound (404) before a 503 about the launcher
    launcher = launcher_of(app, what="re-run cycles", command=f"re-run it with `ratchet cycle rerun --week {week}`")
    plan = launcher.rerun(cycle_id=cycle_id, params=params, actor=caller.name, api_key_id=caller.id, via=via,
                          reason=reason)
    return CycleRerunPlan(cycle=_cycle(app, cycle_id), **{k: plan[k] for k in ("attempt", "changed", "kept", "rerun", "why")})


def preview_rerun(app: FastAPI, *, cycle_id: int, params: dict[str, Any]) -> CycleRerunPlan:
    """The plan a re-run with ``params`` would follow, checked as ``rerun`` checks it; nothing is written."""
    with app.state.database.session() as session:
        week = get_cycle(session, cycle_id).week
    launcher = launcher_of(app, what="re-run cycles", command=f"re-run it with `ratchet cycle rerun --week {week}`")
    plan = launcher.preview_rerun(cycle_id=cycle_id, params=params)
    return CycleRerunPlan(cycle=_cycle(app, cycle_id), **{k: plan[k] for k in ("attempt", "changed", "kept", "rerun", "why")})


def roll_back(app: FastAPI, caller: Caller, session: Session, background: BackgroundTasks, *, target: str,
              reason: str, via: str, expected_id: int | None = None) -> Deployment:
    """Restore the deployment of ``target`` that was active before the current one, in ``session`` (the caller
    commits it), recorded with the key (``store.deployments.rollback``). ``expected_id``: the deployment the
    operator confirmed rolling back; if another is active by now (a rollback or deploy came first),
    ``Conflict`` and nothing is done. The deploy hook (``app.state.on_deploy``) is told before the commit and
    delivers after it; the rollback's alert goes out after the answer (``background``) and never raises."""
    if expected_id is not None:
        current = active_deployment(session, name=target, lock=True)  # held to the commit; rollback takes it again
        if current is not None and current.id != expected_id:
            raise Conflict(f"deployment {target!r} changed since the rollback was asked for: v{current.version} is "
                           "active now; look at its history again before rolling back")
    row = rollback(session, name=target, reason=reason, actor=caller.name, api_key_id=caller.id, via=via)
    background.add_task(deliver_pending, app.state.database, app.state.settings)
    hook = getattr(app.state, "on_deploy", None)
    if hook is not None:
        hook(row)
    return row


def _cycle(app: FastAPI, cycle_id: int) -> CyclePublic:
    with app.state.database.session() as session:
        return CyclePublic.model_validate(get_cycle(session, cycle_id))
