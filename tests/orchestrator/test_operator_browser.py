"""An operator on call, in headless Chromium, against the real app and flows (fake worker steps, PostgreSQL, the
session's Prefect harness): a cycle failed in improve; from the dashboard's table they open its page, re-run it
with a corrected setting, confirm, and watch the page refresh itself until the cycle succeeded; then they roll
the deployment back and see the history change. A labeler's key gets no action, and a forged form is refused."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from api.app import create_app
from orchestrator.flow import use_env, weekly_cycle
from orchestrator.launcher import ThreadLauncher
from store.keys import create_api_key
from store.models import Cycle, Deployment, OperatorAction
from store.settings import Settings
from tests.api.test_dashboard_browser import playwright_or_skip, sign_in_page
from tests.api.test_dashboard_session import CHROMIUM, LiveApp, csp_problems
from tests.orchestrator.fakes import StoreLabeler

WEEK = "2026-W21"


def test_an_operator_reruns_a_failed_cycle_to_success_and_rolls_it_back(prefect_api, fake_env, pg_db, artifacts,
                                                                        tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    sync_api = playwright_or_skip()
    fake_env.runner_for(fake_env.defaults).fail = {"ppo": 2}
    with use_env(fake_env), StoreLabeler(pg_db):
        with pytest.raises(Exception, match="injected failure of ppo"):
            weekly_cycle(week=WEEK)
    with pg_db.session() as s:
        cycle_id = s.scalar(select(Cycle.id).where(Cycle.week == WEEK))
        operator = create_api_key(s, name="on-call", role="operator")[1]
        labeler = create_api_key(s, name="lab", role="labeler")[1]

    def flow(**kw):  # the launcher's thread runs the flow against the session's Prefect server
        with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
            return weekly_cycle(**kw)

    launcher = ThreadLauncher(pg_db, fake_env.defaults, run=flow)
    app = create_app(Settings(home=tmp_path, dashboard_live_s=0.3), database=pg_db, artifacts=artifacts,
                     cycle_launcher=launcher)
    messages: list[str] = []
    with use_env(fake_env), StoreLabeler(pg_db), LiveApp(app) as live, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = sign_in_page(browser, live.base, operator, messages)
            with page.expect_navigation():
                page.click(f"a[href='/dashboard/cycles/{cycle_id}']")
            assert page.text_content("#cycle h2 .chip") == "failed"
            page.fill("#rerun-params", '{"ppo": {"config": {"learning_rate": 3e-6}}}')
            page.fill("#rerun-reason", "learning rate too high")
            with page.expect_navigation():
                page.click("#rerun-form button[type=submit]")
            assert "ppo.config.learning_rate" in page.text_content("#confirm")  # the plan, before it is recorded
            with page.expect_navigation():
                page.click("#confirm-button")
            assert "attempt 2" in page.text_content("#done")
            # the page refreshes itself while the re-run runs, until it succeeded
            page.locator("#cycle h2 .chip", has_text="succeeded").wait_for(timeout=60_000)
            assert page.locator("#cancel-form").count() == 0 and page.locator("#rerun-form").count() == 0

            page.goto(f"{live.base}/dashboard/deployments?target=default")
            history = page.locator("#history tbody tr").count()
            page.fill("#rollback-form input[name=reason]", "the new policy is worse on support tickets")
            with page.expect_navigation():
                page.click("#rollback-form button[type=submit]")
            with page.expect_navigation():
                page.click("#confirm-button")
            assert page.locator("#history tbody tr").count() == history + 1
            assert "rollback" in page.text_content("#history tbody tr:first-child")

            # a forged form (no CSRF token), from this very site: refused, nothing done
            forged = page.request.post(f"{live.base}/dashboard/deployments/rollback",
                                       form={"name": "default", "confirm": "yes"}, headers={"Origin": live.base})
            assert forged.status == 403 and "CSRF" in forged.text()

            # a labeler's key: no page, no action
            lab = sign_in_page(browser, live.base, labeler, messages)
            assert "needs an operator key" in lab.text_content("body")
            assert lab.locator("form[action*='/cancel'], form[action*='/rerun'], #rollback-form").count() == 0
            refused = lab.request.post(f"{live.base}/dashboard/cycles/{cycle_id}/cancel", form={"confirm": "yes"},
                                       headers={"Origin": live.base, "Authorization": f"Bearer {labeler}"})
            assert refused.status == 403 and "needs an operator key" in refused.text()
        finally:
            browser.close()
    for thread in launcher.threads.values():
        thread.join(timeout=30)
    assert not csp_problems(messages), messages
    with pg_db.session() as s:
        assert s.get(Cycle, cycle_id).status == "succeeded"
        assert s.scalar(select(func.count()).select_from(Deployment).where(Deployment.action == "rollback")) == 1
        actions = s.scalars(select(OperatorAction.action).order_by(OperatorAction.id)).all()
        assert actions == ["rerun", "rollback"]
