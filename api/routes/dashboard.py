"""The operator dashboard, served by the API app at ``/dashboard``.

Pages rendered on the server (Jinja2, charts as SVG by pygal, no
JavaScript). The front page (``/dashboard``): the deployed policy and what it was made from; the last
``weeks`` cycles with their stages, gate decisions and reasons, and each
cycle's flow-run state in Prefect (asked with a 3 s timeout when
PREFECT_API_URL is set; the page says so when Prefect does not answer); and the
charts an operator reads a week by: PM held-out accuracy and calibration,
PPO reward against sqrt(KL), people's blinded A/B verdict on the candidate
(win rate, its lower bound, the gate's bar) and the PMs' win rates, the Elo
of the deployed policy from those verdicts, PPO reward under the train PM
and under the held-out test PM (their gap is over-optimisation) with the
train-PM ensemble's spread, the comparisons registered while each cycle ran
and their rater agreement, and the gold score where the world has one (the demo); and the
raters' quality control (``store.raters``): each rater's gold accuracy, agreement, pace,
flags and the operator's decision under the QC policy in force, with each cycle's
agreement on overlap tasks (Krippendorff's alpha). Behind it, a page per cycle
(``/dashboard/cycles/{id}``: its stages with their errors and outputs, the settings
and attempts it ran with, the evaluation, people's verdict, the gate's checks, the
raters left out, the operators' actions and alerts, its flow run in Prefect), a
page per version with its lineage up and down (``/dashboard/policies/{id}``,
``/pms/{id}``, ``/datasets/{id}``) and a target's deployment history
(``/dashboard/deployments?target=``); ``store.pages`` reads what they show.

Its forms act (``POST``, each asked for twice: the form answers a page that restates what will
happen, and only its Confirm button acts): start a week's cycle, cancel or re-run a cycle, roll
a target back, include or exclude a rater. Each runs through the function the JSON API's route
runs (``api.actions``, ``store.raters.decide``), so it is recorded with the key that did it
(``store.actions``, ``via="dashboard"``), then answers a 303 to the subject's page with what it
did as ``?done=`` (shown escaped; the redirect keeps a reload from acting twice). A store error
is a page with its message and status (422, 404, 409, 503), never a 500. A browser
signs in with an operator (or admin) key at ``/dashboard/login`` and gets a
server-side session (``api.web.SignIn``, ``store.sessions``): the cookie holds only the session's
random id (HttpOnly, SameSite=Strict, ``Path=/dashboard``, Secure over https
or with ``RATCHET_DASHBOARD_SECURE_COOKIE``); the session ends after
``RATCHET_DASHBOARD_SESSION_S`` (12 h), after ``RATCHET_DASHBOARD_IDLE_S``
(1 h) unused, at sign-out, or when its key is revoked. SameSite=Strict rather
than Lax: no other site needs to open the dashboard signed in; the cost is that
a link to it followed from another site lands on the sign-in page.

Every form is guarded twice: a POST whose Origin (or, without one, Referer)
is not this server's is refused with 403, and so is one without the form's
CSRF token: a session's forms carry an HMAC of its id (only its browser holds
the id), the sign-in form a random token that must match its cookie (double
submit). A request with neither Origin nor Referer is not a browser's; the
token still guards it. Every page carries a Content-Security-Policy that loads
nothing and runs no script: its one style sheet and each chart's carry a
nonce made for that answer. A script may send ``Authorization: Bearer``
instead of signing in; it needs no CSRF token, having no cookie to abuse.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any, TypeVar
from urllib.parse import quote, urlencode
from uuid import UUID

import pygal
from fastapi import APIRouter, BackgroundTasks, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from sqlalchemy import select

from api import actions
from api.deps import Caller, server_qc_default
from api.errors import RETRY_AFTER_S, pydantic_field_errors
from api.schemas.raters import RaterDecisionCreate
from api.schemas.registry import CycleCancel, CycleCreate, CycleRerun, CycleRerunPlan, RollbackCreate
from api.web import SignIn, from_this_site, page, read_form, redirect, same_token
from store.cycles import get_cycle, iso_week
from store.db import Database
from store.deployments import active_deployment
from store.errors import (
    Conflict,
    DatabaseUnavailable,
    ImmutableVersion,
    InvalidInput,
    NotFound,
    RaterExcluded,
    SchemaNotAtHead,
    ServiceUnavailable,
    StoreError,
)
from store.models import Cycle, Deployment
from store.pages import (
    KIND_NAMES,
    cycle_page,
    dashboard_state,
    deployment_history,
    deployment_row,
    deployment_targets,
    known_targets,
    live_cycle_state,
    version_page,
)
from store.raters import QCPolicy, decide
from store.status import deployed_lineage, feedback_by_cycle, rater_overview, recent_cycles
from store.versioning import get_row

router = APIRouter(prefix="/dashboard", include_in_schema=False)
log = logging.getLogger(__name__)

COOKIE = "ratchet_dashboard_session"
"""the session cookie: the session's id, never the key"""
CSRF_COOKIE = "ratchet_dashboard_csrf"
"""the sign-in form's double-submit token"""
KEY_COOKIE = "ratchet_dashboard_key"
"""where earlier versions kept the key itself; cleared at every sign-in and sign-out"""
PREFECT_TIMEOUT_S = 3.0
ROLE = "operator"
MAX_ID = 2**31 - 1
"""the largest id a row can have (PostgreSQL ``integer``); a larger one names nothing"""
Target = Annotated[str, Query(min_length=1, max_length=200, pattern=r"^[^\x00]*$", description="a deployment target")]
_style = pygal.style.Style(
    background="white", plot_background="white", foreground="#333", foreground_strong="#111",
    foreground_subtle="#999", colors=("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"),
    font_family="system-ui, sans-serif",
)


# --- the data ------------------------------------------------------------------------------


def dashboard_data(database: Database, *, weeks: int, target: str = "default",
                   qc_default: QCPolicy = QCPolicy()) -> dict[str, Any]:
    """Everything the page shows, as plain values (the tests read this); the raters are checked against
    the QC policy in force, ``qc_default`` when no cycle recorded one."""
    with database.session() as session:
        cycles = recent_cycles(session, limit=weeks, target=target)
        targets = known_targets(session)
        state = dashboard_state(session, cycle_ids=[c["cycle_id"] for c in cycles], target=target)
        deployed = deployed_lineage(session, target=target)
        feedback = feedback_by_cycle(session, cycles)
        raters = rater_overview(session, default=qc_default, cycles=cycles)
    states = flow_run_states([c["flow_run_id"] for c in cycles if c["flow_run_id"]])
    for c in cycles:
        c["prefect_state"] = None if states is None else states.get(c["flow_run_id"])
    return {"cycles": cycles, "deployed": deployed, "feedback": feedback, "raters": raters, "target": target,
            "weeks": weeks, "state": state, "targets": targets, "prefect": "unreachable" if states is None else ("asked" if states else "not asked")}


def flow_run_states(flow_run_ids: list[str], *, timeout_s: float = PREFECT_TIMEOUT_S) -> dict[str, str] | None:
    """Prefect's state name of each flow run, by id; {} when there is nothing to ask or no
    Prefect API is configured (PREFECT_API_URL), None when Prefect did not answer in time."""
    from prefect.settings import PREFECT_API_URL

    wanted = []
    for flow_run_id in flow_run_ids:
        try:
            wanted.append(UUID(flow_run_id))
        except ValueError:
            continue
    if not wanted or not PREFECT_API_URL.value():
        return {}
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    try:
        # One try: a page waits for Prefect at most timeout_s, not through the client's retries.
        with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}), \
                get_client(httpx_settings={"timeout": timeout_s}, sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=wanted)), limit=len(wanted))
    except Exception as exc:  # noqa: BLE001 - the page shows the store's view without Prefect's
        log.warning("Prefect did not answer for %d flow run(s): %s", len(wanted), exc)
        return None
    return {str(run.id): run.state.name if run.state is not None else "unknown" for run in runs}


def cycle_data(database: Database, cycle_id: int) -> dict[str, Any]:
    """What the cycle's page shows (``store.pages.cycle_page``), its params (the re-run form shows them) and its
    flow run's state in Prefect."""
    with database.session() as session:
        data = cycle_page(session, cycle_id=cycle_id)
        data["params"] = dict(get_cycle(session, cycle_id).params)
        data["state"] = live_cycle_state(session, cycle_id=cycle_id)
        data["target"] = get_cycle(session, cycle_id).deploy_target
    data["prefect"] = flow_run_status(data["summary"]["flow_run_id"])
    return data


def flow_run_status(flow_run_id: str | None) -> dict[str, str | None]:
    """One flow run's state in Prefect (``state``), or why there is none (``note``)."""
    from prefect.settings import PREFECT_API_URL

    if not flow_run_id:
        return {"state": None, "note": "no flow run is recorded for this cycle"}
    if not PREFECT_API_URL.value():
        return {"state": None, "note": "Prefect was not asked (PREFECT_API_URL is not set)"}
    states = flow_run_states([flow_run_id])
    if states is None:
        return {"state": None, "note": f"Prefect did not answer within {PREFECT_TIMEOUT_S:.0f} s"}
    state = states.get(flow_run_id)
    return {"state": state, "note": None if state else "Prefect does not know this flow run"}


def version_data(database: Database, kind: str, id: int) -> dict[str, Any]:
    with database.session() as session:
        return version_page(session, kind=kind, id=id)


def deployments_data(database: Database, target: str) -> dict[str, Any]:
    """A target's deployments, newest first, and what a rollback would do (``rollback``), or why there is none
    to do (``no_rollback``)."""
    with database.session() as session:
        data = {"target": target, "rows": deployment_history(session, target=target),
                "targets": deployment_targets(session), "rollback": None, "no_rollback": None}
        try:
            data["rollback"] = rollback_preview(session, target)
        except (NotFound, Conflict) as exc:
            data["no_rollback"] = str(exc)
        return data


def rollback_preview(session, target: str) -> dict[str, Any]:
    """The deployment of ``target`` a rollback undoes (``current``) and the one whose policy it restores
    (``restores``); ``NotFound`` and ``Conflict`` as ``store.deployments.rollback`` raises them."""
    current = active_deployment(session, name=target)
    if current is None:
        raise NotFound(f"deployment target {target!r} has never been deployed")
    if current.previous_id is None:
        raise Conflict(f"deployment {target!r} v{current.version} has no earlier deployment to roll back to")
    previous = get_row(session, Deployment, current.previous_id, label="deployment")
    return {"current": deployment_row(current, week=None), "restores": deployment_row(previous, week=None)}


def as_json(value: Any) -> str:
    """``value`` as one line of JSON, as a page shows a list or a nested value."""
    return json.dumps(value, ensure_ascii=False, default=str, separators=(", ", ": "))


def prefect_ui_url() -> str:
    """Prefect's UI (``PREFECT_UI_URL``), without a trailing slash; empty when not set."""
    return os.environ.get("PREFECT_UI_URL", "").rstrip("/")


# --- the charts ----------------------------------------------------------------------------


def _chart(kind, title: str, *, nonce: str | None, **options):
    chart = kind(
        title=title, style=_style, js=[], width=560, height=300, disable_xml_declaration=True,
        legend_at_bottom=True, legend_font_size=11, truncate_legend=-1, print_values=False,
        show_x_guides=False, dots_size=3, **options,
    )
    chart.add_xml_filter(partial(_static_svg, nonce=nonce))
    return chart


def _static_svg(root, *, nonce: str | None):
    """A chart the page's CSP admits: without pygal's script (the configuration of its
    JavaScript, which the page does not load), its tooltip overlay (moved by that script)
    and inline style attributes (which the CSP would drop anyway); its style sheet
    carries the answer's nonce."""
    parents = {child: parent for parent in root.iter() for child in parent}
    for element in list(root.iter()):
        if element.tag == "script" or "tooltip-overlay" in element.get("class", "").split():
            parents[element].remove(element)
        elif element.tag == "style" and nonce is not None:
            element.set("nonce", nonce)
        element.attrib.pop("style", None)
    return root


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _padded(values: list[float]) -> tuple[float, float]:
    """An axis range around ``values`` with room for point labels at the edges."""
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.15 or abs(hi) * 0.1 or 1.0
    return lo - pad, hi + pad


CHART_NONCE = "ratchet-chart-nonce"
"""the nonce rendered into cached charts, replaced by each answer's own"""
CACHED_CHARTS = 16
_charts_cache: OrderedDict[str, dict[str, str]] = OrderedDict()
_charts_lock = threading.Lock()


def cached_charts(data: dict[str, Any], *, nonce: str) -> dict[str, str]:
    """``charts`` of the page's data, rendered once per distinct data (pygal takes 50-90 ms for the page's
    charts at any store size; the data change only when a cycle or its feedback does): the last
    ``CACHED_CHARTS`` renderings are kept by a hash of what the charts read, and each answer gets them with
    its own CSP nonce."""
    key = hashlib.sha256(json.dumps([data["cycles"], data["feedback"], data["raters"].get("agreement")],
                                    default=str, sort_keys=True).encode()).hexdigest()
    with _charts_lock:
        svgs = _charts_cache.get(key)
        if svgs is not None:
            _charts_cache.move_to_end(key)
    if svgs is None:
        svgs = charts(data, nonce=CHART_NONCE)
        with _charts_lock:
            _charts_cache[key] = svgs
            while len(_charts_cache) > CACHED_CHARTS:
                _charts_cache.popitem(last=False)
    return {name: svg.replace(f'nonce="{CHART_NONCE}"', f'nonce="{nonce}"') for name, svg in svgs.items()}


def charts(data: dict[str, Any], *, nonce: str | None = None) -> dict[str, str]:
    """The page's charts as SVG strings, by name (a chart with no data is left out); their
    style sheets carry ``nonce``, the CSP nonce of the page they go into."""
    cycles, out = data["cycles"], {}
    weeks = [c["week"] for c in cycles]

    def series(key: str) -> list[float | None]:
        return [_num(c.get(key)) for c in cycles]

    def lines(name: str, title: str, wanted: list[tuple[str, str]], **options) -> None:
        values = {label: series(key) for label, key in wanted}
        if not any(v is not None for vs in values.values() for v in vs):
            return
        chart = _chart(pygal.Line, title, nonce=nonce, x_labels=weeks, x_label_rotation=30, allow_interruptions=True,
                       **options)
        for label, vs in values.items():
            chart.add(label, vs)
        out[name] = chart.render(is_unicode=True)

    lines("pm", "Preference model, held-out", [("accuracy (train PM)", "pm_accuracy"),
          ("accuracy (test PM)", "test_pm_accuracy"), ("ECE (train PM)", "pm_ece")])
    lines("human", "Candidate vs deployed: people's blinded A/B verdict", [("human win rate", "human_win_rate"),
          ("its lower bound", "human_lower_bound"), ("gate requires the bound above", "human_bar")])
    lines("win_rate", "Candidate vs deployed: PM win rate", [("test PM", "win_rate"), ("train PM", "win_rate_train_pm"),
          ("gate requires (test PM)", "required_win_rate")])
    lines("elo", "Elo of the deployed policy (people's A/B verdicts, P0 = 0)", [("Elo", "elo_deployed")])
    lines("pm_gap", "Policy training reward: train PM vs held-out test PM", [("train PM", "policy_reward"),
          ("test PM", "policy_reward_test_pm"), ("train-PM ensemble spread", "policy_reward_spread")])
    lines("gold", "Gold score of the deployed policy", [("gold", "gold_score")])

    points = [(math.sqrt(kl), reward, c["week"]) for c in cycles
              if (kl := _num(c.get("kl"))) is not None and kl >= 0 and (reward := _num(c.get("policy_reward"))) is not None]
    if points:
        xs, ys = [x for x, _, _ in points], [y for _, y, _ in points]
        chart = _chart(pygal.XY, "Training reward vs sqrt(KL), one point per cycle", nonce=nonce, stroke=False,
                       print_labels=True, x_title="sqrt(KL to reference)", y_title="mean PM reward",
                       xrange=_padded(xs), range=_padded(ys))
        chart.add("cycles", [{"value": (x, y), "label": week} for x, y, week in points])
        out["reward_kl"] = chart.render(is_unicode=True)

    feedback = data["feedback"]
    if feedback:
        labels = [f["week"] for f in feedback]
        chart = _chart(pygal.Bar, "Comparisons registered while each cycle ran", nonce=nonce, x_labels=labels,
                       x_label_rotation=30)
        chart.add("comparisons", [f["comparisons"] for f in feedback])
        out["feedback"] = chart.render(is_unicode=True)
        agreement = [_num(f["agreement"]) for f in feedback]
        if any(a is not None for a in agreement):
            chart = _chart(pygal.Line, "Rater agreement (pairs judged by several raters)", nonce=nonce, x_labels=labels,
                           x_label_rotation=30, allow_interruptions=True, range=(0, 1))
            chart.add("agreement", agreement)
            out["agreement"] = chart.render(is_unicode=True)

    per_cycle = data["raters"]["agreement"]
    alphas = [_num(a["alpha"]) for a in per_cycle]
    if any(a is not None for a in alphas):
        lowest = min(a for a in alphas if a is not None)
        chart = _chart(pygal.Line, "Overlap-task agreement (Krippendorff's alpha)",
                       nonce=nonce, x_labels=[a["week"] for a in per_cycle], x_label_rotation=30,
                       allow_interruptions=True, range=(min(lowest, 0.0), 1))
        chart.add("alpha", alphas)
        out["rater_alpha"] = chart.render(is_unicode=True)
    return out


# --- sign-in --------------------------------------------------------------------------------


SIGN_IN = SignIn(
    path="/dashboard", cookie=COOKIE, csrf_cookie=CSRF_COOKIE, role=ROLE, title="the dashboard",
    key_hint="an operator or admin API key", key_command="ratchet keys create --role operator --name NAME",
    stale_cookies=(KEY_COOKIE,),
)


MAX_DONE = 2000
"""the characters of an action's ``?done=`` message a page shows"""


@dataclass(frozen=True)
class Viewer:
    """Who is looking at a page, the CSRF token of its forms (None for a script with a Bearer key), and what the
    action that sent them here did (``?done=``, shown escaped)."""

    caller: Caller
    csrf: str | None
    done: str | None = None

    def page(self, name: str, status: int = 200, *, live: dict[str, Any] | None = None, **context) -> HTMLResponse:
        """A dashboard page for this viewer (``api.web.page``: its CSP and ``no-store``). ``live`` (the page's
        state URL, its version and how often to ask) adds the script that reloads the page when it changed."""
        return page(name, status, script=live is not None, caller=self.caller, csrf=self.csrf, done=self.done,
                    as_json=as_json, live=live, **context)

    def not_found(self, message: str) -> HTMLResponse:
        return self.page("not_found.html", 404, message=message)

    def message(self, status: int, message: str, *, back: str, fields: list[dict] | None = None) -> HTMLResponse:
        """Why an action was not done, with its status (and the bad fields of a 422)."""
        return self.page("message.html", status, title=NOT_DONE.get(status, "Not done"), status_code=status,
                         message=message, fields=fields or [], back=back)


async def viewer_of(request: Request) -> Viewer | Response:
    """The operator (or admin) looking, or the answer for anyone else: to sign-in, or 403."""
    caller, session_id = await SIGN_IN.caller(request)
    if caller is None:
        return redirect("/dashboard/login")
    if (refused := SIGN_IN.refused(request, caller)) is not None:
        return refused
    return Viewer(caller=caller, csrf=SIGN_IN.form_csrf(session_id) if session_id else None,
                  done=request.query_params.get("done", "")[:MAX_DONE] or None)


# --- routes ----------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
async def dashboard(
    request: Request,
    weeks: Annotated[int, Query(ge=1, le=104, description="how many of the latest cycles to show")] = 12,
    target: Target = "default",
) -> Response:
    viewer = await viewer_of(request)
    if isinstance(viewer, Response):
        return viewer
    nonce = secrets.token_urlsafe(16)
    default = await run_in_threadpool(server_qc_default, request.app)
    data = await run_in_threadpool(dashboard_data, request.app.state.database, weeks=weeks, target=target,
                                   qc_default=default)
    svgs = await run_in_threadpool(partial(cached_charts, data, nonce=nonce))
    state = data["state"]
    live = _live(request, f"/dashboard/state?{urlencode({'weeks': weeks, 'target': target})}", state) \
        if state["live"] else None
    return viewer.page("dashboard.html", nonce=nonce, data=data, charts=svgs, prefect_ui=prefect_ui_url(),
                       this_week=iso_week(datetime.now(UTC)), launcher=has_launcher(request.app), live=live)


@router.get("/cycles/{cycle_id}", response_class=HTMLResponse)
async def cycle_detail(request: Request, cycle_id: int) -> Response:
    """One cycle: stages, outputs, settings, attempts, evaluation, people's verdict, gate, actions, alerts."""
    viewer = await viewer_of(request)
    if isinstance(viewer, Response):
        return viewer
    try:
        existing_id("cycle", cycle_id)
        data = await run_in_threadpool(cycle_data, request.app.state.database, cycle_id)
    except NotFound as exc:
        return viewer.not_found(str(exc))
    status = data["summary"]["status"]
    live = _live(request, f"/dashboard/cycles/{cycle_id}/state", data["state"]) if data["state"]["live"] else None
    return viewer.page("cycle.html", data=data, prefect_ui=prefect_ui_url(), can_cancel=status in CANCELLABLE,
                       can_rerun=status in RERUNNABLE, launcher=has_launcher(request.app), live=live)


def existing_id(what: str, id: int) -> None:
    """``NotFound`` for an id no row can have (a PostgreSQL ``integer`` is at most ``MAX_ID``), before the store
    is asked."""
    if not 1 <= id <= MAX_ID:
        raise NotFound(f"{what} {id} does not exist")


def _live(request: Request, url: str, state: dict[str, Any]) -> dict[str, Any]:
    return {"url": url, "version": state["version"], "every_s": request.app.state.settings.dashboard_live_s}


@router.get("/cycles/{cycle_id}/state")
async def cycle_live_state(request: Request, cycle_id: int) -> Response:
    """What the cycle page's script watches (``store.pages.live_cycle_state``): JSON ``status``, ``live``,
    ``version``; the page reloads when ``version`` changes."""
    viewer = await viewer_of(request)
    if isinstance(viewer, Response):
        return viewer
    try:
        existing_id("cycle", cycle_id)
        state = await run_in_threadpool(_in_session, request.app.state.database, live_cycle_state, cycle_id=cycle_id)
    except NotFound as exc:
        return JSONResponse({"detail": str(exc)}, status_code=404, headers={"Cache-Control": "no-store"})
    return JSONResponse(state, headers={"Cache-Control": "no-store"})


@router.get("/state")
async def dashboard_live_state(
    request: Request,
    weeks: Annotated[int, Query(ge=1, le=104)] = 12,
    target: Target = "default",
) -> Response:
    """What the dashboard's script watches (``store.pages.dashboard_state``) while a cycle it shows runs."""
    viewer = await viewer_of(request)
    if isinstance(viewer, Response):
        return viewer
    state = await run_in_threadpool(_dashboard_state, request.app.state.database, weeks, target)
    return JSONResponse(state, headers={"Cache-Control": "no-store"})


def _in_session(database: Database, function: Callable[..., Any], **kwargs) -> Any:
    with database.session() as session:
        return function(session, **kwargs)


def _dashboard_state(database: Database, weeks: int, target: str) -> dict[str, Any]:
    with database.session() as session:
        ids = list(session.scalars(select(Cycle.id).where(Cycle.deploy_target == target)
                                   .order_by(Cycle.id.desc()).limit(weeks)))
        return dashboard_state(session, cycle_ids=ids, target=target)


async def version_detail(request: Request, kind: str, id: int) -> Response:
    """A policy's, PM's or dataset's page: its fields and its lineage up and down."""
    viewer = await viewer_of(request)
    if isinstance(viewer, Response):
        return viewer
    try:
        existing_id(KIND_NAMES[kind], id)
        data = await run_in_threadpool(version_data, request.app.state.database, kind, id)
    except NotFound as exc:
        return viewer.not_found(str(exc))
    return viewer.page("version.html", data=data)


@router.get("/policies/{policy_id}", response_class=HTMLResponse)
async def policy_detail(request: Request, policy_id: int) -> Response:
    return await version_detail(request, "policy", policy_id)


@router.get("/pms/{pm_id}", response_class=HTMLResponse)
async def pm_detail(request: Request, pm_id: int) -> Response:
    return await version_detail(request, "pm", pm_id)


@router.get("/datasets/{dataset_id}", response_class=HTMLResponse)
async def dataset_detail(request: Request, dataset_id: int) -> Response:
    return await version_detail(request, "dataset", dataset_id)


@router.get("/deployments", response_class=HTMLResponse)
async def deployments(request: Request, target: Target = "default") -> Response:
    """Every deployment of a target, newest first: what was deployed or rolled back, by whom, when and why."""
    viewer = await viewer_of(request)
    if isinstance(viewer, Response):
        return viewer
    data = await run_in_threadpool(deployments_data, request.app.state.database, target)
    return viewer.page("deployments.html", data=data)


# --- actions ---------------------------------------------------------------------------------
#
# Each action is a sync function run in a worker thread, ``(app, caller, form, confirmed) -> Confirmation |
# Done``: it checks the form's fields with the JSON API's schema, then, unconfirmed, restates what it will do
# (``Confirmation``); confirmed, it acts through the function the API's route calls and says what it did (``Done``).
# ``run_action`` guards the POST first and turns the store's refusals into pages.

MAX_ACTION_BYTES = 64 * 1024
"""the bytes of an action's form (params are a JSON object typed into a textarea); a larger form is refused"""
CANCELLABLE = ("running", "failed")
"""the cycle statuses a cancel applies to (``store.cycles.cancel_cycle``)"""
RERUNNABLE = ("failed", "cancelled")
"""the cycle statuses a re-run applies to (``store.cycles.rerun_cycle``)"""
DECISIONS = {"include": "include", "exclude": "exclude", "clear": None}
"""the rater form's choices, as ``PUT /v1/raters/{rater_id}/decision`` takes them"""
DECISION_EFFECTS = {
    "include": "Its comparisons go back into the next snapshots even while quality control flags it.",
    "exclude": "Its comparisons are left out of the next snapshots whatever its numbers, and it is handed no more tasks.",
    "clear": "The decision in force is cleared: quality control's flags decide again.",
}
"""what each choice does, as the confirmation page says it"""
NOT_DONE = {403: "Refused", 404: "Not done: not found", 409: "Not done: conflict", 413: "Not done: the form is too big",
            422: "Not done: invalid input", 503: "Not done: unavailable"}
"""the heading of an error page, by status"""
REFUSALS: dict[type[StoreError], int] = {
    InvalidInput: 422, NotFound: 404, Conflict: 409, ImmutableVersion: 409, RaterExcluded: 403, SchemaNotAtHead: 503,
    ServiceUnavailable: 503,
}
"""the store's refusals an action may meet, and their status (as ``api.errors`` answers them)"""


@dataclass(frozen=True)
class Confirmation:
    """The page that asks before an action: what it will do, and a Confirm form sending ``fields`` back with
    ``confirm=yes`` (and the CSRF token) to ``action``."""

    title: str
    """the question ("Cancel cycle 2026-W47?")"""
    facts: list[tuple[str, str]]
    """what the action acts on and with, restated: (label, value)"""
    effect: str
    """what will happen, in a sentence or two"""
    action: str
    """where the Confirm form posts (the form's own route)"""
    fields: dict[str, str]
    """the form's fields as checked (params as compact JSON), sent again as hidden fields"""
    button: str
    back: str
    """the subject's page (the Back link)"""
    json: list[tuple[str, str]] = field(default_factory=list)
    """JSON values it acts with, indented: (label, text)"""


@dataclass(frozen=True)
class Done:
    """What an action did, for the subject's page at ``path`` (the message goes there as ``?done=``)."""

    path: str
    message: str
    query: dict[str, str] = field(default_factory=dict)
    fragment: str = ""

    def location(self) -> str:
        url = f"{self.path}?{urlencode({**self.query, 'done': self.message})}"
        return f"{url}#{self.fragment}" if self.fragment else url


Action = Callable[[FastAPI, Caller, dict[str, str], bool], "Confirmation | Done"]
Schema = TypeVar("Schema", bound=BaseModel)


async def run_action(request: Request, action: Action, *, back: str) -> Response:
    """An action's POST: an operator's (else sign-in or 403), from this site (403), at most ``MAX_ACTION_BYTES``
    (413), carrying the session's CSRF token unless it came with a Bearer key (403); then ``action``: its
    confirmation page, or once confirmed a 303 to the subject's page saying what it did. Every refusal does
    nothing and is a page with its status and message; ``back`` is the subject's page."""
    viewer = await viewer_of(request)
    if isinstance(viewer, Response):
        return viewer
    if not from_this_site(request):
        return viewer.message(403, "Refused: this form was sent from another site. Nothing was done.", back=back)
    if len(await request.body()) > MAX_ACTION_BYTES:
        return viewer.message(413, f"The form is over {MAX_ACTION_BYTES // 1024} KiB. Nothing was done.", back=back)
    form = await read_form(request, max_bytes=MAX_ACTION_BYTES)
    if viewer.csrf is not None and not same_token(form.get("csrf", ""), viewer.csrf):
        return viewer.message(403, "Refused: the form's CSRF token is missing or is not this session's (reload the "
                                   "page and try again). Nothing was done.", back=back)
    try:
        if bad := [name for name, value in form.items() if "\x00" in value]:
            raise InvalidInput("a form field holds a NUL character",
                               [{"field": name, "message": "holds a NUL character"} for name in bad])
        outcome = await run_in_threadpool(action, request.app, viewer.caller, form, form.get("confirm") == "yes")
    except HTTPException as exc:
        return viewer.message(exc.status_code, str(exc.detail), back=back)
    except StoreError as exc:
        status = next((code for kind, code in REFUSALS.items() if isinstance(exc, kind)), None)
        if status is None:
            raise
        if isinstance(exc, DatabaseUnavailable):  # the driver's words (host, user) go to the log only
            log.error("database unavailable: %s", exc)
            return viewer.message(503, f"The database is unavailable; retry in {RETRY_AFTER_S} s. Nothing was done.",
                                  back=back)
        return viewer.message(status, str(exc), back=back, fields=getattr(exc, "errors", None))
    if isinstance(outcome, Confirmation):
        return viewer.page("confirm.html", confirm=outcome)
    return redirect(outcome.location())


def checked(schema: type[Schema], **fields: Any) -> Schema:
    """``fields`` as the JSON API's ``schema`` checks them; ``InvalidInput`` (422) naming each bad field."""
    try:
        return schema.model_validate(fields)
    except ValidationError as exc:
        problems = pydantic_field_errors(exc)
        raise InvalidInput(f"{len(problems)} invalid field(s)", problems) from None


def json_field(form: dict[str, str], name: str) -> Any:
    """The JSON text of field ``name`` (empty: ``{}``), read; ``InvalidInput`` naming the field if it is not JSON
    (the schema then checks that it is an object)."""
    text = form.get(name, "") or "{}"
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        problem = f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
    except RecursionError:
        problem = "not valid JSON: nested too deep"
    raise InvalidInput(f"{name} is {problem}", [{"field": name, "message": problem}])


def compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def indented(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2)


def has_launcher(app: FastAPI) -> bool:
    """Whether the server can start and re-run cycles (``app.state.cycle_launcher``)."""
    return getattr(app.state, "cycle_launcher", None) is not None


def cycle_state(database: Database, cycle_id: int) -> tuple[str, str, dict[str, Any]]:
    """A cycle's week, status and params; ``NotFound`` for an id no row can have or that no cycle has."""
    existing_id("cycle", cycle_id)
    with database.session() as session:
        cycle = get_cycle(session, cycle_id)
        return cycle.week, cycle.status, dict(cycle.params)


def start_action(app: FastAPI, caller: Caller, form: dict[str, str], confirmed: bool) -> Confirmation | Done:
    """Start a week's cycle of a target (``api.actions.start``); the week, when not given, is this one as of the
    first POST; the target is the one the dashboard showed."""
    body = checked(CycleCreate, week=form.get("week") or iso_week(datetime.now(UTC)), params=json_field(form, "params"),
                   target=form.get("target") or "default")
    of = f"{body.week} of {body.target}" if body.target != "default" else body.week
    if not confirmed:
        return Confirmation(
            title=f"Start the cycle of {of}?", facts=[("week", body.week), ("target", body.target)],
            json=[("params (over the server's cycle settings)", indented(body.params))],
            effect=(f"Opens the cycle of {of} with these params and starts its flow run. A target has one cycle a "
                    f"week: if {of}'s exists already, nothing new is started."),
            action="/dashboard/cycles", fields={"week": body.week, "params": compact(body.params), "target": body.target},
            button=f"Start {of}", back=f"/dashboard?target={quote(body.target)}#start")
    started = actions.start(app, caller, week=body.week, params=body.params, via="dashboard", target=body.target)
    cycle = started.cycle
    said = (f"Started the cycle of {of}." if started.created
            else f"The cycle of {of} already existed ({cycle.status}): nothing new was started.")
    return Done(f"/dashboard/cycles/{cycle.id}", said)


def cancel_action(app: FastAPI, caller: Caller, form: dict[str, str], confirmed: bool, *,
                  cycle_id: int) -> Confirmation | Done:
    """Cancel a running or failed cycle (``api.actions.cancel``)."""
    body = checked(CycleCancel, reason=form.get("reason", ""))
    week, status, _ = cycle_state(app.state.database, cycle_id)
    if status not in CANCELLABLE:
        raise Conflict(f"cycle {week} is {status}: only a running or failed cycle can be cancelled")
    if not confirmed:
        return Confirmation(
            title=f"Cancel cycle {week}?",
            facts=[("cycle", f"{week} (id {cycle_id})"), ("status now", status), ("reason", body.reason or "(none given)")],
            effect=("Marks the cycle cancelled with your key and this reason, closes its open comparison tasks and stops "
                    "the stage it is running (which registers nothing); finished stages and every registered version "
                    "are kept. Prefect is told to cancel its flow runs. A cancelled cycle can be re-run later."),
            action=f"/dashboard/cycles/{cycle_id}/cancel", fields={"reason": body.reason},
            button=f"Cancel cycle {week}", back=f"/dashboard/cycles/{cycle_id}")
    done = actions.cancel(app, caller, cycle_id=cycle_id, reason=body.reason, via="dashboard")
    return Done(f"/dashboard/cycles/{cycle_id}", f"Cancelled cycle {week}. {prefect_said(done.prefect)}")


def prefect_said(prefect: dict[str, Any]) -> str:
    """What Prefect was told of a cancel, in a sentence (``CycleCancelled.prefect``)."""
    if not prefect.get("asked"):
        return f"Prefect was not told ({prefect.get('why') or 'not asked'})."
    if "error" in prefect:
        return f"Prefect could not be told: {prefect['error']}."
    return f"Prefect set {len(prefect.get('cancelled', []))} flow run(s) to Cancelling."


def rerun_action(app: FastAPI, caller: Caller, form: dict[str, str], confirmed: bool, *,
                 cycle_id: int) -> Confirmation | Done:
    """Re-run a failed or cancelled cycle with corrected params (``api.actions.rerun``)."""
    body = checked(CycleRerun, params=json_field(form, "params"), reason=form.get("reason", ""))
    week, status, params = cycle_state(app.state.database, cycle_id)
    if status not in RERUNNABLE:
        hint = ": cancel it first" if status == "running" else ""
        raise Conflict(f"cycle {week} is {status}; only a failed or cancelled cycle can be re-run{hint}")
    if not confirmed:
        plan = actions.preview_rerun(app, cycle_id=cycle_id, params=body.params)  # bad params refused here already
        return Confirmation(
            title=f"Re-run cycle {week}?",
            facts=[("cycle", f"{week} (id {cycle_id})"), ("status now", status), ("reason", body.reason or "(none given)"),
                   ("attempt", str(plan.attempt)), *plan_facts(plan)],
            json=[("corrections (merged over its params)", indented(body.params)), ("its params now", indented(params))],
            effect=("Records a new attempt with these corrections and starts it: the stages kept stay as they are, and "
                    "those run again register new versions."),
            action=f"/dashboard/cycles/{cycle_id}/rerun", fields={"params": compact(body.params), "reason": body.reason},
            button=f"Re-run cycle {week}", back=f"/dashboard/cycles/{cycle_id}")
    plan = actions.rerun(app, caller, cycle_id=cycle_id, params=body.params, reason=body.reason, via="dashboard")
    return Done(f"/dashboard/cycles/{cycle_id}", plan_said(week, plan), fragment="attempts")


def plan_facts(plan: CycleRerunPlan) -> list[tuple[str, str]]:
    """A re-run's plan as the confirmation page's rows: the settings changed, the stages kept and run again."""
    again = "; ".join(f"{stage} ({plan.why[stage]})" if stage in plan.why else stage for stage in plan.rerun)
    return [("changed", ", ".join(plan.changed) or "no setting"), ("kept", ", ".join(plan.kept) or "no stage"),
            ("run again", again or "no stage")]


def plan_said(week: str, plan: CycleRerunPlan) -> str:
    """A re-run's plan, a line each: its attempt, the settings changed, the stages kept and run again (with why)."""
    again = "; ".join(f"{stage} ({plan.why[stage]})" if stage in plan.why else stage for stage in plan.rerun)
    return "\n".join([
        f"Re-run of cycle {week} recorded as attempt {plan.attempt} and started.",
        f"changed: {', '.join(plan.changed) or 'no setting'}",
        f"kept: {', '.join(plan.kept) or 'no stage'}",
        f"run again: {again or 'no stage'}",
    ])


def rollback_action(app: FastAPI, caller: Caller, form: dict[str, str], confirmed: bool, *,
                    background: BackgroundTasks) -> Confirmation | Done:
    """Roll a target back (``api.actions.roll_back``, as ``POST /v1/deployments/rollback``). ``expected`` (the
    deployment the form's page showed active) must still be the active one, or ``Conflict``."""
    body = checked(RollbackCreate, name=form.get("name", "default"), reason=form.get("reason", ""))
    expected = form.get("expected", "")
    if expected and not expected.isdigit():
        raise InvalidInput("expected is not a deployment id", [{"field": "expected", "message": "not a deployment id"}])
    expected_id = int(expected) if expected else None
    if not confirmed:
        with app.state.database.session() as session:
            preview = rollback_preview(session, body.name)
        now, restores = preview["current"], preview["restores"]
        if expected_id is not None and now["id"] != expected_id:
            raise Conflict(f"deployment {body.name!r} changed since its page was shown: v{now['version']} is active "
                           "now; look at its history again before rolling back")
        return Confirmation(
            title=f"Roll back {body.name}?",
            facts=[("target", body.name),
                   ("serving now", f"{now['policy']['name']} v{now['policy']['version']} (deployment v{now['version']})"),
                   ("serves after", f"{restores['policy']['name']} v{restores['policy']['version']} "
                                    f"(as deployment v{restores['version']} did)"),
                   ("reason", body.reason or "(none given)")],
            effect=("Writes a rollback to the deployment log with your key and this reason, calls the deploy hook and "
                    "sends the rollback's alert. Rolling back again goes one more step back."),
            action="/dashboard/deployments/rollback",
            fields={"name": body.name, "reason": body.reason, "expected": str(now["id"])},
            button=f"Roll back {body.name}", back=f"/dashboard/deployments?{urlencode({'target': body.name})}")
    with app.state.database.session() as session:
        row = actions.roll_back(app, caller, session, background, target=body.name, reason=body.reason,
                                via="dashboard", expected_id=expected_id)
        said = (f"Rolled {body.name} back: deployment v{row.version} serves {row.policy.name} v{row.policy.version} "
                "again.")
    return Done("/dashboard/deployments", said, query={"target": body.name})


def decision_action(app: FastAPI, caller: Caller, form: dict[str, str], confirmed: bool, *,
                    rater_id: str) -> Confirmation | Done:
    """Include or exclude a rater, or clear the decision in force (``store.raters.decide``, as
    ``PUT /v1/raters/{rater_id}/decision``)."""
    choice = form.get("decision", "")
    if choice not in DECISIONS:
        raise InvalidInput(f"decision {choice!r} is not include, exclude or clear",
                           [{"field": "decision", "message": "choose include, exclude or clear"}])
    if not 1 <= len(rater_id) <= 200:
        raise InvalidInput("a rater id has 1 to 200 characters", [{"field": "rater_id", "message": "1 to 200 characters"}])
    body = checked(RaterDecisionCreate, decision=DECISIONS[choice], reason=form.get("reason", ""))
    if not confirmed:
        return Confirmation(
            title=f"{choice.capitalize()} rater {rater_id}?",
            facts=[("rater", rater_id), ("decision", choice), ("reason", body.reason or "(none given)")],
            effect=f"{DECISION_EFFECTS[choice]} The decision is recorded with your key and this reason.",
            action=f"/dashboard/raters/{quote(rater_id, safe='')}/decision", fields={"decision": choice, "reason": body.reason},
            button=f"{choice.capitalize()} {rater_id}", back="/dashboard#raters")
    with app.state.database.session() as session:
        decide(session, rater_id=rater_id, decision=body.decision, reason=body.reason, actor=caller.name,
               api_key_id=caller.id, via="dashboard")
    said = (f"Rater {rater_id}: the decision is cleared." if body.decision is None
            else f"Rater {rater_id}: {body.decision}d" + (f" ({body.reason})." if body.reason else "."))
    return Done("/dashboard", said, fragment="raters")


@router.post("/cycles", response_class=HTMLResponse)
async def start_cycle(request: Request) -> Response:
    """Start a week's cycle (``week``, default this one; ``params``, a JSON object), once confirmed."""
    return await run_action(request, start_action, back="/dashboard#start")


@router.post("/cycles/{cycle_id}/cancel", response_class=HTMLResponse)
async def cancel_cycle(request: Request, cycle_id: int) -> Response:
    """Cancel a running or failed cycle (``reason``), once confirmed."""
    return await run_action(request, partial(cancel_action, cycle_id=cycle_id), back=f"/dashboard/cycles/{cycle_id}")


@router.post("/cycles/{cycle_id}/rerun", response_class=HTMLResponse)
async def rerun_cycle(request: Request, cycle_id: int) -> Response:
    """Re-run a failed or cancelled cycle with corrected ``params`` (``reason``), once confirmed."""
    return await run_action(request, partial(rerun_action, cycle_id=cycle_id), back=f"/dashboard/cycles/{cycle_id}")


@router.post("/deployments/rollback", response_class=HTMLResponse)
async def roll_back(request: Request, background: BackgroundTasks) -> Response:
    """Roll a target back (``name``, ``reason``, ``expected``), once confirmed; the alert goes out after the answer."""
    return await run_action(request, partial(rollback_action, background=background), back="/dashboard/deployments")


@router.post("/raters/{rater_id:path}/decision", response_class=HTMLResponse)
async def rater_decision(request: Request, rater_id: str) -> Response:
    """Include or exclude a rater, or clear the decision (``decision``, ``reason``), once confirmed."""
    return await run_action(request, partial(decision_action, rater_id=rater_id), back="/dashboard#raters")


SIGN_IN.add_routes(router)
