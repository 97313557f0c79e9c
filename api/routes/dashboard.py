"""The operator dashboard, served by the API app at ``/dashboard``.

One page, rendered on the server (Jinja2, charts as SVG by pygal, no
JavaScript): the deployed policy and what it was made from; the last
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
agreement on overlap tasks (Krippendorff's alpha).

It reads the store only; actions stay with the API and the CLI. A browser
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

import logging
import math
import os
import secrets
from functools import partial
from typing import Annotated, Any
from uuid import UUID

import pygal
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response

from api.deps import server_qc_default
from api.web import SignIn, page, redirect
from store.db import Database
from store.raters import QCPolicy
from store.status import deployed_lineage, feedback_by_cycle, rater_overview, recent_cycles

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
        cycles = recent_cycles(session, limit=weeks)
        deployed = deployed_lineage(session, target=target)
        feedback = feedback_by_cycle(session, cycles)
        raters = rater_overview(session, default=qc_default, cycles=cycles)
    states = flow_run_states([c["flow_run_id"] for c in cycles if c["flow_run_id"]])
    for c in cycles:
        c["prefect_state"] = None if states is None else states.get(c["flow_run_id"])
    return {"cycles": cycles, "deployed": deployed, "feedback": feedback, "raters": raters, "target": target,
            "weeks": weeks, "prefect": "unreachable" if states is None else ("asked" if states else "not asked")}


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


# --- routes ----------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
async def dashboard(
    request: Request,
    weeks: Annotated[int, Query(ge=1, le=104, description="how many of the latest cycles to show")] = 12,
    target: Annotated[str, Query(min_length=1, max_length=200, pattern=r"^[^\x00]*$")] = "default",
) -> Response:
    caller, session_id = await SIGN_IN.caller(request)
    if caller is None:
        return redirect("/dashboard/login")
    if (refused := SIGN_IN.refused(request, caller)) is not None:
        return refused
    nonce = secrets.token_urlsafe(16)
    default = await run_in_threadpool(server_qc_default, request.app)
    data = await run_in_threadpool(dashboard_data, request.app.state.database, weeks=weeks, target=target,
                                   qc_default=default)
    svgs = await run_in_threadpool(partial(charts, data, nonce=nonce))
    prefect_ui = os.environ.get("PREFECT_UI_URL", "").rstrip("/")
    csrf = SIGN_IN.form_csrf(session_id) if session_id else None
    return page("dashboard.html", nonce=nonce, data=data, charts=svgs, caller=caller, prefect_ui=prefect_ui, csrf=csrf)


SIGN_IN.add_routes(router)
