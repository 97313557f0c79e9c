"""The dashboard's pages in a real browser: an operator signs in, follows the cycles table to a cycle's page,
and no page scrolls sideways on a 400 px wide phone; an operator cancels a running cycle through its form and
the confirmation page, no script needed.

It runs the app under uvicorn (``LiveApp``) and drives Debian's chromium with Playwright; off CI it is
skipped, saying why, where either is missing (in CI that fails). Screenshots at 1280 and 400 px go to
``RATCHET_TEST_SHOTS`` (a folder; default: the test's temporary folder), one ``{page}-{width}.png`` each.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from api.app import create_app
from orchestrator.launcher import ThreadLauncher
from orchestrator.settings import CycleSettings
from store.cycles import finish_stage, start_stage
from tests.api.test_dashboard import seed_raters, token_of
from tests.api.test_dashboard_pages import RUNNING, seed_actions, seed_pages
from tests.api.test_dashboard_session import CHROMIUM, LiveApp, csp_problems
from tests.conftest import IN_CI

WIDE, PHONE = 1280, 400

SIDEWAYS = """() => [...document.querySelectorAll('body *')]
    .filter(e => !e.closest('.scroll') && e.getBoundingClientRect().right > window.innerWidth + 0.5)
    .slice(0, 5).map(e => `${e.tagName.toLowerCase()}#${e.id}.${e.getAttribute('class') || ''}`)"""
"""the first elements outside a scrolling wrapper that reach past the viewport's right edge (what to fix)"""


def playwright_or_skip():
    # .ci/run installs both; in CI a missing browser is a failure, never a skip
    missing = pytest.fail if IN_CI else pytest.skip
    try:
        from playwright import sync_api
    except ImportError:
        missing("Playwright for Python is not installed (the [dev] extra has it)")
    if not Path(CHROMIUM).exists():
        missing(f"no browser at {CHROMIUM} (Debian's chromium package)")
    return sync_api


def check_widths(page, name: str, shots: Path, *, wide: int = WIDE) -> None:
    """Screenshots of the open page at both widths; at the phone's, nothing scrolls sideways."""
    page.set_viewport_size({"width": wide, "height": 900})
    page.screenshot(path=shots / f"{name}-{wide}.png", full_page=True)
    page.set_viewport_size({"width": PHONE, "height": 900})
    width = page.evaluate("document.documentElement.scrollWidth")
    inner = page.evaluate("window.innerWidth")
    assert width <= inner, f"{name} is {width} px wide at a {inner} px viewport; past the edge: {page.evaluate(SIDEWAYS)}"
    page.screenshot(path=shots / f"{name}-{PHONE}.png", full_page=True)


def test_every_dashboard_page_fits_a_phone(pg_db, artifacts, api_settings, keys, tmp_path):
    sync_api = playwright_or_skip()
    seeded = seed_pages(pg_db, artifacts)
    seed_raters(pg_db)  # the raters table, ten columns wide
    shots = Path(os.environ.get("RATCHET_TEST_SHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    app = create_app(api_settings, database=pg_db, artifacts=artifacts)
    messages: list[str] = []
    with LiveApp(app) as live, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": WIDE, "height": 900})
            page.on("console", lambda m: messages.append(f"console {m.type}: {m.text}"))
            page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
            page.goto(f"{live.base}/dashboard/login")
            check_widths(page, "login", shots)
            page.fill('input[name="token"]', token_of(keys.operator))
            with page.expect_navigation():
                page.click('button[type="submit"]')
            assert page.url == f"{live.base}/dashboard"
            check_widths(page, "dashboard", shots)
            raters = page.eval_on_selector("#raters", "e => e.getBoundingClientRect().right")
            assert raters <= PHONE, f"the raters card reaches {raters} px"

            with page.expect_navigation():
                page.click("#cycles a.week:text('2026-W47')")
            assert page.url == f"{live.base}/dashboard/cycles/{seeded.cycle}"
            assert page.locator("#stage-deploy pre.text").count() == 1
            check_widths(page, "cycle", shots)
            for name, path in (("policy", f"policies/{seeded.p1}"), ("pm", f"pms/{seeded.pm}"),
                               ("dataset", f"datasets/{seeded.dataset}"), ("deployments", "deployments?target=default"),
                               ("not-found", "cycles/4242")):
                page.set_viewport_size({"width": WIDE, "height": 900})
                page.goto(f"{live.base}/dashboard/{path}")
                check_widths(page, name, shots)
        finally:
            browser.close()
    assert not csp_problems(messages), messages
    for shot in sorted(shots.glob("*.png")):
        print(f"screenshot: {shot}")


def sign_in_page(browser, base: str, token: str, messages: list[str]):
    """A new page signed in with ``token``, its console and page errors collected into ``messages``."""
    page = browser.new_page(viewport={"width": WIDE, "height": 900})
    page.on("console", lambda m: messages.append(f"console {m.type}: {m.text}"))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    page.goto(f"{base}/dashboard/login")
    page.fill('input[name="token"]', token)
    with page.expect_navigation():
        page.click('button[type="submit"]')
    return page


def test_an_operator_cancels_a_running_cycle_through_its_confirmation(pg_db, artifacts, api_settings, keys, tmp_path,
                                                                      no_prefect_api):
    sync_api = playwright_or_skip()
    subjects = seed_actions(pg_db)  # a running cycle, and a failed one that shows both forms
    shots = Path(os.environ.get("RATCHET_TEST_SHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    launcher = ThreadLauncher(pg_db, CycleSettings(), run=lambda **kw: None)
    app = create_app(api_settings, database=pg_db, artifacts=artifacts, cycle_launcher=launcher)
    messages: list[str] = []
    with LiveApp(app) as live, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = sign_in_page(browser, live.base, token_of(keys.operator), messages)
            page.goto(f"{live.base}/dashboard/cycles/{subjects.failed}")
            assert page.locator("#cancel-form").count() == 1 and page.locator("#rerun-form").count() == 1
            check_widths(page, "cycle-forms", shots, wide=1200)
            page.goto(f"{live.base}/dashboard")
            check_widths(page, "dashboard-forms", shots, wide=1200)
            page.goto(f"{live.base}/dashboard/deployments?target=default")
            assert page.locator("#rollback-form").count() == 1
            check_widths(page, "deployments-forms", shots, wide=1200)

            page.set_viewport_size({"width": WIDE, "height": 900})
            page.goto(f"{live.base}/dashboard/cycles/{subjects.running}")
            assert page.locator("#rerun-form").count() == 0
            page.fill("#cancel-reason", "the prompt set is <wrong>")
            with page.expect_navigation():
                page.click("#cancel-form button[type=submit]")
            assert page.url == f"{live.base}/dashboard/cycles/{subjects.running}/cancel"
            assert page.text_content("#confirm h2") == f"Cancel cycle {RUNNING}?"
            assert "the prompt set is <wrong>" in page.text_content("#confirm table")
            check_widths(page, "confirm", shots, wide=1200)
            with page.expect_navigation():
                page.click("#confirm-button")
            assert page.url.startswith(f"{live.base}/dashboard/cycles/{subjects.running}?done=")
            assert page.text_content("#cycle h2 .chip") == "cancelled"
            assert page.text_content("#done").strip().startswith(f"Cancelled cycle {RUNNING}.")
            assert page.locator("#cancel-form").count() == 0 and page.locator("#rerun-form").count() == 1
            check_widths(page, "cancelled", shots, wide=1200)
        finally:
            browser.close()
    assert not csp_problems(messages), messages
    for shot in sorted(shots.glob("*.png")):
        print(f"screenshot: {shot}")


def test_a_running_cycles_page_refreshes_itself_when_a_stage_finishes(pg_db, artifacts, api_settings, keys,
                                                                    no_prefect_api):
    sync_api = playwright_or_skip()
    subjects = seed_actions(pg_db)
    app = create_app(api_settings.model_copy(update={"dashboard_live_s": 0.3}), database=pg_db, artifacts=artifacts)
    messages: list[str] = []
    with LiveApp(app) as live, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = sign_in_page(browser, live.base, token_of(keys.operator), messages)
            page.goto(f"{live.base}/dashboard/cycles/{subjects.running}")
            assert page.text_content("#stages tr:has(a[href='#stage-sample']) .chip") == "running"
            page.wait_for_timeout(1000)  # several polls: nothing changed, no reload
            assert page.evaluate("performance.getEntriesByType('navigation')[0].type") == "navigate"
            with page.expect_navigation(timeout=10_000):
                with pg_db.session() as s:
                    finish_stage(s, cycle_id=subjects.running, stage="sample", outputs={"tasks": 7})
            assert page.evaluate("performance.getEntriesByType('navigation')[0].type") == "reload"
            assert page.text_content("#stages tr:has(a[href='#stage-sample']) .chip") == "succeeded"
            # typing in a form holds the reload back, and says so
            page.fill("#cancel-reason", "half-typed")
            with pg_db.session() as s:
                start_stage(s, cycle_id=subjects.running, stage="gather")
            page.locator("#live-note", has_text="changed since it was loaded").wait_for(timeout=10_000)
            assert page.input_value("#cancel-reason") == "half-typed"
        finally:
            browser.close()
    assert not csp_problems(messages), messages
