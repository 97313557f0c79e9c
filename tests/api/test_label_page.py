"""The comparison page ``/label`` on the real app and PostgreSQL: sign-in, one task at a time, answers and skips.

The browser test at the end runs the app under uvicorn and drives Debian's
chromium with Playwright, from the keyboard only; off CI it is skipped,
saying why, where either is missing (in CI that fails).
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import select, update

from api.app import create_app
from api.routes.label import COOKIE, CSRF_COOKIE, SOURCE, Turn, dialogue
from store.cycles import open_cycle
from store.models import ApiKey, Comparison, ComparisonTask, FeedbackBatch, TaskLease, utcnow
from store.settings import Settings
from store.tasks import create_tasks, lease_tasks
from tests.api.test_dashboard import form_csrf, token_of
from tests.api.test_dashboard_session import CHROMIUM, LiveApp, cookie_flags, csp_problems
from tests.conftest import IN_CI

DIALOGUE = "\n\nHuman: My tea is too bitter.\n\nAssistant: How long do you steep it?\n\nHuman: Ten minutes.\n\nAssistant:"


def open_tasks(db, n: int, *, cycle_id: int | None = None, start: int = 0) -> list[int]:
    """``n`` open tasks (no cycle unless given, so they can be leased), their ids in lease order."""
    with db.session() as s:
        rows = create_tasks(s, cycle_id=cycle_id, tasks=[
            {"prompt": DIALOGUE.replace("Ten", f"{10 + i}"), "response_a": f"Steep it for three minutes ({i}).",
             "response_b": f"Add sugar ({i})."}
            for i in range(start, start + n)
        ])
        return [r.id for r in rows]


def label_sign_in(client: TestClient, headers: dict, **post_headers):
    """Sign in at /label as a browser does: the form, then its POST (the answer, not followed)."""
    form = client.get("/label/login")
    return client.post("/label/login", data={"token": token_of(headers), "csrf": form_csrf(form.text)},
                       headers=post_headers, follow_redirects=False)


def shown_task(html: str) -> int | None:
    """The id of the task a page shows (its answer form's), or None."""
    found = re.search(r'<form id="answer".*?name="task_id" value="(\d+)"', html, re.S)
    return int(found.group(1)) if found else None


def answer(client: TestClient, page_html: str, point: int, comment: str = "", **headers):
    """Send the answer form of ``page_html`` with scale point ``point`` (1-based)."""
    return client.post("/label/answer", data={"csrf": form_csrf(page_html), "task_id": shown_task(page_html),
                                              "point": point, "comment": comment},
                       headers=headers, follow_redirects=False)


def key_id(db, name: str) -> int:
    with db.session() as s:
        return s.scalar(select(ApiKey.id).where(ApiKey.name == name))


def comparisons(db) -> list[Comparison]:
    with db.session() as s:
        return list(s.scalars(select(Comparison).order_by(Comparison.id)))


def lease_of(db, task_id: int, rater: str = "labeler") -> TaskLease | None:
    with db.session() as s:
        return s.scalar(select(TaskLease).where(TaskLease.task_id == task_id, TaskLease.rater_id == rater))


def task_row(db, task_id: int) -> ComparisonTask:
    with db.session() as s:
        return s.get(ComparisonTask, task_id)


# --- the prompt as a dialogue --------------------------------------------------------------------


def test_a_prompt_is_split_into_its_turns():
    assert dialogue(DIALOGUE) == [Turn("Human", "My tea is too bitter."), Turn("Assistant", "How long do you steep it?"),
                                  Turn("Human", "Ten minutes.")]
    assert dialogue("Human: hi\n\nAssistant: hello\nthere\n\nAssistant:") == [
        Turn("Human", "hi"), Turn("Assistant", "hello\nthere")]
    assert dialogue("Summarise this:\nHuman: is not a marker here") == [
        Turn("Prompt", "Summarise this:\nHuman: is not a marker here")]
    assert dialogue("Context first.\n\nHuman: then a question") == [
        Turn("Prompt", "Context first."), Turn("Human", "then a question")]


# --- sign-in ---------------------------------------------------------------------------------------


def test_the_page_sends_a_browser_without_a_session_to_sign_in(client):
    answer_ = client.get("/label", follow_redirects=False)
    assert answer_.status_code == 303 and answer_.headers["location"] == "/label/login"
    form = client.get("/label/login")
    assert form.status_code == 200 and 'name="token"' in form.text and 'action="/label/login"' in form.text


def test_sign_in_needs_a_known_key(client, keys):
    unknown = label_sign_in(client, {"Authorization": "Bearer nope"})
    assert unknown.status_code == 401 and "unknown or revoked API key" in unknown.text
    assert label_sign_in(client, keys.revoked).status_code == 401
    assert COOKIE not in client.cookies
    assert client.get("/label", follow_redirects=False).status_code == 303


def test_a_labeler_key_signs_in_with_a_strict_session_cookie(client, keys, pg_db):
    open_tasks(pg_db, 1)
    ok = label_sign_in(client, keys.labeler)
    assert ok.status_code == 303 and ok.headers["location"] == "/label"
    flags = cookie_flags(ok, COOKIE)
    assert "httponly" in flags and "samesite=strict" in flags and "path=/label" in flags
    assert token_of(keys.labeler) not in ok.headers["set-cookie"]
    page = client.get("/label")
    assert page.status_code == 200 and "labeling as <b>labeler</b>" in page.text
    assert shown_task(page.text) is not None
    # signed in here is not signed in at the dashboard (another cookie, on another path)
    assert client.get("/dashboard", follow_redirects=False).status_code == 303

    out = client.post("/label/logout", data={"csrf": form_csrf(page.text)}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/label/login"
    assert client.get("/label", follow_redirects=False).status_code == 303


def test_sign_in_without_the_forms_csrf_token_is_refused(client, keys):
    client.get("/label/login")  # sets the form's CSRF cookie
    for form in ({"token": token_of(keys.labeler)}, {"token": token_of(keys.labeler), "csrf": "forged"}):
        refused = client.post("/label/login", data=form, follow_redirects=False)
        assert refused.status_code == 403 and "reload the page" in refused.text
    assert COOKIE not in client.cookies and CSRF_COOKIE in client.cookies


def test_an_answer_without_the_sessions_csrf_token_is_refused_and_registers_nothing(client, keys, pg_db):
    (task_id,) = open_tasks(pg_db, 1)
    label_sign_in(client, keys.labeler)
    page = client.get("/label")
    for csrf in (None, "forged", form_csrf(page.text) + "x"):
        data = {"task_id": task_id, "point": 2, **({} if csrf is None else {"csrf": csrf})}
        refused = client.post("/label/answer", data=data, follow_redirects=False)
        assert refused.status_code == 403 and "CSRF" in refused.text
        assert shown_task(refused.text) == task_id  # the same task, still held
    skipped = client.post("/label/skip", data={"task_id": task_id}, follow_redirects=False)
    assert skipped.status_code == 403
    assert comparisons(pg_db) == []
    lease = lease_of(pg_db, task_id)
    assert lease.answered_at is None and lease.released_at is None


def test_a_form_from_another_site_is_refused(client, keys, pg_db):
    open_tasks(pg_db, 1)
    label_sign_in(client, keys.labeler)
    page = client.get("/label")
    cross = answer(client, page.text, 2, Origin="https://evil.example")
    assert cross.status_code == 403 and "another site" in cross.text
    assert comparisons(pg_db) == []


# --- the page ----------------------------------------------------------------------------------------


def test_the_page_shows_the_turns_apart_and_both_responses(client, keys, pg_db):
    (task_id,) = open_tasks(pg_db, 1)
    label_sign_in(client, keys.labeler)
    page = client.get("/label")
    assert shown_task(page.text) == task_id
    turns = re.findall(r'<li class="turn (\w+)"><span class="speaker">(\w+)</span><div class="text">([^<]*)</div>',
                       page.text)
    assert turns == [("human", "Human", "My tea is too bitter."), ("assistant", "Assistant", "How long do you steep it?"),
                     ("human", "Human", "10 minutes.")]
    assert 'id="response-a"' in page.text and "Steep it for three minutes (0)." in page.text
    assert 'id="response-b"' in page.text and "Add sugar (0)." in page.text
    buttons = r'<button type="submit" name="point" value="(\d)" data-key="\d" class="side-(\w+)"><kbd>\d</kbd> ([^<]+)</button>'
    labels = re.findall(buttons, page.text)
    assert labels == [("1", "a", "A much better"), ("2", "a", "A better"), ("3", "a", "A slightly better"),
                      ("4", "tie", "About the same"), ("5", "b", "B slightly better"), ("6", "b", "B better"),
                      ("7", "b", "B much better")]
    assert 'id="keys"' in page.text and "<kbd>s</kbd> skip" in page.text
    # the page's one script and style sheet carry the answer's nonce; the CSP admits only those
    csp = page.headers["content-security-policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", csp).group(1)
    assert f"style-src 'nonce-{nonce}'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    scripts = re.findall(r"<script\b[^>]*>", page.text)
    assert scripts == [f'<script nonce="{nonce}">']
    assert " style=" not in page.text and page.headers["cache-control"] == "no-store"


def test_the_page_shows_the_task_the_rater_already_holds(client, keys, pg_db):
    first, _ = open_tasks(pg_db, 2)
    label_sign_in(client, keys.labeler)
    assert shown_task(client.get("/label").text) == first
    assert shown_task(client.get("/label").text) == first  # a reload shows the same task, leasing nothing more
    with pg_db.session() as s:
        assert s.query(TaskLease).count() == 1


def test_an_answer_is_stored_with_its_strength_and_comment_and_registers_once(client, keys, pg_db):
    first, second = open_tasks(pg_db, 2)
    label_sign_in(client, keys.labeler)
    page = client.get("/label")
    sent = answer(client, page.text, 2, comment="  clearer, and it answers the question  ")
    assert sent.status_code == 303 and sent.headers["location"] == f"/label?answered={first}"
    again = answer(client, page.text, 6)  # the same form sent a second time (another point, even)
    assert again.status_code == 303 and again.headers["location"] == f"/label?replayed={first}"

    (stored,) = comparisons(pg_db)
    task = task_row(pg_db, first)
    assert (stored.choice, stored.strength, stored.task_id, stored.rater_id) == ("a", 2.0, first, "labeler")
    assert stored.meta == {"comment": "clearer, and it answers the question"}
    assert (stored.prompt, stored.response_a, stored.response_b) == (task.prompt, task.response_a, task.response_b)
    with pg_db.session() as s:
        (batch,) = s.scalars(select(FeedbackBatch)).all()
        assert batch.source == SOURCE and batch.api_key_id == key_id(pg_db, "labeler") and batch.comparison_count == 1
    assert task.status == "done" and task.answers == 1 and lease_of(pg_db, first).answered_at is not None

    following = client.get(sent.headers["location"])
    assert f"Your answer to task {first} is registered." in following.text
    assert shown_task(following.text) == second
    assert "You have answered <b>1</b> task," not in following.text  # no cycle runs
    assert "You have answered <b>1</b> task." in following.text and "<b>1</b> task is open outside any cycle" in following.text
    replayed = client.get(again.headers["location"])
    assert "registered already; the first one counts" in replayed.text


def test_a_tie_is_stored_with_strength_zero_and_no_comment(client, keys, pg_db):
    (task_id,) = open_tasks(pg_db, 1)
    label_sign_in(client, keys.labeler)
    page = client.get("/label")
    assert answer(client, page.text, 4).status_code == 303
    (stored,) = comparisons(pg_db)
    assert (stored.choice, stored.strength, stored.meta, stored.task_id) == ("tie", 0.0, None, task_id)


def test_skip_releases_the_lease_and_the_task_is_not_shown_again(client, keys, pg_db):
    first, second = open_tasks(pg_db, 2)
    label_sign_in(client, keys.labeler)
    page = client.get("/label")
    skipped = client.post("/label/skip", data={"csrf": form_csrf(page.text), "task_id": first}, follow_redirects=False)
    assert skipped.status_code == 303 and skipped.headers["location"] == f"/label?skipped={first}"
    lease = lease_of(pg_db, first)
    assert lease.released_at is not None and lease.answered_at is None
    task = task_row(pg_db, first)
    assert task.status == "open" and task.answers == 0
    following = client.get(skipped.headers["location"])
    assert f"Task {first} skipped" in following.text and shown_task(following.text) == second
    assert comparisons(pg_db) == []
    # skipping it again (a stale form): said on the page, not a 500
    stale = client.post("/label/skip", data={"csrf": form_csrf(page.text), "task_id": first}, follow_redirects=False)
    assert stale.status_code == 409 and f"released comparison task {first}" in stale.text
    assert shown_task(stale.text) == second


def test_the_page_renews_the_lease_it_shows(client, keys, pg_db):
    (task_id,) = open_tasks(pg_db, 1)
    label_sign_in(client, keys.labeler)
    page = client.get("/label")
    assert "connect-src 'self'" in page.headers["content-security-policy"]  # the page's script may call back
    before = lease_of(pg_db, task_id).leased_until
    renewed = client.post("/label/renew", data={"csrf": form_csrf(page.text), "task_id": task_id})
    assert renewed.status_code == 200 and renewed.json()["task_id"] == task_id
    after = lease_of(pg_db, task_id).leased_until
    assert after > before and renewed.json()["leased_until"] == after.isoformat()
    refused = client.post("/label/renew", data={"csrf": "forged", "task_id": task_id})
    assert refused.status_code == 403 and lease_of(pg_db, task_id).leased_until == after
    client.post("/label/skip", data={"csrf": form_csrf(page.text), "task_id": task_id})
    gone = client.post("/label/renew", data={"csrf": form_csrf(page.text), "task_id": task_id})
    assert gone.status_code == 409 and f"released comparison task {task_id}" in gone.json()["detail"]


def test_an_answer_after_the_lease_ran_out_is_a_message_then_the_next_task(client, keys, pg_db):
    (task_id,) = open_tasks(pg_db, 1)
    label_sign_in(client, keys.labeler)
    page = client.get("/label")
    with pg_db.session() as s:
        s.execute(update(TaskLease).values(leased_until=utcnow() - timedelta(seconds=1)))
    late = answer(client, page.text, 2)
    assert late.status_code == 409 and "was not registered" in late.text and "ran out" in late.text
    assert shown_task(late.text) == task_id  # its place was free again, and the rater took it anew
    assert comparisons(pg_db) == []
    # answering the new lease works (it is a new lease: a new idempotency key)
    assert answer(client, late.text, 6).headers["location"] == f"/label?answered={task_id}"
    (stored,) = comparisons(pg_db)
    assert (stored.choice, stored.strength) == ("b", 2.0)


def test_a_closed_task_and_a_bad_form_are_messages_not_500s(client, keys, pg_db):
    (task_id,) = open_tasks(pg_db, 1)
    label_sign_in(client, keys.labeler)
    page = client.get("/label")
    csrf = form_csrf(page.text)
    for data, status, says in (
        ({"task_id": task_id, "point": 8}, 422, "pick a point of the scale, 1 to 7"),
        ({"task_id": task_id, "point": "x"}, 422, "pick a point of the scale"),
        ({"point": 2}, 422, "the form names no task"),
        ({"task_id": task_id, "point": 2, "comment": "x" * 4001}, 422, "at most 4000"),
        ({"task_id": 999999, "point": 2}, 404, "comparison task 999999 does not exist"),
    ):
        bad = client.post("/label/answer", data={"csrf": csrf, **data}, follow_redirects=False)
        assert bad.status_code == status and says in bad.text, (data, bad.text)
    with pg_db.session() as s:
        s.execute(update(ComparisonTask).values(status="closed"))
    closed = answer(client, page.text, 2)
    assert closed.status_code == 409 and f"comparison task {task_id} is closed" in closed.text
    assert "No tasks right now" in closed.text
    assert comparisons(pg_db) == []


def test_with_nothing_to_do_the_page_says_so_and_reloads_itself(client, keys):
    label_sign_in(client, keys.labeler)
    page = client.get("/label")
    assert page.status_code == 200 and "No tasks right now" in page.text
    assert '<meta http-equiv="refresh" content="10; url=/label">' in page.text
    assert "<script" not in page.text and shown_task(page.text) is None


def test_a_rater_who_takes_tasks_under_another_key_is_told_so(client, keys, pg_db):
    open_tasks(pg_db, 2)
    with pg_db.session() as s:  # a labeling tool took a task as rater "labeler" with the operator's key
        lease_tasks(s, rater_id="labeler", api_key_id=key_id(pg_db, "operator"), limit=1, lease=timedelta(minutes=5))
    label_sign_in(client, keys.labeler)
    page = client.get("/label")
    assert page.status_code == 409 and "takes its tasks under another API key" in page.text
    assert shown_task(page.text) is None


def test_the_progress_counts_the_running_cycle(client, keys, pg_db):
    open_tasks(pg_db, 1)  # of no cycle: not handed out while a cycle runs
    with pg_db.session() as s:
        cycle, _ = open_cycle(s, week="2026-W10")
        cycle_id = cycle.id
    first, _, _ = open_tasks(pg_db, 3, cycle_id=cycle_id, start=10)
    label_sign_in(client, keys.labeler)
    page = client.get("/label")
    assert shown_task(page.text) == first
    assert "<b>3</b> tasks are left open in this cycle" in page.text
    following = client.get(answer(client, page.text, 7).headers["location"])
    assert re.search(r"You have answered <b>1</b> task,\s+<b>1</b> of them in the running cycle \(2026-W10\)\.",
                     following.text)
    assert "<b>2</b> tasks are left open in this cycle" in following.text


def test_the_scale_comes_from_the_setting(pg_db, artifacts, keys, tmp_path):
    scale = [{"label": "Left", "choice": "a", "strength": 1}, {"label": "Same", "choice": "tie", "strength": 0},
             {"label": "Right", "choice": "b", "strength": 1.5}]
    app = create_app(Settings(home=tmp_path, label_scale=scale), database=pg_db, artifacts=artifacts)
    open_tasks(pg_db, 1)
    with TestClient(app) as c:
        label_sign_in(c, keys.labeler)
        page = c.get("/label")
        assert re.findall(r'data-key="(\d)" class="side-\w+"><kbd>\d</kbd> (\w+)', page.text) == [
            ("1", "Left"), ("2", "Same"), ("3", "Right")]
        assert answer(c, page.text, 3).status_code == 303
        assert answer(c, page.text, 4).status_code == 422  # no fourth point
        replay = answer(c, page.text, 1)  # the same form again, another point: the first answer counts
        assert replay.headers["location"] == f"/label?replayed={shown_task(page.text)}"
    (stored,) = comparisons(pg_db)
    assert (stored.choice, stored.strength) == ("b", 1.5)


@pytest.mark.parametrize(("scale", "says"), [
    ([{"label": "A", "choice": "a", "strength": 1}], "needs 2 to 9"),
    ([{"label": str(i), "choice": "a", "strength": i + 1} for i in range(10)], "has 10 points"),
    ([{"label": "A", "choice": "a", "strength": 1}, {"label": "=", "choice": "tie", "strength": 1}], "its strength must be 0"),
    ([{"label": "A", "choice": "a", "strength": 0}, {"label": "B", "choice": "b", "strength": 1}], "must be above 0"),
    ([{"label": "A", "choice": "a", "strength": 11}, {"label": "B", "choice": "b", "strength": 1}], "over the most"),
    ([{"label": "A", "choice": "x", "strength": 1}, {"label": "B", "choice": "b", "strength": 1}], "choice"),
    ([{"label": "A", "choice": "a", "strength": 1}, {"label": "A again", "choice": "a", "strength": 1}], "repeats"),
], ids=["one-point", "ten-points", "tie-with-strength", "a-with-zero", "too-strong", "unknown-choice", "repeated"])
def test_a_bad_label_scale_is_refused_naming_the_point(scale, says):
    with pytest.raises(ValidationError, match=says):
        Settings(label_scale=scale)


def test_the_label_scale_is_read_from_its_environment_variable(monkeypatch):
    monkeypatch.setenv("RATCHET_LABEL_SCALE", '[{"label": "A", "choice": "a", "strength": 2},'
                                              ' {"label": "B", "choice": "b", "strength": 2}]')
    assert [(p.label, p.choice, p.strength) for p in Settings().label_scale] == [("A", "a", 2.0), ("B", "b", 2.0)]
    monkeypatch.delenv("RATCHET_LABEL_SCALE")
    assert len(Settings().label_scale) == 7


# --- a real browser, the keyboard only ------------------------------------------------------------


def test_a_rater_labels_from_the_keyboard_in_chromium(pg_db, artifacts, keys, tmp_path):
    # .ci/run installs both; in CI a missing browser is a failure, never a skip
    missing = pytest.fail if IN_CI else pytest.skip
    try:
        from playwright import sync_api
    except ImportError:
        missing("Playwright for Python is not installed (the [dev] extra has it)")
    if not Path(CHROMIUM).exists():
        missing(f"no browser at {CHROMIUM} (Debian's chromium package)")
    ids = open_tasks(pg_db, 5)
    with pg_db.session() as s:  # a long unbroken word must wrap, not widen the page
        s.get(ComparisonTask, ids[0]).response_b = "See https://example.com/" + "a-very-long-path/" * 12 + " for more."
    app = create_app(Settings(home=tmp_path), database=pg_db, artifacts=artifacts)
    messages: list[str] = []
    wide, narrow = tmp_path / "label-1280.png", tmp_path / "label-400.png"
    with LiveApp(app) as live, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: messages.append(f"console {m.type}: {m.text}"))
            page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
            page.goto(f"{live.base}/label")
            assert page.url == f"{live.base}/label/login"
            # the key field has the focus (autofocus); on a loaded machine it may take a moment to get it
            page.wait_for_function("document.activeElement && document.activeElement.name === 'token'")
            page.keyboard.type(token_of(keys.labeler))
            with page.expect_navigation():
                page.keyboard.press("Enter")
            assert page.url == f"{live.base}/label"

            assert page.locator("ol.dialogue li.turn").count() == 3
            page.screenshot(path=wide, full_page=True)
            page.set_viewport_size({"width": 400, "height": 900})
            assert page.evaluate("document.body.scrollWidth") <= 400
            columns = page.eval_on_selector(".responses", "e => getComputedStyle(e).gridTemplateColumns.split(' ').length")
            assert columns == 1
            page.screenshot(path=narrow, full_page=True)
            page.set_viewport_size({"width": 1280, "height": 900})
            assert page.eval_on_selector(".responses", "e => getComputedStyle(e).gridTemplateColumns.split(' ').length") == 2

            # the page's own script renews its lease (the same request, sent now instead of in lease_s / 2)
            status = page.evaluate("""() => fetch('/label/renew', {method: 'POST', credentials: 'same-origin',
                body: new URLSearchParams(new FormData(document.getElementById('skip')))}).then(r => r.status)""")
            assert status == 200

            answered = []
            for key, comment in (("2", "kinder and to the point"), ("4", ""), ("6", "")):
                task_id = int(page.get_attribute('#answer input[name="task_id"]', "value"))
                if comment:
                    page.keyboard.press("c")
                    assert page.evaluate("document.activeElement.id") == "comment"
                    page.keyboard.type(comment + " 12")  # digits typed in the box are text, not picks
                    page.keyboard.press("Escape")
                    assert page.evaluate("document.activeElement.id") != "comment"
                with page.expect_navigation():
                    page.keyboard.press(key)
                assert page.url == f"{live.base}/label?answered={task_id}", page.url
                answered.append(task_id)
            skipped = int(page.get_attribute('#answer input[name="task_id"]', "value"))
            with page.expect_navigation():
                page.keyboard.press("s")
            assert page.url == f"{live.base}/label?skipped={skipped}"
            assert int(page.get_attribute('#answer input[name="task_id"]', "value")) not in (*answered, skipped)
            assert "You have answered <b>3</b> tasks" in page.content()
            assert page.evaluate("document.cookie") == ""  # the session cookie is HttpOnly
        finally:
            browser.close()
    assert not csp_problems(messages), messages
    for shot in (wide, narrow):
        assert shot.exists() and shot.stat().st_size > 0
        print(f"screenshot: {shot}")

    stored = comparisons(pg_db)
    assert [(c.task_id, c.choice, c.strength) for c in stored] == [
        (answered[0], "a", 2.0), (answered[1], "tie", 0.0), (answered[2], "b", 2.0)]
    assert all(c.rater_id == "labeler" for c in stored)
    assert stored[0].meta == {"comment": "kinder and to the point 12"} and stored[1].meta is None
    assert answered == ids[:3] and skipped == ids[3]
    lease = lease_of(pg_db, skipped)
    assert lease.released_at is not None and lease.answered_at is None
    task = task_row(pg_db, skipped)
    assert task.status == "open" and task.answers == 0
