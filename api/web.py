"""The browser pages' common ground: sign-in sessions, CSRF tokens, the Origin check and the pages' headers.

The dashboard (``/dashboard``) and the comparison page (``/label``) each sign
a browser in with an API key (``SignIn``): a server-side session
(``store.sessions``) whose random id is the only thing the cookie holds
(HttpOnly, SameSite=Strict, on the pages' own path, Secure over https or with
``RATCHET_DASHBOARD_SECURE_COOKIE``); it ends after
``RATCHET_DASHBOARD_SESSION_S``, after ``RATCHET_DASHBOARD_IDLE_S`` unused, at
sign-out, or when its key is revoked.

Every form is guarded twice: a POST whose Origin (or, without one, Referer)
is not this server's is refused with 403, and so is one without the form's
CSRF token: a session's forms carry an HMAC of its id (only its browser holds
the id), the sign-in form a random token that must match its cookie (double
submit). A request with neither Origin nor Referer is not a browser's; the
token still guards it. Every page carries a Content-Security-Policy that
loads nothing; its style sheets (and, where a page has one, its script) carry
a nonce made for that answer. A script may send ``Authorization: Bearer``
instead of signing in; it needs no CSRF token, having no cookie to abuse.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from functools import partial
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from api.deps import ROLE_RANK, Caller, caller_of
from store.db import Database
from store.sessions import create_session, purge_sessions, resolve_session, revoke_session

MAX_FORM_BYTES = 4096
"""the bytes of a form body read by default (the sign-in and sign-out forms are far smaller)"""
DEFAULT_PORTS = {"http": 80, "https": 443}
CSRF_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}")
"""a sign-in token as ``secrets.token_urlsafe(32)`` makes it"""

templates = Environment(loader=PackageLoader("api", "templates"), autoescape=select_autoescape(["html"]))


# --- a page's headers ------------------------------------------------------------------------


def csp(nonce: str | None = None, *, script: bool = False) -> str:
    """A page's Content-Security-Policy: nothing loaded, no framing; only the style sheets (and, with
    ``script``, the scripts) that carry ``nonce``; a page with a script may call back to this site
    (the comparison page renews its lease)."""
    styles = f"style-src 'nonce-{nonce}'; " if nonce else ""
    scripts = f"script-src 'nonce-{nonce}'; connect-src 'self'; " if nonce and script else ""
    return f"default-src 'none'; {styles}{scripts}form-action 'self'; frame-ancestors 'none'; base-uri 'none'"


def page(name: str, status: int = 200, *, nonce: str | None = None, script: bool = False, **context) -> HTMLResponse:
    """A page, with a CSP nonce made for it (or ``nonce``, which its charts already carry);
    ``no-store``, so no copy outlives a sign-out in the browser's cache."""
    nonce = nonce or secrets.token_urlsafe(16)
    html = templates.get_template(name).render(csp_nonce=nonce, **context)
    return HTMLResponse(html, status_code=status,
                        headers={"Content-Security-Policy": csp(nonce, script=script), "Cache-Control": "no-store"})


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers={"Content-Security-Policy": csp()})


# --- forms -----------------------------------------------------------------------------------


def same_token(given: str, expected: str) -> bool:
    return bool(given) and bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return ("", None, None)
    return (parts.scheme, parts.hostname, port)


def from_this_site(request: Request) -> bool:
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


async def read_form(request: Request, *, max_bytes: int = MAX_FORM_BYTES) -> dict[str, str]:
    """The fields of a url-encoded form body (the first ``max_bytes`` of it): each field's first value, stripped."""
    body = await request.body()
    fields = parse_qs(body[:max_bytes].decode("utf-8", "replace"))
    return {name: values[0].strip() for name, values in fields.items()}


# --- sessions --------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class SignIn:
    """How a browser signs in to the pages under ``path``: their cookies, the role they need, the
    sign-in page's words. ``login`` and ``logout`` are the bodies of ``POST {path}/login`` and
    ``POST {path}/logout``."""

    path: str
    """where the pages live (``/dashboard``); the cookies are sent there only"""
    cookie: str
    """the session cookie: the session's id, never the key"""
    csrf_cookie: str
    """the sign-in form's double-submit token"""
    role: str
    """the lowest role that may sign in"""
    title: str
    """the pages, as a sentence names them ("the dashboard")"""
    key_hint: str
    """which key to sign in with, as the sign-in page says it ("an operator or admin API key")"""
    key_command: str
    """the command that makes such a key"""
    stale_cookies: tuple[str, ...] = ()
    """cookies that earlier versions set, cleared at every sign-in and sign-out"""

    def form_csrf(self, session_id: str) -> str:
        """The CSRF token of a session's forms: an HMAC of its id, which only its browser holds."""
        purpose = f"ratchet {self.path.strip('/')} forms".encode()
        return hmac.new(session_id.encode(), purpose, hashlib.sha256).hexdigest()

    async def caller(self, request: Request) -> tuple[Caller | None, str | None]:
        """The key a request came with, and the browser's session id when it came with a live
        session cookie: a script's ``Authorization: Bearer`` header is read first."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            token = header[7:].strip()
            return (await caller_of(request, token) if token else None), None
        session_id = request.cookies.get(self.cookie)
        if not session_id:
            return None, None
        settings = request.app.state.settings
        caller = await run_in_threadpool(_session_key, request.app.state.database, session_id,
                                         settings.dashboard_idle_s)
        return caller, session_id if caller is not None else None

    def set_cookie(self, response: Response, request: Request, name: str, value: str, *, max_age: int | None) -> None:
        secure = request.app.state.settings.dashboard_secure_cookie or request.url.scheme == "https"
        response.set_cookie(name, value, max_age=max_age, path=self.path, httponly=True, samesite="strict",
                            secure=secure)

    def drop_cookies(self, response: Response, *names: str) -> None:
        for name in names:
            response.delete_cookie(name, path=self.path, httponly=True, samesite="strict")

    def sign_in_page(self, request: Request, status: int = 200, *, error: str | None = None) -> HTMLResponse:
        """The sign-in form, with its double-submit CSRF token in a hidden field and in a
        cookie (the browser's token, when it has one, so that two open forms both work)."""
        token = request.cookies.get(self.csrf_cookie, "")
        if not CSRF_SHAPE.fullmatch(token):
            token = secrets.token_urlsafe(32)
        response = page("login.html", status, error=error, csrf=token, sign_in=self)
        self.set_cookie(response, request, self.csrf_cookie, token, max_age=None)
        return response

    def refused(self, request: Request, caller: Caller) -> HTMLResponse | None:
        """The 403 page for a key below the pages' role, else None."""
        if ROLE_RANK[caller.role] >= ROLE_RANK[self.role]:
            return None
        article = "an" if self.role[0] in "aeiou" else "a"
        return self.sign_in_page(request, 403, error=f"{self.title} needs {article} {self.role} key; "
                                                     f"{caller.name!r} is a {caller.role}")

    def cross_site(self, request: Request) -> HTMLResponse:
        return self.sign_in_page(request, 403, error="refused: this form was sent from another site")

    async def login(self, request: Request) -> Response:
        """Check the sign-in form and open a session; to ``path`` signed in, or the form again saying why not."""
        if not from_this_site(request):
            return self.cross_site(request)
        form = await read_form(request)
        if not same_token(form.get("csrf", ""), request.cookies.get(self.csrf_cookie, "")):
            return self.sign_in_page(request, 403,
                                     error="the sign-in form was out of date: reload the page and sign in again")
        token = form.get("token", "")
        caller = await caller_of(request, token) if token else None
        if caller is None:
            return self.sign_in_page(request, 401, error="unknown or revoked API key")
        if (refused := self.refused(request, caller)) is not None:
            return refused
        settings = request.app.state.settings
        session_id = await run_in_threadpool(
            partial(_open_session, request.app.state.database, api_key_id=caller.id,
                    replaces=request.cookies.get(self.cookie), lifetime_s=settings.dashboard_session_s,
                    idle_s=settings.dashboard_idle_s)
        )
        response = redirect(self.path)
        self.set_cookie(response, request, self.cookie, session_id, max_age=settings.dashboard_session_s)
        self.drop_cookies(response, self.csrf_cookie, *self.stale_cookies)
        return response

    async def logout(self, request: Request) -> Response:
        """End the browser's session (a request without one just clears its cookies)."""
        if not from_this_site(request):
            return self.cross_site(request)
        session_id = request.cookies.get(self.cookie)
        if session_id:
            form = await read_form(request)
            if not same_token(form.get("csrf", ""), self.form_csrf(session_id)):
                return self.sign_in_page(request, 403,
                                         error=f"the sign-out form was out of date: reload {self.title} and try again")
            await run_in_threadpool(_close_session, request.app.state.database, session_id)
        response = redirect(f"{self.path}/login")
        self.drop_cookies(response, self.cookie, *self.stale_cookies)
        return response

    def add_routes(self, router: APIRouter) -> None:
        """Serve ``GET`` and ``POST {path}/login`` and ``POST {path}/logout`` on ``router`` (whose prefix is ``path``)."""

        async def login_form(request: Request) -> Response:
            """The sign-in form."""
            return self.sign_in_page(request)

        async def login(request: Request) -> Response:
            """Sign in with an API key: a server-side session, its id in an HttpOnly cookie."""
            return await self.login(request)

        async def logout(request: Request) -> Response:
            """Ends the browser's session (a request without one just clears its cookies)."""
            return await self.logout(request)

        router.add_api_route("/login", login_form, methods=["GET"], response_class=HTMLResponse)
        router.add_api_route("/login", login, methods=["POST"], response_class=HTMLResponse)
        router.add_api_route("/logout", logout, methods=["POST"])
