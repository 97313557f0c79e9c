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
and their rater agreement, and the gold score where the world has one (the demo).

It reads the store only; actions stay with the API and the CLI. A browser
signs in with an operator (or admin) key at ``/dashboard/login``; the key is
kept in an HttpOnly, SameSite=Strict cookie scoped to ``/dashboard``. A
script may send ``Authorization: Bearer`` instead.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from typing import Annotated, Any
from urllib.parse import parse_qs
from uuid import UUID

import pygal
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from api.deps import ROLE_RANK, Caller, caller_of
from store.db import Database
from store.deployments import active_deployment
from store.feedback import rater_agreement
from store.lineage import lineage_back
from store.models import Cycle, FeedbackBatch, utcnow
from store.status import summarize_cycle

router = APIRouter(prefix="/dashboard", include_in_schema=False)
log = logging.getLogger(__name__)

COOKIE = "ratchet_dashboard_key"
PREFECT_TIMEOUT_S = 3.0
SESSION_S = 8 * 3600
MAX_LOGIN_BYTES = 4096
ROLE = "operator"

_templates = Environment(loader=PackageLoader("api", "templates"), autoescape=select_autoescape(["html"]))
_style = pygal.style.Style(
    background="white", plot_background="white", foreground="#333", foreground_strong="#111",
    foreground_subtle="#999", colors=("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"),
    font_family="system-ui, sans-serif",
)


# --- the data ------------------------------------------------------------------------------


def dashboard_data(database: Database, *, weeks: int, target: str = "default") -> dict[str, Any]:
    """Everything the page shows, as plain values (the tests read this)."""
    with database.session() as session:
        rows = session.scalars(
            select(Cycle).options(selectinload(Cycle.stages)).order_by(Cycle.id.desc()).limit(weeks)
        ).all()
        cycles = [summarize_cycle(row) for row in reversed(rows)]  # oldest first
        deployed = _deployed(session, target)
        feedback = _feedback_by_cycle(session, cycles)
    states = flow_run_states([c["flow_run_id"] for c in cycles if c["flow_run_id"]])
    for c in cycles:
        c["prefect_state"] = None if states is None else states.get(c["flow_run_id"])
    return {"cycles": cycles, "deployed": deployed, "feedback": feedback, "target": target, "weeks": weeks,
            "prefect": "unreachable" if states is None else ("asked" if states else "not asked")}


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


def _deployed(session, target: str) -> dict[str, Any] | None:
    deployment = active_deployment(session, name=target)
    if deployment is None:
        return None
    graph = lineage_back(session, kind="policy", id=deployment.policy_id)
    by_kind: dict[str, int] = defaultdict(int)
    for kind, _ in graph.nodes:
        by_kind[kind] += 1
    chain, key = [], ("policy", deployment.policy_id)
    while key is not None:  # policy -> its PM -> that PM's dataset (the "trained on" edges)
        node = graph.nodes[key]
        chain.append({"kind": node.kind, "name": node.name, "version": node.version, "id": node.id})
        key = next((e.parent for e in graph.edges if e.child == key and e.parent[0] in ("pm", "dataset")), None)
    return {
        "target": target,
        "version": deployment.version,
        "action": deployment.action,
        "since": deployment.created_at,
        "reason": deployment.reason,
        "chain": chain,
        "feedback_batches": by_kind.get("feedback_batch", 0),
        "policies_before": by_kind.get("policy", 1) - 1,
    }


def _feedback_by_cycle(session, cycles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cycle: the comparisons registered while it ran (from its start to its end, or
    now) and the rater agreement among those batches."""
    if not cycles:
        return []
    first = min(c["started_at"] for c in cycles)
    rows = session.execute(
        select(FeedbackBatch.id, FeedbackBatch.created_at, FeedbackBatch.comparison_count)
        .where(FeedbackBatch.created_at >= first)
    ).all()
    now = utcnow()
    out = []
    for c in cycles:
        end = c["finished_at"] or now
        batch_ids = [i for i, created, _ in rows if c["started_at"] <= created < end]
        count = sum(n for _, created, n in rows if c["started_at"] <= created < end)
        out.append({"week": c["week"], "comparisons": count, "batches": len(batch_ids),
                    **rater_agreement(session, batch_ids)})
    return out


# --- the charts ----------------------------------------------------------------------------


def _chart(kind, title: str, **options):
    return kind(
        title=title, style=_style, js=[], width=560, height=300, disable_xml_declaration=True,
        legend_at_bottom=True, legend_font_size=11, truncate_legend=-1, print_values=False,
        show_x_guides=False, dots_size=3, **options,
    )


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _padded(values: list[float]) -> tuple[float, float]:
    """An axis range around ``values`` with room for point labels at the edges."""
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.15 or abs(hi) * 0.1 or 1.0
    return lo - pad, hi + pad


def charts(data: dict[str, Any]) -> dict[str, str]:
    """The page's charts as SVG strings, by name (a chart with no data is left out)."""
    cycles, out = data["cycles"], {}
    weeks = [c["week"] for c in cycles]

    def series(key: str) -> list[float | None]:
        return [_num(c.get(key)) for c in cycles]

    def lines(name: str, title: str, wanted: list[tuple[str, str]], **options) -> None:
        values = {label: series(key) for label, key in wanted}
        if not any(v is not None for vs in values.values() for v in vs):
            return
        chart = _chart(pygal.Line, title, x_labels=weeks, x_label_rotation=30, allow_interruptions=True, **options)
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
    lines("pm_gap", "PPO reward: train PM vs held-out test PM", [("train PM", "ppo_reward"),
          ("test PM", "ppo_reward_test_pm"), ("train-PM ensemble spread", "ppo_reward_spread")])
    lines("gold", "Gold score of the deployed policy", [("gold", "gold_score")])

    points = [(math.sqrt(kl), reward, c["week"]) for c in cycles
              if (kl := _num(c.get("kl"))) is not None and kl >= 0 and (reward := _num(c.get("ppo_reward"))) is not None]
    if points:
        xs, ys = [x for x, _, _ in points], [y for _, y, _ in points]
        chart = _chart(pygal.XY, "PPO reward vs sqrt(KL), one point per cycle", stroke=False, print_labels=True,
                       x_title="sqrt(KL to reference)", y_title="mean PM reward",
                       xrange=_padded(xs), range=_padded(ys))
        chart.add("cycles", [{"value": (x, y), "label": week} for x, y, week in points])
        out["reward_kl"] = chart.render(is_unicode=True)

    feedback = data["feedback"]
    if feedback:
        labels = [f["week"] for f in feedback]
        chart = _chart(pygal.Bar, "Comparisons registered while each cycle ran", x_labels=labels, x_label_rotation=30)
        chart.add("comparisons", [f["comparisons"] for f in feedback])
        out["feedback"] = chart.render(is_unicode=True)
        agreement = [_num(f["agreement"]) for f in feedback]
        if any(a is not None for a in agreement):
            chart = _chart(pygal.Line, "Rater agreement (pairs judged by several raters)", x_labels=labels,
                           x_label_rotation=30, allow_interruptions=True, range=(0, 1))
            chart.add("agreement", agreement)
            out["agreement"] = chart.render(is_unicode=True)
    return out


# --- auth and routes -----------------------------------------------------------------------


async def _caller(request: Request) -> Caller | None:
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else request.cookies.get(COOKIE)
    return await caller_of(request, token) if token else None


def _refused(caller: Caller) -> HTMLResponse | None:
    """The 403 page for a key below the dashboard's role, else None."""
    if ROLE_RANK[caller.role] >= ROLE_RANK[ROLE]:
        return None
    return _page("login.html", 403, error=f"the dashboard needs an {ROLE} key; {caller.name!r} is a {caller.role}")


def _page(name: str, status: int = 200, **context) -> HTMLResponse:
    return HTMLResponse(_templates.get_template(name).render(**context), status_code=status)


@router.get("", response_class=HTMLResponse)
async def dashboard(
    request: Request,
    weeks: Annotated[int, Query(ge=1, le=104, description="how many of the latest cycles to show")] = 12,
    target: Annotated[str, Query(min_length=1, max_length=200, pattern=r"^[^\x00]*$")] = "default",
) -> Response:
    caller = await _caller(request)
    if caller is None:
        return RedirectResponse("/dashboard/login", status_code=303)
    if (refused := _refused(caller)) is not None:
        return refused
    data = await run_in_threadpool(dashboard_data, request.app.state.database, weeks=weeks, target=target)
    svgs = await run_in_threadpool(charts, data)
    prefect_ui = os.environ.get("PREFECT_UI_URL", "").rstrip("/")
    return _page("dashboard.html", data=data, charts=svgs, caller=caller, prefect_ui=prefect_ui)


@router.get("/login", response_class=HTMLResponse)
async def login_form() -> Response:
    return _page("login.html")


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    body = await request.body()
    token = parse_qs(body[:MAX_LOGIN_BYTES].decode("utf-8", "replace")).get("token", [""])[0].strip()
    caller = await caller_of(request, token) if token else None
    if caller is None:
        return _page("login.html", 401, error="unknown or revoked API key")
    if (refused := _refused(caller)) is not None:
        return refused
    response = RedirectResponse("/dashboard", status_code=303)
    response.set_cookie(COOKIE, token, max_age=SESSION_S, path="/dashboard", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
async def logout() -> Response:
    response = RedirectResponse("/dashboard/login", status_code=303)
    response.delete_cookie(COOKIE, path="/dashboard")
    return response
