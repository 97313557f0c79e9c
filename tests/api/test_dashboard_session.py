"""The dashboard's sign-in on the real app and PostgreSQL: server-side sessions, CSRF, security headers.

The browser test at the end runs the app under uvicorn and drives Debian's
chromium with Playwright; off CI it is skipped, saying why, where either is missing (in CI that fails).
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.routes.dashboard import COOKIE, CSRF_COOKIE
from store.keys import create_api_key, revoke_api_key
from store.models import utcnow
from store.settings import Settings
from tests.api.conftest import bearer
from tests.conftest import IN_CI
from tests.api.test_dashboard import form_csrf, seed, sign_in, token_of

CHROMIUM = "/usr/bin/chromium"
LIFETIME_S = 3600
IDLE_S = 600


@pytest.fixture
def api_settings(tmp_path) -> Settings:
    return Settings(home=tmp_path, dashboard_session_s=LIFETIME_S, dashboard_idle_s=IDLE_S)


def cookie_flags(answer, name: str = COOKIE) -> list[str]:
    """The attributes of the cookie ``name`` that ``answer`` sets, lower-cased."""
    (cookie,) = [c for c in answer.headers.get_list("set-cookie") if c.startswith(f"{name}=")]
    return [part.strip().lower() for part in cookie.split(";")[1:]]


def session_cookie(client: TestClient) -> str:
    return client.cookies[COOKIE]


def with_cookie(client: TestClient, value: str) -> TestClient:
    """``client`` holding only the session cookie ``value`` (as a copied cookie would be)."""
    client.cookies.clear()
    client.cookies.set(COOKIE, value, path="/dashboard")
    return client


def signed_in(client: TestClient) -> bool:
    answer = client.get("/dashboard", follow_redirects=False)
    assert answer.status_code in (200, 303), answer.text
    return answer.status_code == 200


def clock_at(monkeypatch, start, seconds: float) -> None:
    """The session store's clock, ``seconds`` after ``start``."""
    monkeypatch.setattr("store.sessions.utcnow", lambda: start + timedelta(seconds=seconds))


def test_the_cookie_holds_a_session_id_not_the_key(client, keys, pg_db):
    answer = sign_in(client, keys.operator)
    assert answer.status_code == 303
    value = session_cookie(client)
    assert token_of(keys.operator) not in answer.headers["set-cookie"] and len(value) >= 43
    flags = cookie_flags(answer)
    assert "httponly" in flags and "samesite=strict" in flags and "path=/dashboard" in flags
    assert "secure" not in flags  # plain http, and the setting is off
    assert signed_in(client)
    from store.models import DashboardSession

    with pg_db.session() as s:
        (row,) = s.query(DashboardSession).all()
        assert row.token_sha256 == hashlib.sha256(value.encode()).hexdigest() != value
        assert row.expires_at - row.created_at == timedelta(seconds=LIFETIME_S)


def test_the_cookie_is_secure_over_https_or_by_setting(pg_db, artifacts, keys, tmp_path):
    over_https = create_app(Settings(home=tmp_path), database=pg_db, artifacts=artifacts)
    with TestClient(over_https, base_url="https://testserver") as c:
        assert "secure" in cookie_flags(sign_in(c, keys.operator))
    # TLS ended at a proxy: the app sees plain http, the browser https (and sends the Secure cookie back).
    by_setting = create_app(Settings(home=tmp_path, dashboard_secure_cookie=True), database=pg_db, artifacts=artifacts)
    with TestClient(by_setting) as c:
        form = c.get("/dashboard/login")
        assert "secure" in cookie_flags(form, CSRF_COOKIE)
        answer = c.post("/dashboard/login", data={"token": token_of(keys.operator), "csrf": form_csrf(form.text)},
                        headers={"Cookie": f"{CSRF_COOKIE}={form_csrf(form.text)}"}, follow_redirects=False)
        assert answer.status_code == 303
        assert "secure" in cookie_flags(answer)


def test_sign_out_revokes_the_session_so_a_copied_cookie_is_refused(client, keys):
    sign_in(client, keys.operator)
    copied = session_cookie(client)
    page = client.get("/dashboard")
    out = client.post("/dashboard/logout", data={"csrf": form_csrf(page.text)}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/dashboard/login"
    assert not signed_in(with_cookie(client, copied))
    assert client.get("/dashboard").url.path == "/dashboard/login"


def test_a_session_ends_when_idle_and_at_its_lifetime(client, keys, monkeypatch):
    start = utcnow()
    clock_at(monkeypatch, start, 0)
    sign_in(client, keys.operator)
    for seconds in (IDLE_S - 60, 2 * IDLE_S - 120):  # each visit within the idle timeout of the last
        clock_at(monkeypatch, start, seconds)
        assert signed_in(client), seconds
    clock_at(monkeypatch, start, 3 * IDLE_S)  # idle for more than IDLE_S
    assert not signed_in(client)

    clock_at(monkeypatch, start, 0)
    sign_in(client, keys.operator)
    for seconds in range(IDLE_S - 60, LIFETIME_S, IDLE_S - 60):  # active all along...
        clock_at(monkeypatch, start, seconds)
        assert signed_in(client), seconds
    clock_at(monkeypatch, start, LIFETIME_S + 1)  # ...but past its lifetime
    assert not signed_in(client)


def test_revoking_the_key_ends_its_sessions(client, keys, pg_db):
    with pg_db.session() as s:
        ops = bearer(create_api_key(s, name="ops", role="operator")[1])
    sign_in(client, ops)
    assert signed_in(client)
    with pg_db.session() as s:  # as `ratchet keys revoke` does: not through this server's key cache
        revoke_api_key(s, name="ops")
    assert not signed_in(client)
    from store.models import DashboardSession

    with pg_db.session() as s:
        assert all(row.revoked_at is not None for row in s.query(DashboardSession).all())


@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://testserver:8080"},
    {"Referer": "https://evil.example/page"},
], ids=["other-site", "opaque", "other-port", "referer-only"])
def test_a_cross_site_sign_in_is_403(client, keys, headers):
    answer = sign_in(client, keys.operator, **headers)
    assert answer.status_code == 403 and "another site" in answer.text
    assert COOKIE not in client.cookies


def test_a_same_origin_sign_in_with_origin_or_referer_is_accepted(client, keys):
    assert sign_in(client, keys.operator, Origin="http://testserver").status_code == 303
    assert sign_in(client, keys.operator, Referer="http://testserver/dashboard/login").status_code == 303


def test_sign_in_without_or_with_a_wrong_csrf_token_is_403(client, keys):
    token = token_of(keys.operator)
    client.get("/dashboard/login")  # sets the form's CSRF cookie
    for form in ({"token": token}, {"token": token, "csrf": "forged"}):
        answer = client.post("/dashboard/login", data=form, follow_redirects=False)
        assert answer.status_code == 403 and "reload the page" in answer.text
        assert COOKIE not in client.cookies
    page = client.get("/dashboard/login")
    client.cookies.clear()  # the token from the page, but not the cookie it came with
    answer = client.post("/dashboard/login", data={"token": token, "csrf": form_csrf(page.text)},
                         follow_redirects=False)
    assert answer.status_code == 403 and COOKIE not in client.cookies


def test_sign_out_without_or_with_a_wrong_csrf_token_is_403(client, keys):
    sign_in(client, keys.operator)
    page = client.get("/dashboard")
    for form in ({}, {"csrf": "forged"}):
        answer = client.post("/dashboard/logout", data=form, follow_redirects=False)
        assert answer.status_code == 403
        assert signed_in(client)
    other = sign_in(TestClient(client.app), keys.operator)  # another session's token is no good either
    assert other.status_code == 303
    answer = client.post("/dashboard/logout", data={"csrf": form_csrf(page.text) + "x"}, follow_redirects=False)
    assert answer.status_code == 403 and signed_in(client)
    cross = client.post("/dashboard/logout", data={"csrf": form_csrf(page.text)},
                        headers={"Origin": "https://evil.example"}, follow_redirects=False)
    assert cross.status_code == 403 and signed_in(client)


def test_dashboard_answers_carry_the_security_headers(client, keys, pg_db, artifacts):
    seed(pg_db, artifacts)
    login_page = client.get("/dashboard/login")
    signing_in = sign_in(client, keys.operator)
    page, again = client.get("/dashboard"), client.get("/dashboard")
    client.cookies.clear()
    redirect = client.get("/dashboard", follow_redirects=False)
    for answer in (login_page, signing_in, page, redirect):
        h = answer.headers
        assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff"
        assert h["referrer-policy"] == "same-origin"
        csp = h["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "form-action 'self'" in csp
        assert "unsafe-inline" not in csp
    for answer in (login_page, page):
        assert answer.headers["cache-control"] == "no-store"
    # The page's own style sheet and each chart's carry the answer's nonce; nothing else is inline.
    nonce = re.search(r"style-src 'nonce-([^']+)'", page.headers["content-security-policy"]).group(1)
    assert len(nonce) >= 22 and nonce not in again.text
    styles = re.findall(r"<style\b[^>]*>", page.text)
    assert len(styles) == 1 + 8 and all(f'nonce="{nonce}"' in tag for tag in styles)
    assert "<script" not in page.text and " style=" not in page.text
    api = client.get("/v1/api-keys")  # the API's answers carry the frame and sniffing headers too
    assert api.status_code == 401
    assert api.headers["x-frame-options"] == "DENY" and api.headers["x-content-type-options"] == "nosniff"


# --- a real browser --------------------------------------------------------------------------------


class LiveApp:
    """The app under uvicorn in a thread of this process, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="asyncio", log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveApp:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *_) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def csp_problems(messages: list[str]) -> list[str]:
    return [m for m in messages if "Content Security Policy" in m or m.startswith("pageerror")]


def test_the_pages_render_in_chromium_under_their_csp(pg_db, artifacts, api_settings, keys, tmp_path):
    # .ci/run installs both; in CI a missing browser is a failure, never a skip
    missing = pytest.fail if IN_CI else pytest.skip
    try:
        from playwright import sync_api
    except ImportError:
        missing("Playwright for Python is not installed (the [dev] extra has it)")
    if not Path(CHROMIUM).exists():
        missing(f"no browser at {CHROMIUM} (Debian's chromium package)")
    seed(pg_db, artifacts)
    app = create_app(api_settings, database=pg_db, artifacts=artifacts)
    messages: list[str] = []
    with LiveApp(app) as live, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: messages.append(f"console {m.type}: {m.text}"))
            page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
            login = page.goto(f"{live.base}/dashboard/login")
            assert "frame-ancestors 'none'" in login.headers["content-security-policy"]
            page.screenshot(path=tmp_path / "login.png", full_page=True)

            page.fill('input[name="token"]', token_of(keys.operator))
            page.click('button[type="submit"]')
            page.wait_for_url(f"{live.base}/dashboard")
            assert page.locator("figure svg").count() == 8
            assert not csp_problems(messages), messages
            # both style sheets applied: the page's and pygal's inside each chart
            assert page.eval_on_selector("body", "e => getComputedStyle(e).backgroundColor") == "rgb(246, 247, 249)"
            assert page.eval_on_selector("#chart-pm svg .title", "e => getComputedStyle(e).fontSize") == "16px"
            assert page.evaluate("document.cookie") == ""  # the session cookie is HttpOnly
            page.screenshot(path=tmp_path / "dashboard.png", full_page=True)

            page.click("text=Sign out")
            page.wait_for_url(f"{live.base}/dashboard/login")
            assert page.goto(f"{live.base}/dashboard").url == f"{live.base}/dashboard/login"
        finally:
            browser.close()
    assert not csp_problems(messages), messages
