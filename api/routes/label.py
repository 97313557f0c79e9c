"""The comparison page, served by the API app at ``/label``: a rater judges one task at a time.

A labeler key (or one of a higher role) signs in at ``/label/login`` the way
the dashboard's keys do (``api.web.SignIn``: a server-side session, a CSRF
token in every form, the Origin check, a nonce CSP); the rater is the key's
name. The page shows one task the rater holds: its oldest live lease, else
one leased now (from the running cycle, else from the tasks of no cycle, with
the gold share of the QC policy in force). The prompt is shown as a dialogue,
one element per turn; responses A and B side by side; under them the
preference scale (``RATCHET_LABEL_SCALE``, by default seven points from "A
much better" to "B much better", each a choice and a strength), a comment
box, and "skip". Above the task: what the rater has answered (all time and
in the running cycle) and how many tasks that cycle has left open.

An answer is registered as the API registers one
(``store.feedback.create_feedback_batch``, source ``label-page``, under the
signed-in key), under an idempotency key made from the task, the rater and
the lease's start, so a form sent twice registers once. A skip releases the
lease (``store.tasks.release_lease``): the task goes to someone else. What
went wrong (a lease that ran out, a task closed meanwhile) is said on the
page, above the next task. With nothing to do, the page says so and looks
again every ``REFRESH_S`` seconds.

Every control is a real button in a form, so the page works with Tab and
Enter and without JavaScript; its one script (carrying the CSP nonce) adds
the shortcuts: keys 1..N pick a point of the scale and send it at once, ``s``
skips, ``c`` goes to the comment box and Escape leaves it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response

from api.deps import MAX_ID, Caller, get_qc_policy
from api.web import SignIn, from_this_site, page, read_form, redirect, same_token
from store.cycles import running_cycle_ids
from store.db import Database
from store.errors import Conflict, InvalidInput, NotFound, RaterExcluded
from store.feedback import IdempotentReplay, NewComparison, create_feedback_batch
from store.models import ComparisonTask
from store.settings import ScalePoint
from store.tasks import (
    Leased,
    Progress,
    lease_started_at,
    lease_tasks,
    live_leases,
    rater_progress,
    release_lease,
    renew_lease,
)

router = APIRouter(prefix="/label", include_in_schema=False)

COOKIE = "ratchet_label_session"
"""the session cookie: the session's id, never the key"""
CSRF_COOKIE = "ratchet_label_csrf"
"""the sign-in form's double-submit token"""
SOURCE = "label-page"
"""the source of the feedback batches the page registers"""
REFRESH_S = 10
"""how often the page with nothing to do looks again"""
MAX_COMMENT_CHARS = 4000
MAX_FORM_BYTES = 64 * 1024
"""the largest answer form read (a 4,000-character comment, percent-encoded, fits)"""

SIGN_IN = SignIn(
    path="/label", cookie=COOKIE, csrf_cookie=CSRF_COOKIE, role="labeler", title="the labeling page",
    key_hint="your labeler API key", key_command="ratchet keys create --role labeler --name NAME",
)


# --- what the page shows -----------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One turn of a prompt's dialogue."""

    speaker: str
    """Human or Assistant; Prompt for text outside the HH markers"""
    text: str


TURN_MARK = re.compile(r"(?:\A|\n\n)(Human|Assistant):[ \t]?")
"""where an HH-format turn begins: "\\n\\nHuman: " or "\\n\\nAssistant: " (or either at the very start)"""


def dialogue(prompt: str) -> list[Turn]:
    """A prompt's turns: HH-format text ("\\n\\nHuman: ...\\n\\nAssistant: ...") split at its markers,
    without the empty last turn the responses continue ("...\\n\\nAssistant:"); text before the first
    marker, or a prompt without markers, is a turn of its own ("Prompt")."""
    marks = list(TURN_MARK.finditer(prompt))
    if not marks:
        return [Turn("Prompt", prompt.strip("\n"))]
    turns = []
    head = prompt[: marks[0].start()].strip("\n")
    if head.strip():
        turns.append(Turn("Prompt", head))
    ends = [m.start() for m in marks[1:]] + [len(prompt)]
    for mark, end in zip(marks, ends):
        turns.append(Turn(mark.group(1), prompt[mark.end() : end].strip("\n")))
    if len(turns) > 1 and not turns[-1].text.strip():
        turns.pop()
    return turns


@dataclass(frozen=True)
class TaskView:
    """A held task as the page shows it."""

    id: int
    turns: list[Turn]
    response_a: str
    response_b: str
    leased_until: datetime

    @classmethod
    def of(cls, leased: Leased) -> TaskView:
        task = leased.task
        return cls(task.id, dialogue(task.prompt), task.response_a, task.response_b, leased.leased_until)


def next_task(database: Database, request: Request, caller: Caller) -> tuple[TaskView | None, Progress, str | None]:
    """The task to show the rater (its oldest live lease, else one leased now; None when there is none),
    its progress, and why no task could be leased when the store refused (else None)."""
    settings = request.app.state.settings
    problem = None
    with database.session() as session:
        held = live_leases(session, rater_id=caller.name, api_key_id=caller.id)
        if not held:
            policy = get_qc_policy(request, session)
            try:
                held = lease_tasks(
                    session, rater_id=caller.name, api_key_id=caller.id, limit=1,
                    lease=timedelta(seconds=settings.task_lease_s), cycle_ids=running_cycle_ids(session) or None,
                    gold_share=policy.gold_share, qc=policy,
                )
            except (Conflict, RaterExcluded) as exc:  # another key's rater, or one quality control leaves out
                problem = str(exc)
        task = TaskView.of(held[0]) if held else None
        return task, rater_progress(session, rater_id=caller.name), problem


# --- answering and skipping ----------------------------------------------------------------------


def answer_key(task_id: int, rater_id: str, leased_at: datetime) -> str:
    """The idempotency key of the page's answer to a task under one lease: a form sent twice registers once."""
    digest = hashlib.sha256(f"{task_id}\n{rater_id}\n{leased_at.isoformat()}".encode()).hexdigest()
    return f"{SOURCE}:{digest[:40]}"


def register_answer(database: Database, *, caller: Caller, task_id: int, point: ScalePoint, comment: str) -> bool:
    """Register the rater's answer to ``task_id`` as a one-comparison feedback batch; False when the same
    lease's answer was registered already (a replay). Raises the store's errors (lease problems: ``Conflict``)."""
    with database.session() as session:
        task = session.get(ComparisonTask, task_id)
        if task is None:
            raise NotFound(f"comparison task {task_id} does not exist")
        leased_at = lease_started_at(session, task_id=task_id, rater_id=caller.name)
        comparison = NewComparison(
            prompt=task.prompt, response_a=task.response_a, response_b=task.response_b, choice=point.choice,
            strength=point.strength, rater_id=caller.name, task_id=task.id,
            metadata={"comment": comment} if comment else None,
        )
        # Without a lease there is no key, and the store says why the answer cannot be taken.
        key = None if leased_at is None else answer_key(task_id, caller.name, leased_at)
        _, created = create_feedback_batch(session, source=SOURCE, comparisons=[comparison], idempotency_key=key,
                                           api_key_id=caller.id)
        return created


def renew_task(database: Database, *, caller: Caller, task_id: int, lease_s: int) -> datetime:
    with database.session() as session:
        row = renew_lease(session, task_id=task_id, rater_id=caller.name, api_key_id=caller.id,
                          lease=timedelta(seconds=lease_s))
        return row.leased_until


def skip_task(database: Database, *, caller: Caller, task_id: int) -> None:
    with database.session() as session:
        release_lease(session, task_id=task_id, rater_id=caller.name, api_key_id=caller.id)


def _problem_text(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, InvalidInput) and exc.errors:
        text += ": " + "; ".join(e["message"] for e in exc.errors[:3])
    return text


def _task_id(form: dict[str, str]) -> int | None:
    value = form.get("task_id", "")
    return int(value) if value.isdigit() and 1 <= int(value) <= MAX_ID else None


# --- routes ----------------------------------------------------------------------------------


async def _task_page(request: Request, caller: Caller, session_id: str | None, *, status: int = 200,
                     notice: str | None = None, error: str | None = None) -> HTMLResponse:
    """The page with the rater's next task (or none), ``notice`` and ``error`` above it."""
    task, progress, problem = await run_in_threadpool(next_task, request.app.state.database, request, caller)
    if problem is not None:
        error = f"{error} {problem}" if error else problem
        status = 409 if status == 200 else status
    scale = request.app.state.settings.label_scale
    return page("label.html", status, script=task is not None, task=task, progress=progress, scale=scale,
                caller=caller, csrf=SIGN_IN.form_csrf(session_id) if session_id else None, notice=notice,
                error=error, refresh_s=REFRESH_S, max_comment=MAX_COMMENT_CHARS,
                renew_s=max(request.app.state.settings.task_lease_s // 2, 1))


async def _signed_in(request: Request) -> tuple[Caller | None, str | None, Response | None]:
    """The caller and session id, or the answer that sends the browser to sign in (or refuses its key)."""
    caller, session_id = await SIGN_IN.caller(request)
    if caller is None:
        return None, None, redirect("/label/login")
    if (refused := SIGN_IN.refused(request, caller)) is not None:
        return None, None, refused
    return caller, session_id, None


TaskQuery = Annotated[int | None, Query(ge=1, le=MAX_ID)]


@router.get("", response_class=HTMLResponse)
async def label_page(request: Request, answered: TaskQuery = None, replayed: TaskQuery = None,
                     skipped: TaskQuery = None) -> Response:
    """The rater's next task; ``answered``, ``replayed`` and ``skipped`` name the task the last form was about."""
    caller, session_id, elsewhere = await _signed_in(request)
    if elsewhere is not None:
        return elsewhere
    notice = None
    if answered is not None:
        notice = f"Your answer to task {answered} is registered."
    elif replayed is not None:
        notice = f"Your answer to task {replayed} was registered already; the first one counts."
    elif skipped is not None:
        notice = f"Task {skipped} skipped; it goes to someone else."
    return await _task_page(request, caller, session_id, notice=notice)


async def _checked_form(request: Request) -> tuple[Caller | None, str | None, dict[str, str], Response | None]:
    """A POSTed form of a signed-in rater, with its Origin and CSRF token checked; else the answer to send."""
    if not from_this_site(request):
        return None, None, {}, SIGN_IN.cross_site(request)
    caller, session_id, elsewhere = await _signed_in(request)
    if elsewhere is not None:
        return None, None, {}, elsewhere
    if len(await request.body()) > MAX_FORM_BYTES:
        return None, None, {}, await _task_page(request, caller, session_id, status=413,
                                                error=f"Not registered: the form is over {MAX_FORM_BYTES} bytes.")
    form = await read_form(request, max_bytes=MAX_FORM_BYTES)
    if session_id is not None and not same_token(form.get("csrf", ""), SIGN_IN.form_csrf(session_id)):
        return None, None, {}, await _task_page(
            request, caller, session_id, status=403,
            error="Not registered: the form was out of date (its CSRF token is not this session's); try again.")
    return caller, session_id, form, None


@router.post("/answer", response_class=HTMLResponse)
async def answer(request: Request) -> Response:
    """Register the rater's pick on the scale (``point``, 1..N) for ``task_id``, with its ``comment``."""
    caller, session_id, form, refused = await _checked_form(request)
    if refused is not None:
        return refused
    scale = request.app.state.settings.label_scale
    task_id, point = _task_id(form), form.get("point", "")
    comment = form.get("comment", "").replace("\r\n", "\n")
    problem = None
    if task_id is None:
        problem = "the form names no task"
    elif not (point.isdigit() and 1 <= int(point) <= len(scale)):
        problem = f"pick a point of the scale, 1 to {len(scale)}"
    elif len(comment) > MAX_COMMENT_CHARS:
        problem = f"the comment has {len(comment)} characters; at most {MAX_COMMENT_CHARS} are kept"
    elif "\x00" in comment:
        problem = "the comment contains a NUL character"
    if problem is not None:
        return await _task_page(request, caller, session_id, status=422, error=f"Not registered: {problem}.")
    try:
        created = await run_in_threadpool(partial(register_answer, request.app.state.database, caller=caller,
                                                  task_id=task_id, point=scale[int(point) - 1], comment=comment))
    except IdempotentReplay:  # the same form, sent twice at once: the other one registered it
        created = False
    except (Conflict, NotFound, InvalidInput) as exc:
        status = {Conflict: 409, NotFound: 404, InvalidInput: 422}[type(exc)]
        return await _task_page(request, caller, session_id, status=status,
                                error=f"Task {task_id} was not registered: {_problem_text(exc)}")
    return redirect(f"/label?{'answered' if created else 'replayed'}={task_id}")


@router.post("/skip", response_class=HTMLResponse)
async def skip(request: Request) -> Response:
    """Release the rater's lease on ``task_id``: it goes to someone else and is not shown to this rater again."""
    caller, session_id, form, refused = await _checked_form(request)
    if refused is not None:
        return refused
    task_id = _task_id(form)
    if task_id is None:
        return await _task_page(request, caller, session_id, status=422, error="Not skipped: the form names no task.")
    try:
        await run_in_threadpool(partial(skip_task, request.app.state.database, caller=caller, task_id=task_id))
    except (Conflict, NotFound) as exc:
        status = 409 if isinstance(exc, Conflict) else 404
        return await _task_page(request, caller, session_id, status=status,
                                error=f"Task {task_id} was not skipped: {exc}")
    return redirect(f"/label?skipped={task_id}")


@router.post("/renew")
async def renew(request: Request) -> Response:
    """Hold ``task_id`` another lease from now (the page calls it while it is open): JSON with the new end,
    or the error's status with its reason."""
    caller, session_id, form, refused = await _checked_form(request)
    if refused is not None:
        return JSONResponse({"detail": "not renewed: sign in again"}, status_code=refused.status_code)
    task_id = _task_id(form)
    if task_id is None:
        return JSONResponse({"detail": "the form names no task"}, status_code=422)
    try:
        until = await run_in_threadpool(partial(renew_task, request.app.state.database, caller=caller, task_id=task_id,
                                                lease_s=request.app.state.settings.task_lease_s))
    except (Conflict, NotFound) as exc:
        return JSONResponse({"detail": str(exc)}, status_code=409 if isinstance(exc, Conflict) else 404)
    return JSONResponse({"task_id": task_id, "leased_until": until.isoformat(), "shown": until.strftime("%H:%M UTC")})


SIGN_IN.add_routes(router)
