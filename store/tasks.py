"""Comparison tasks: pairs of responses handed out to raters under leases.

A task is leased only while its cycle runs (or when it belongs to no
cycle): the open tasks of a cycle that finished are closed, and those of a
failed cycle wait, unleased, until a re-run resumes it. Eval tasks (the human
A/B evaluation of a candidate) are handed out before training tasks, since
a cycle waiting on its gate waits on them.

The lease rules (``TaskLease`` rows, one per task and rater):

* a task is held by at most ``answers_needed - answers`` raters at once (one,
  unless it is an overlap task), each under a lease that runs out;
* only the rater holding a live lease, under the API key that leased it, may
  answer the task (``store.answers``); each rater answers a task once;
* a lease can be renewed (while live) and released (a skip): a released or
  answered task is not handed to that rater again; an expired lease frees its
  place for anyone, the same rater included;
* a share of the tasks a rater is handed (``gold_share``) are gold tasks:
  a registered comparison with a known answer, shown once to that rater, in
  a random A/B order, looking like any other task (``store.raters``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, exists, func, or_, select, update
from sqlalchemy.orm import Session

from store.errors import Conflict, NotFound, RaterExcluded
from store.models import Comparison, ComparisonTask, Cycle, GoldComparison, TaskLease, utcnow
from store.raters import QCPolicy, excluded_raters

SERVED_KINDS = ("eval", "train")
"""task kinds any rater may be handed from the pool (gold tasks are made per rater)"""

LEASE_ROUNDS = 8
"""how many times a lease looks again for tasks lost to raters leasing at the same moment"""


def create_tasks(
    session: Session,
    *,
    tasks: Sequence[dict[str, Any]],
    cycle_id: int | None = None,
    samples_dataset_id: int | None = None,
    kind: str = "train",
) -> list[ComparisonTask]:
    """Open comparison tasks; each dict has prompt, response_a, response_b (and optionally prompt_id,
    metadata, answers_needed (an overlap task: more than 1), and for eval tasks candidate_side).

    A chat prompt's task carries the prompt's message list as ``metadata.messages`` (its ``prompt`` is
    their HH-RLHF text): snapshots and conversational exports of its answers read them there."""
    rows = [
        ComparisonTask(
            cycle_id=cycle_id,
            samples_dataset_id=samples_dataset_id,
            prompt_id=t.get("prompt_id"),
            prompt=t["prompt"],
            response_a=t["response_a"],
            response_b=t["response_b"],
            meta=t.get("metadata") or {},
            kind=kind,
            candidate_side=t.get("candidate_side"),
            answers_needed=int(t.get("answers_needed", 1)),
        )
        for t in tasks
    ]
    session.add_all(rows)
    session.flush()
    return rows


def chat_task_metadata(session: Session, *, batch_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """task id -> metadata, for the tasks answered in these batches whose metadata carries their prompt's
    messages (a chat prompt's task: ``orchestrator.stages`` puts them there)."""
    answered = select(Comparison.task_id).where(Comparison.batch_id.in_(list(batch_ids)), Comparison.task_id.is_not(None))
    rows = session.execute(select(ComparisonTask.id, ComparisonTask.meta).where(ComparisonTask.id.in_(answered)))
    return {task_id: meta for task_id, meta in rows if isinstance(meta, dict) and "messages" in meta}


def _live(now: datetime):
    """The SQL condition of a live lease: neither answered nor released, and not run out."""
    return and_(TaskLease.answered_at.is_(None), TaskLease.released_at.is_(None), TaskLease.leased_until > now)


@dataclass(frozen=True)
class Leased:
    """A task as handed to a rater, with the end of the rater's lease."""

    task: ComparisonTask
    leased_until: datetime


def check_rater_key(session: Session, *, rater_id: str, api_key_id: int | None) -> None:
    """Raise ``Conflict`` when ``rater_id`` has held leases under another API key: a rater's answers
    come through one key (its labeling tool), so no other key can answer in its name."""
    other = session.scalar(
        select(TaskLease.id)
        .where(TaskLease.rater_id == rater_id, TaskLease.api_key_id.is_distinct_from(api_key_id))
        .limit(1)
    )
    if other is not None:
        raise Conflict(f"rater {rater_id!r} takes its tasks under another API key; use that key, or another rater_id")


def lease_tasks(
    session: Session,
    *,
    rater_id: str,
    limit: int,
    lease: timedelta,
    cycle_id: int | None = None,
    api_key_id: int | None = None,
    gold_share: float = 0.0,
    rng: random.Random | None = None,
    qc: QCPolicy | None = None,
    cycle_ids: Sequence[int] | None = None,
) -> list[Leased]:
    """Lease up to ``limit`` tasks to ``rater_id``: eval tasks first, then overlap tasks that others
    answered already (so they complete), then the rest in id order; with ``gold_share`` > 0 some of
    them are gold tasks, placed at random among the others.

    Only tasks of a running cycle (or of no cycle) are leased; ``cycle_id``
    narrows to one cycle, ``cycle_ids`` to several (the task API: every
    running cycle, one per deployment target). On PostgreSQL the task rows are locked with SKIP
    LOCKED, so raters asking at once get different places; the places left
    on a task are counted again once it is locked (a lease taken by another
    transaction that committed meanwhile counts), and tasks lost that way
    are made up from the next ones (``LEASE_ROUNDS``). SQLite serialises writers.
    Gold is handed out only beside real work: a rater with nothing to do
    gets nothing, not a page of gold. With ``qc``, a rater that quality
    control leaves out of snapshots (or an operator excludes) is handed
    nothing and told why (``RaterExcluded``): its answers would not be used,
    and each task it held would be one the others cannot answer.
    """
    check_rater_key(session, rater_id=rater_id, api_key_id=api_key_id)
    if qc is not None:
        why = excluded_raters(session, qc).get(rater_id)
        if why is not None:
            raise RaterExcluded(f"rater {rater_id!r} is handed no tasks: {why}; an operator can include it again "
                                f"(PUT /v1/raters/{{rater_id}}/decision)")
    rng = rng or random.Random()
    now = utcnow()
    _close_expired_gold(session, now)
    running = select(Cycle.id).where(Cycle.status == "running")
    mine_taken = exists().where(
        TaskLease.task_id == ComparisonTask.id,
        TaskLease.rater_id == rater_id,
        or_(TaskLease.answered_at.is_not(None), TaskLease.released_at.is_not(None), TaskLease.leased_until > now),
    )
    query = (
        select(ComparisonTask)
        .where(
            ComparisonTask.status == "open",
            ComparisonTask.kind.in_(SERVED_KINDS),
            or_(ComparisonTask.cycle_id.is_(None), ComparisonTask.cycle_id.in_(running)),
            ~mine_taken,
            ComparisonTask.answers + _holders(now, ComparisonTask.id) < ComparisonTask.answers_needed,
        )
        .order_by(
            case((ComparisonTask.kind == "eval", 0), else_=1),
            case((ComparisonTask.answers > 0, 0), else_=1),
            ComparisonTask.id,
        )
        .with_for_update(skip_locked=True, of=ComparisonTask)
    )
    if cycle_id is not None:
        query = query.where(ComparisonTask.cycle_id == cycle_id)
    elif cycle_ids is not None:
        query = query.where(ComparisonTask.cycle_id.in_(list(cycle_ids)))
    real: list[ComparisonTask] = []
    considered: set[int] = set()
    for _ in range(LEASE_ROUNDS):
        # A task another rater leased and committed while this statement ran is locked here all the same
        # (its row did not change, so PostgreSQL does not check it again): the places are counted again
        # under the row locks, in a statement of its own, and what was lost is looked for once more.
        round_query = query.where(ComparisonTask.id.not_in(considered)) if considered else query
        candidates = list(session.scalars(round_query.limit(limit - len(real))))
        if not candidates:
            break
        considered |= {t.id for t in candidates}
        holders = dict(session.execute(
            select(TaskLease.task_id, func.count())
            .where(TaskLease.task_id.in_([t.id for t in candidates]), _live(now), TaskLease.rater_id != rater_id)
            .group_by(TaskLease.task_id)
        ).all())
        real += [t for t in candidates if t.answers + holders.get(t.id, 0) < t.answers_needed]
        if len(real) >= limit:
            break
    if not real:
        return []
    gold_slots = _gold_slots(session, rater_id=rater_id, real=len(real), limit=limit, share=gold_share, rng=rng)
    gold = _gold_tasks(session, rater_id=rater_id, n=gold_slots, cycle_id=real[0].cycle_id, rng=rng) if gold_slots else []
    tasks = real[: max(limit - len(gold), 0)] + gold
    if gold:
        rng.shuffle(tasks)
    until = now + lease
    existing = {
        row.task_id: row
        for row in session.scalars(select(TaskLease).where(TaskLease.task_id.in_([t.id for t in tasks]),
                                                           TaskLease.rater_id == rater_id))
    }
    for task in tasks:
        row = existing.get(task.id)
        if row is None:
            session.add(TaskLease(task_id=task.id, rater_id=rater_id, api_key_id=api_key_id, leased_at=now,
                                  leased_until=until))
        else:  # this rater's own lease ran out before; it takes the task again
            row.leased_at, row.leased_until, row.api_key_id = now, until, api_key_id
    session.flush()
    return [Leased(task, until) for task in tasks]


def _close_expired_gold(session: Session, now: datetime) -> None:
    """Close gold tasks whose lease ran out unanswered: each was made for one rater and is never handed out again."""
    expired = select(TaskLease.task_id).where(
        TaskLease.answered_at.is_(None), TaskLease.released_at.is_(None), TaskLease.leased_until <= now
    )
    session.execute(
        update(ComparisonTask)
        .where(ComparisonTask.kind == "gold", ComparisonTask.status == "open", ComparisonTask.id.in_(expired))
        .values(status="closed", done_at=now)
    )


def _holders(now: datetime, task_id):
    """How many raters hold a live lease on the task (a correlated scalar subquery)."""
    return (
        select(func.count()).select_from(TaskLease).where(TaskLease.task_id == task_id, _live(now))
        .correlate(ComparisonTask).scalar_subquery()
    )


def _gold_slots(session: Session, *, rater_id: str, real: int, limit: int, share: float, rng: random.Random) -> int:
    """How many gold tasks a page of up to ``limit`` tasks holds, beside up to ``real`` real ones, so that
    about ``share`` of what the rater was handed is gold: each slot is gold with probability ``share``,
    held within one task of the exact share over everything the rater was handed since gold was first
    registered (so the share holds, and where gold falls cannot be counted out). The page ends when it is full or the real tasks are
    used up."""
    if share <= 0:
        return 0
    # Counted from when gold was first registered: gold that arrives late does not make up for the past.
    since = session.scalar(select(func.min(GoldComparison.created_at)).where(GoldComparison.retired_at.is_(None)))
    if since is None:
        return 0
    served, gold_served = session.execute(
        select(func.count(), func.coalesce(func.sum(case((ComparisonTask.kind == "gold", 1), else_=0)), 0))
        .select_from(TaskLease).join(ComparisonTask, ComparisonTask.id == TaskLease.task_id)
        .where(TaskLease.rater_id == rater_id, TaskLease.leased_at >= since)
    ).one()
    gold = used = 0
    while gold + used < limit and used < real:
        expected = share * (served + 1)
        if gold_served + 1 <= expected - 1 + 1e-9:
            is_gold = True
        elif gold_served >= expected + 1 - 1e-9:
            is_gold = False
        else:
            is_gold = rng.random() < share
        served += 1
        if is_gold:
            gold_served += 1
            gold += 1
        else:
            used += 1
    return gold


def _gold_tasks(session: Session, *, rater_id: str, n: int, cycle_id: int | None, rng: random.Random) -> list[ComparisonTask]:
    """Up to ``n`` new gold tasks for ``rater_id``: registered gold it was never shown, A and B in a random order."""
    shown = (
        select(ComparisonTask.gold_id)
        .join(TaskLease, TaskLease.task_id == ComparisonTask.id)
        .where(TaskLease.rater_id == rater_id, ComparisonTask.kind == "gold")
    )
    pool = list(session.scalars(
        select(GoldComparison).where(GoldComparison.retired_at.is_(None), GoldComparison.id.not_in(shown))
    ))
    rows = []
    for gold in rng.sample(pool, min(n, len(pool))):
        flip = rng.random() < 0.5
        a, b = (gold.response_b, gold.response_a) if flip else (gold.response_a, gold.response_b)
        expected = {"a": "b", "b": "a"}.get(gold.choice, "tie") if flip else gold.choice
        meta = dict(gold.meta or {})
        rows.append(ComparisonTask(
            cycle_id=cycle_id, prompt_id=meta.pop("prompt_id", None), prompt=gold.prompt, response_a=a,
            response_b=b, meta=meta, kind="gold", gold_id=gold.id, expected_choice=expected,
        ))
    session.add_all(rows)
    session.flush()
    return rows


def _lease_of(session: Session, *, task_id: int, rater_id: str, api_key_id: int | None) -> TaskLease:
    """The rater's live lease on the task, locked; ``Conflict`` naming the task otherwise."""
    row = session.scalar(
        select(TaskLease).where(TaskLease.task_id == task_id, TaskLease.rater_id == rater_id).with_for_update()
    )
    if row is None and session.get(ComparisonTask, task_id) is None:
        raise NotFound(f"comparison task {task_id} does not exist")
    problem = lease_problem(row, task_id=task_id, rater_id=rater_id, api_key_id=api_key_id, now=utcnow())
    if problem:
        raise Conflict(problem)
    return row


def lease_problem(row: TaskLease | None, *, task_id: int, rater_id: str, api_key_id: int | None,
                  now: datetime) -> str | None:
    """Why ``row`` is not a live lease of ``rater_id`` under ``api_key_id`` on task ``task_id`` (None: it is)."""
    if row is None or row.api_key_id != api_key_id:
        return f"comparison task {task_id} is not leased to rater {rater_id!r} under this API key"
    if row.answered_at is not None:
        return f"comparison task {task_id} was already answered by rater {rater_id!r}"
    if row.released_at is not None:
        return f"rater {rater_id!r} released comparison task {task_id}"
    if row.leased_until <= now:
        return f"the lease of rater {rater_id!r} on comparison task {task_id} ran out at {row.leased_until.isoformat()}"
    return None


def renew_lease(session: Session, *, task_id: int, rater_id: str, api_key_id: int | None, lease: timedelta) -> TaskLease:
    """Extend a live lease to ``lease`` from now; ``Conflict`` when the rater holds none on the task
    (or the task is no longer open)."""
    row = _lease_of(session, task_id=task_id, rater_id=rater_id, api_key_id=api_key_id)
    if row.task.status != "open":
        raise Conflict(f"comparison task {task_id} is {row.task.status}")
    row.leased_until = utcnow() + lease
    session.flush()
    return row


def release_lease(session: Session, *, task_id: int, rater_id: str, api_key_id: int | None) -> TaskLease:
    """Give a live lease up (a skip): the task's place is free for others at once, and it is not
    handed to this rater again. A released gold task is closed (it was made for this rater only)."""
    row = _lease_of(session, task_id=task_id, rater_id=rater_id, api_key_id=api_key_id)
    row.released_at = utcnow()
    if row.task.kind == "gold" and row.task.status == "open":
        row.task.status, row.task.done_at = "closed", row.released_at
    session.flush()
    return row


def live_leases(session: Session, *, rater_id: str, api_key_id: int | None) -> list[Leased]:
    """The rater's live leases on open tasks, oldest first (what it holds and has not answered)."""
    now = utcnow()
    rows = session.execute(
        select(ComparisonTask, TaskLease.leased_until)
        .join(TaskLease, TaskLease.task_id == ComparisonTask.id)
        .where(TaskLease.rater_id == rater_id, TaskLease.api_key_id.is_not_distinct_from(api_key_id), _live(now),
               ComparisonTask.status == "open")
        .order_by(TaskLease.leased_at, TaskLease.id)
    ).all()
    return [Leased(task, until) for task, until in rows]


@dataclass(frozen=True)
class Progress:
    """How far the rater is, and how much is left, over the running cycles (one per deployment target may run
    at once: a rater answers the tasks of all of them)."""

    answered: int
    """tasks the rater answered, all time"""
    answered_in_cycle: int | None
    """tasks of the running cycles the rater answered (None: no cycle runs)"""
    open_tasks: int
    """tasks left open in the running cycles (when none runs: open tasks of no cycle)"""
    cycle_week: str | None
    """the running cycles' labels, newest first, comma-separated (``2026-W48``; ``2026-W48@<target>`` for a
    target other than the default one); None when no cycle runs"""


def rater_progress(session: Session, *, rater_id: str) -> Progress:
    """The rater's answered tasks (all time and in the running cycles) and the tasks left open there."""
    running = session.execute(select(Cycle.id, Cycle.week, Cycle.deploy_target).where(Cycle.status == "running")
                              .order_by(Cycle.id.desc())).all()
    cycle_ids = [row.id for row in running]
    answered = select(func.count()).select_from(TaskLease).where(
        TaskLease.rater_id == rater_id, TaskLease.answered_at.is_not(None))
    in_cycle = None
    if cycle_ids:
        in_cycle = session.scalar(answered.join(ComparisonTask, ComparisonTask.id == TaskLease.task_id)
                                  .where(ComparisonTask.cycle_id.in_(cycle_ids)))
    open_tasks = select(func.count()).select_from(ComparisonTask).where(
        ComparisonTask.status == "open", ComparisonTask.kind.in_(SERVED_KINDS),
        ComparisonTask.cycle_id.in_(cycle_ids) if cycle_ids else ComparisonTask.cycle_id.is_(None))
    from store.cycles import cycle_label  # store.cycles imports this module

    labels = ", ".join(cycle_label(row.week, row.deploy_target) for row in running) or None
    return Progress(int(session.scalar(answered)), in_cycle, int(session.scalar(open_tasks)), labels)


def lease_started_at(session: Session, *, task_id: int, rater_id: str) -> datetime | None:
    """When the rater last took its lease on the task (None: it never held one)."""
    return session.scalar(select(TaskLease.leased_at).where(TaskLease.task_id == task_id, TaskLease.rater_id == rater_id))


def close_tasks(session: Session, *, cycle_id: int, kind: str | None = None) -> int:
    """Close a cycle's open tasks (of one kind, or all): no rater is handed them again. Returns how many."""
    query = update(ComparisonTask).where(ComparisonTask.cycle_id == cycle_id, ComparisonTask.status == "open")
    if kind is not None:
        query = query.where(ComparisonTask.kind == kind)
    result = session.execute(query.values(status="closed", done_at=utcnow()))
    return int(result.rowcount or 0)


def reopen_tasks(session: Session, *, cycle_id: int, kinds: tuple[str, ...], after_id: int | None = None) -> int:
    """Open again a cycle's closed tasks of ``kinds`` that still want answers (a cancel closed them and the
    cycle runs again; with ``after_id``, only tasks above it). Returns how many."""
    query = update(ComparisonTask).where(ComparisonTask.cycle_id == cycle_id, ComparisonTask.status == "closed",
                                         ComparisonTask.kind.in_(kinds))
    if after_id is not None:
        query = query.where(ComparisonTask.id > after_id)
    return int(session.execute(query.values(status="open", done_at=None)).rowcount or 0)


def task_counts(session: Session, *, cycle_id: int, kind: str | None = "train",
                after_id: int | None = None) -> dict[str, int]:
    """How many of a cycle's comparison tasks (of one kind; None: all) are open, done and closed, and how
    many open ones no rater answered yet (``unanswered``: an overlap task with one answer of two is open
    but answered)."""
    query = select(ComparisonTask.status, func.count(), func.sum(case((ComparisonTask.answers == 0, 1), else_=0)))
    query = query.where(ComparisonTask.cycle_id == cycle_id)
    if kind is not None:
        query = query.where(ComparisonTask.kind == kind)
    if after_id is not None:
        query = query.where(ComparisonTask.id > after_id)
    counts = {status: 0 for status in ("open", "done", "closed")}
    counts["unanswered"] = 0
    for status, n, unanswered in session.execute(query.group_by(ComparisonTask.status)):
        counts[status] = int(n)
        if status == "open":
            counts["unanswered"] = int(unanswered or 0)
    return counts


def eval_tasks_of(session: Session, *, cycle_id: int, after_id: int | None = None) -> list[ComparisonTask]:
    """A cycle's eval tasks (above ``after_id``: those of the candidate of its newest attempt), in id order."""
    query = select(ComparisonTask).where(ComparisonTask.cycle_id == cycle_id, ComparisonTask.kind == "eval")
    if after_id is not None:
        query = query.where(ComparisonTask.id > after_id)
    return list(session.scalars(query.order_by(ComparisonTask.id)))


@dataclass(frozen=True)
class EvalJudgement:
    """One labeler's verdict on one eval task, as the candidate sees it."""

    task_id: int
    rater_id: str
    outcome: float
    """1: the labeler preferred the candidate, 0: the deployed policy, 0.5: a tie"""


def eval_judgements(session: Session, *, cycle_id: int, after_id: int | None = None) -> list[EvalJudgement]:
    """Every answer to the cycle's eval tasks (above ``after_id``), unblinded; one per (task, rater): the first
    one registered."""
    query = (
        select(Comparison.task_id, Comparison.rater_id, Comparison.choice, ComparisonTask.candidate_side)
        .join(ComparisonTask, ComparisonTask.id == Comparison.task_id)
        .where(ComparisonTask.cycle_id == cycle_id, ComparisonTask.kind == "eval")
        .order_by(Comparison.id)
    )
    if after_id is not None:
        query = query.where(ComparisonTask.id > after_id)
    rows = session.execute(query)
    seen: set[tuple[int, str]] = set()
    out = []
    for task_id, rater_id, choice, side in rows:
        if (task_id, rater_id) in seen:
            continue
        seen.add((task_id, rater_id))
        outcome = 0.5 if choice == "tie" else float(choice == side)
        out.append(EvalJudgement(task_id=task_id, rater_id=rater_id, outcome=outcome))
    return out
