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
signs in with an operator (or admin) key at ``/dashboard/login`` and gets a
server-side session (``store.sessions``): the cookie holds only the session's
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
import hmac
import logging
import math
import os
import re
import secrets
from functools import partial
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit
from uuid import UUID

import pygal
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from api.deps import ROLE_RANK, Caller, caller_of
from store.db import Database
from store.sessions import create_session, purge_sessions, resolve_session, revoke_session
from store.status import deployed_lineage, feedback_by_cycle, recent_cycles

router = APIRouter(prefix="/dashboard", include_in_schema=False)
log = logging.getLogger(__name__)

COOKIE = "ratchet_dashboard_session"
"""the session cookie: the session's id, never the key"""
CSRF_COOKIE = "ratchet_dashboard_csrf"
"""the sign-in form's double-submit token"""
KEY_COOKIE = "ratchet_dashboard_key"
"""where earlier versions kept the key itself; cleared at every sign-in and sign-out"""
PREFECT_TIMEOUT_S = 3.0
MAX_FORM_BYTES = 4096
ROLE = "operator"
DEFAULT_PORTS = {"http": 80, "https": 443}
CSRF_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}")
"""a sign-in token as ``secrets.token_urlsafe(32)`` makes it"""

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
        cycles = recent_cycles(session, limit=weeks)
        deployed = deployed_lineage(session, target=target)
        feedback = feedback_by_cycle(session, cycles)
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
    lines("pm_gap", "PPO reward: train PM vs held-out test PM", [("train PM", "ppo_reward"),
          ("test PM", "ppo_reward_test_pm"), ("train-PM ensemble spread", "ppo_reward_spread")])
    lines("gold", "Gold score of the deployed policy", [("gold", "gold_score")])

    points = [(math.sqrt(kl), reward, c["week"]) for c in cycles
              if (kl := _num(c.get("kl"))) is not None and kl >= 0 and (reward := _num(c.get("ppo_reward"))) is not None]
    if points:
        xs, ys = [x for x, _, _ in points], [y for _, y, _ in points]
        chart = _chart(pygal.XY, "PPO reward vs sqrt(KL), one point per cycle", nonce=nonce, stroke=False,
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
    return out


# --- sign-in, sessions, CSRF and the page's headers ----------------------------------------


def _session_key(database: Database, session_id: str, idle_s: int) -> Caller | None:
    with database.session() as session:
        key = resolve_session(session, session_id=session_id, idle_s=idle_s)
        return None if key is None else Caller(id=key.id, name=key.name, role=key.role)


def _open_session(database: Database, *, api_key_id: int, replaces: str | None, lifetime_s: int,
                  idle_s: int) -> str:
    """A new session's id; the one the browser held before (if any) ends, and sessions
    that can no longer be used are deleted."""
    with database.session() as session:
        if replaces:
            revoke_session(session, session_id=replaces)
        purge_sessions(session, idle_s=idle_s)
        return create_session(session, api_key_id=api_key_id, lifetime_s=lifetime_s)[1]


def _close_session(database: Database, session_id: str) -> None:
    with database.session() as session:
        revoke_session(session, session_id=session_id)


async def _caller(request: Request) -> tuple[Caller | None, str | None]:
    """The key a request came with, and the browser's session id when it came with a live
    session cookie: a script's ``Authorization: Bearer`` header is read first."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        token = header[7:].strip()
        return (await caller_of(request, token) if token else None), None
    session_id = request.cookies.get(COOKIE)
    if not session_id:
        return None, None
    settings = request.app.state.settings
    caller = await run_in_threadpool(_session_key, request.app.state.database, session_id, settings.dashboard_idle_s)
    return caller, session_id if caller is not None else None


def _session_csrf(session_id: str) -> str:
    """The CSRF token of a session's forms: an HMAC of its id, which only its browser holds."""
    return hmac.new(session_id.encode(), b"ratchet dashboard forms", hashlib.sha256).hexdigest()


def _same_token(given: str, expected: str) -> bool:
    return bool(given) and bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return ("", None, None)
    return (parts.scheme, parts.hostname, port)


def _from_this_site(request: Request) -> bool:
    """Whether a POST came from a page of this server: its Origin, or its Referer when it
    sends no Origin, names the scheme, host and port the request came to (an opaque
    ``null`` origin does not). A request with neither header is not a browser's and
    passes; the form's CSRF token still guards it."""
    source = request.headers.get("origin")
    if source is None:
        source = request.headers.get("referer")
    if source is None:
        return True
    return _origin(source) == _origin(str(request.base_url))


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    fields = parse_qs(body[:MAX_FORM_BYTES].decode("utf-8", "replace"))
    return {name: values[0].strip() for name, values in fields.items()}


def _csp(nonce: str | None = None) -> str:
    """The dashboard's Content-Security-Policy: nothing loaded, no script, no framing; only
    the style sheets that carry ``nonce``."""
    styles = f"style-src 'nonce-{nonce}'; " if nonce else ""
    return f"default-src 'none'; {styles}form-action 'self'; frame-ancestors 'none'; base-uri 'none'"


def _page(name: str, status: int = 200, *, nonce: str | None = None, **context) -> HTMLResponse:
    """A page, with a CSP nonce made for it (or ``nonce``, which its charts already carry);
    ``no-store``, so no copy outlives a sign-out in the browser's cache."""
    nonce = nonce or secrets.token_urlsafe(16)
    html = _templates.get_template(name).render(csp_nonce=nonce, **context)
    return HTMLResponse(html, status_code=status,
                        headers={"Content-Security-Policy": _csp(nonce), "Cache-Control": "no-store"})


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers={"Content-Security-Policy": _csp()})


def _set_cookie(response: Response, request: Request, name: str, value: str, *, max_age: int | None) -> None:
    secure = request.app.state.settings.dashboard_secure_cookie or request.url.scheme == "https"
    response.set_cookie(name, value, max_age=max_age, path="/dashboard", httponly=True, samesite="strict",
                        secure=secure)


def _drop_cookies(response: Response, *names: str) -> None:
    for name in names:
        response.delete_cookie(name, path="/dashboard", httponly=True, samesite="strict")


def _sign_in_page(request: Request, status: int = 200, *, error: str | None = None) -> HTMLResponse:
    """The sign-in form, with its double-submit CSRF token in a hidden field and in a
    cookie (the browser's token, when it has one, so that two open forms both work)."""
    token = request.cookies.get(CSRF_COOKIE, "")
    if not CSRF_SHAPE.fullmatch(token):
        token = secrets.token_urlsafe(32)
    response = _page("login.html", status, error=error, csrf=token)
    _set_cookie(response, request, CSRF_COOKIE, token, max_age=None)
    return response


def _refused(request: Request, caller: Caller) -> HTMLResponse | None:
    """The 403 page for a key below the dashboard's role, else None."""
    if ROLE_RANK[caller.role] >= ROLE_RANK[ROLE]:
        return None
    return _sign_in_page(request, 403, error=f"the dashboard needs an {ROLE} key; {caller.name!r} is a {caller.role}")


def _cross_site(request: Request) -> HTMLResponse:
    return _sign_in_page(request, 403, error="refused: this form was sent from another site")


# --- routes ----------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
async def dashboard(
    request: Request,
    weeks: Annotated[int, Query(ge=1, le=104, description="how many of the latest cycles to show")] = 12,
    target: Annotated[str, Query(min_length=1, max_length=200, pattern=r"^[^\x00]*$")] = "default",
) -> Response:
    caller, session_id = await _caller(request)
    if caller is None:
        return _redirect("/dashboard/login")
    if (refused := _refused(request, caller)) is not None:
        return refused
    nonce = secrets.token_urlsafe(16)
    data = await run_in_threadpool(dashboard_data, request.app.state.database, weeks=weeks, target=target)
    svgs = await run_in_threadpool(partial(charts, data, nonce=nonce))
    prefect_ui = os.environ.get("PREFECT_UI_URL", "").rstrip("/")
    csrf = _session_csrf(session_id) if session_id else None
    return _page("dashboard.html", nonce=nonce, data=data, charts=svgs, caller=caller, prefect_ui=prefect_ui, csrf=csrf)


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request) -> Response:
    return _sign_in_page(request)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    if not _from_this_site(request):
        return _cross_site(request)
    form = await _form(request)
    if not _same_token(form.get("csrf", ""), request.cookies.get(CSRF_COOKIE, "")):
        return _sign_in_page(request, 403, error="the sign-in form was out of date: reload the page and sign in again")
    token = form.get("token", "")
    caller = await caller_of(request, token) if token else None
    if caller is None:
        return _sign_in_page(request, 401, error="unknown or revoked API key")
    if (refused := _refused(request, caller)) is not None:
        return refused
    settings = request.app.state.settings
    session_id = await run_in_threadpool(
        partial(_open_session, request.app.state.database, api_key_id=caller.id, replaces=request.cookies.get(COOKIE),
                lifetime_s=settings.dashboard_session_s, idle_s=settings.dashboard_idle_s)
    )
    response = _redirect("/dashboard")
    _set_cookie(response, request, COOKIE, session_id, max_age=settings.dashboard_session_s)
    _drop_cookies(response, CSRF_COOKIE, KEY_COOKIE)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    """Ends the browser's session (a request without one just clears its cookies)."""
    if not _from_this_site(request):
        return _cross_site(request)
    session_id = request.cookies.get(COOKIE)
    if session_id:
        form = await _form(request)
        if not _same_token(form.get("csrf", ""), _session_csrf(session_id)):
            return _sign_in_page(request, 403,
                                 error="the sign-out form was out of date: reload the dashboard and try again")
        await run_in_threadpool(_close_session, request.app.state.database, session_id)
    response = _redirect("/dashboard/login")
    _drop_cookies(response, COOKIE, KEY_COOKIE)
    return response
