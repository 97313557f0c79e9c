"""Aggregates kept when a cycle closes, so the operator pages read a year of cycles without reading every
comparison.

When a cycle closes (succeeded, failed or cancelled: ``close_cycle``, called where the store finishes or
cancels it, after its open tasks are closed), its numbers are computed once and kept:

* per cycle (``CycleAggregate``): the comparisons and batches registered while it ran and their rater
  agreement (what ``store.status.feedback_by_cycle`` shows), and Krippendorff's alpha over its overlap
  tasks (``store.raters.cycle_agreement``);
* per (cycle, rater) (``CycleRaterAggregate``): its comparisons answering the cycle's tasks, its gold
  answers and how many were right (first answer per (task, rater)), and its lease-to-answer seconds as a
  histogram (below);
* per (cycle, rater, other rater) (``CycleRaterPair``): on the cycle's overlap tasks (distinct raters,
  first answer each, as ``store.raters._overlap_units``), the 3x3 counts of (its choice, the other's
  choice). Cohen's kappa against any set of trusted raters is computed exactly from these counts summed
  over the trusted others: p_o and p_e need only the joint counts.

The per-rater rows of every closed cycle whose aggregates hold are also summed into running totals
(``RaterTotal``, ``RaterPairTotal``), kept in step by each close under one lock (a PostgreSQL advisory
lock; SQLite runs one writer at a time): a page reads about a row per rater, not a row per (cycle, rater).
Closing a cycle again takes its old rows out of the totals before it puts the new ones in, so it
replaces, never double-counts.

**When kept numbers hold.** A cycle's aggregates hold while its status and ``finished_at`` are those it
closed with (a re-run clears ``finished_at``: from then on the cycle is computed live again, and the
next close replaces its rows). The numbers of its tasks (alpha and the per-rater rows) also need that no
task of the cycle was open when it closed: a succeeded or cancelled cycle's tasks are closed with it,
and a closed or done task takes no more answers (``store.answers``), so those numbers cannot change; a
failed cycle's open tasks can still be answered while their leases run, so such a cycle is computed
live until it closes again. The feedback numbers are those of the batches registered inside the cycle's
time window, which lies in the past once it has closed; a batch still being written while the cycle
closes, stamped a moment before its end, is the one thing they can miss.

**Reads.** ``rater_parts`` is what ``store.raters.rater_stats`` sums: the totals, less the rows of
cycles counted in them whose aggregates no longer hold, plus a live computation over everything the
held cycles do not cover (answers to tasks of running, unclosed or no cycle, and comparisons that
answer no task), with the same rules as the full computation. Its counts, flags and kappas are exactly
those of the full computation. ``cycle_agreement`` and ``feedback_by_cycle`` read the kept row of a
closed cycle and compute a running one live. A store whose closed cycles have no aggregates yet (made
before migration 0007) is computed live the same way, correct but slower, until they are backfilled
once: ``python -m store.aggregates`` (``backfill``).

**Reading while a cycle closes.** Under PostgreSQL's READ COMMITTED each statement sees what was
committed when it began, so a close committing between a page's statements could have it count a cycle
twice (live and in the totals) or not at all. ``rater_parts`` notes ``aggregates_stamp`` (how many
cycles have kept aggregates and when the newest was computed; each close makes that later than any
before it) before it reads, and ``rater_stats`` reads again when the stamp changed by the time it is
done. ``cycle_agreement`` and ``feedback_by_cycle`` read each kept row in one statement: a cycle that
closes meanwhile is computed live, to the same numbers.

**Queries.** The live part reads a running cycle's answers and leases inside the range of its task ids
(``task_ranges``; a cycle's tasks are made while it runs), through the existing indexes on
``comparisons.task_id`` and ``task_leases (task_id, rater_id)``: without the range, PostgreSQL's
default cost model reads all million leases to join one cycle's ten thousand. Migration 0007 adds an
index on ``feedback_batches.created_at`` (the running cycle's time window) and on
``rater_pair_totals.other_rater_id`` (kappa against the trusted raters, or the untrusted, whichever
list is shorter).

**The median.** A rater's median lease-to-answer time merges histograms: bucket ``k`` holds times in
[``SECONDS_FLOOR`` * ``SECONDS_RATIO`` ** k, ``SECONDS_FLOOR`` * ``SECONDS_RATIO`` ** (k + 1)) and stands
for its geometric middle, so a median read from the merged histogram is within
sqrt(``SECONDS_RATIO``) - 1 (under 1%) of the exact one, relative (times under ``SECONDS_FLOOR``, 1 ms,
count as 0.5 ms: within 0.5 ms). A rater none of whose timed answers is in a closed cycle's aggregates
gets the exact median, as before.
"""

from __future__ import annotations

import argparse
import math
import statistics
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import accumulate
from typing import Any

from sqlalchemy import Float, and_, case, cast, delete, func, or_, select, text
from sqlalchemy.orm import Session

from store.errors import Conflict, NotFound
from store.models import (
    CHOICES,
    PAIR_COLUMNS,
    Comparison,
    ComparisonTask,
    Cycle,
    CycleAggregate,
    CycleRaterAggregate,
    CycleRaterPair,
    FeedbackBatch,
    RaterPairTotal,
    RaterTotal,
    TaskLease,
    utcnow,
)
from store.raters import _overlap_units, _task_answers, krippendorff_alpha

SECONDS_FLOOR = 0.001
"""the smallest lease-to-answer time the histogram tells apart (s); shorter ones share bucket -1"""
SECONDS_RATIO = 1.02
"""the ratio of a histogram bucket's upper to its lower edge: medians within sqrt(1.02) - 1 < 1%"""
PAIR_KEYS = tuple(tuple(name.split("_")) for name in PAIR_COLUMNS)
"""(this rater's choice, the other's) of each of ``PAIR_COLUMNS``, in order"""
LOCK_KEY = 7_201_607
"""the PostgreSQL advisory lock that puts closes one after another (they update the same totals)"""

Pairs = Counter[tuple[str, str]]
"""counts of (this rater's choice, the other rater's choice)"""


# -- the seconds histogram --------------------------------------------------------------------------


def seconds_bucket(seconds: float) -> int:
    """The histogram bucket of a lease-to-answer time (module docstring); -1 under ``SECONDS_FLOOR``."""
    if seconds < SECONDS_FLOOR:
        return -1
    return math.floor(math.log(seconds / SECONDS_FLOOR) / math.log(SECONDS_RATIO))


def bucket_seconds(bucket: int) -> float:
    """The time a bucket stands for: the geometric middle of its edges (half of ``SECONDS_FLOOR`` for -1)."""
    if bucket < 0:
        return SECONDS_FLOOR / 2
    return SECONDS_FLOOR * SECONDS_RATIO ** (bucket + 0.5)


def histogram_of(seconds: Iterable[float]) -> Counter[int]:
    """Times as a histogram: bucket -> count."""
    return Counter(seconds_bucket(s) for s in seconds)


def dense(histogram: Mapping[int, int]) -> list[int]:
    """A histogram as it is kept (JSON): ``[first bucket, its count, the next bucket's, ...]``, ``[]`` if empty."""
    used = [k for k, v in histogram.items() if v]
    if not used:
        return []
    first, last = min(used), max(used)
    return [first, *(int(histogram.get(k, 0)) for k in range(first, last + 1))]


def sparse(kept: Sequence[int] | None) -> Counter[int]:
    """A kept histogram (``dense``) as bucket -> count."""
    if not kept:
        return Counter()
    return Counter({kept[0] + i: v for i, v in enumerate(kept[1:]) if v})


def histogram_median(kept: Sequence[int], extra: Mapping[int, int] | None = None) -> float | None:
    """The median of the times of a kept histogram (``dense``) and ``extra`` (bucket -> count), each read as
    its bucket's time: the mean of the two middle ones for an even count, like ``statistics.median``. None
    when both are empty."""
    first, counts = (kept[0], list(kept[1:])) if kept else (None, [])
    if extra:
        lo, hi = min(extra), max(extra)
        if first is not None:
            lo, hi = min(lo, first), max(hi, first + len(counts) - 1)
        merged = [0] * (hi - lo + 1)
        if first is not None:
            merged[first - lo:first - lo + len(counts)] = counts
        for bucket, n in extra.items():
            merged[bucket - lo] += n
        first, counts = lo, merged
    if first is None:
        return None
    cumulative = list(accumulate(counts))
    n = cumulative[-1]
    if n <= 0:
        return None
    below, above = bisect_right(cumulative, (n - 1) // 2), bisect_right(cumulative, n // 2)
    return (bucket_seconds(first + below) + bucket_seconds(first + above)) / 2


# -- one scope's numbers, computed from the comparisons ------------------------------------------------


@dataclass
class ScopeNumbers:
    """Per-rater numbers over the answers to some tasks, as ``rater_stats`` counts them, in a form that adds up."""

    answered: Counter[str] = field(default_factory=Counter)
    gold_answered: Counter[str] = field(default_factory=Counter)
    gold_correct: Counter[str] = field(default_factory=Counter)
    pairs: dict[tuple[str, str], Pairs] = field(default_factory=lambda: defaultdict(Counter))
    """(rater, other rater) -> the counts of their first answers on the same overlap tasks"""
    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    """rater -> lease-to-answer seconds of its answered leases"""
    units: dict[int, dict[str, str]] = field(default_factory=dict)
    """task id -> {rater: first answer} of its overlap tasks (``_overlap_units``)"""

    def add(self, other: ScopeNumbers) -> None:
        """Count ``other``'s numbers in too (its tasks are not these)."""
        self.answered.update(other.answered)
        self.gold_answered.update(other.gold_answered)
        self.gold_correct.update(other.gold_correct)
        for key, counts in other.pairs.items():
            self.pairs[key].update(counts)
        for rater, seconds in other.seconds.items():
            self.seconds[rater].extend(seconds)
        self.units.update(other.units)


def task_ranges(session: Session, cycle_ids: Sequence[int]) -> list[tuple[int, int]]:
    """The first and last task id of each of these cycles (a cycle's tasks are made while it runs, so its
    ids lie close together)."""
    if not cycle_ids:
        return []
    query = (select(func.min(ComparisonTask.id), func.max(ComparisonTask.id))
             .where(ComparisonTask.cycle_id.in_(list(cycle_ids))).group_by(ComparisonTask.cycle_id))
    return [(int(lo), int(hi)) for lo, hi in session.execute(query)]


def scope_numbers(session: Session, tasks, *, ranges: Sequence[tuple[int, int]] | None = None,
                  untasked: bool = False, counts: bool = True) -> ScopeNumbers:
    """The numbers of the answers to the tasks that ``tasks`` (a condition on ``ComparisonTask``) picks,
    and, with ``untasked``, of the comparisons that answer no task (they count only in ``answered``).
    ``counts=False`` leaves out ``answered`` and ``seconds``.

    ``ranges`` (``task_ranges``), when given, are task id ranges that hold every task ``tasks`` picks: the
    comparisons and leases are looked up inside them. Without them PostgreSQL's default cost model
    (``random_page_cost`` 4) reads all million leases to join the few thousand of one cycle, 15 times
    slower than looking them up.
    """
    out = ScopeNumbers()
    if untasked and counts:
        for rater, n in session.execute(select(Comparison.rater_id, func.count())
                                        .where(Comparison.task_id.is_(None)).group_by(Comparison.rater_id)):
            out.answered[rater] += int(n)
    if ranges is not None and not ranges:
        return out  # no task
    near_comparisons = tasks if ranges is None else and_(
        tasks, or_(*(Comparison.task_id.between(lo, hi) for lo, hi in ranges)))
    near_leases = tasks if ranges is None else and_(
        tasks, or_(*(TaskLease.task_id.between(lo, hi) for lo, hi in ranges)))
    if counts:
        query = (select(Comparison.rater_id, func.count()).join(ComparisonTask, ComparisonTask.id == Comparison.task_id)
                 .where(near_comparisons).group_by(Comparison.rater_id))
        for rater, n in session.execute(query):
            out.answered[rater] += int(n)
    rows = _task_answers(session, tasks=near_comparisons)
    seen_gold: set[tuple[int, str]] = set()
    for task_id, rater, choice, kind, expected, _ in rows:
        if kind == "gold" and (task_id, rater) not in seen_gold:
            seen_gold.add((task_id, rater))
            out.gold_answered[rater] += 1
            out.gold_correct[rater] += choice == expected
    out.units = _overlap_units(rows)
    for answers in out.units.values():
        for rater, choice in answers.items():
            for other, theirs in answers.items():
                if other != rater:
                    out.pairs[rater, other][choice, theirs] += 1
    if counts:
        answered = TaskLease.answered_at.is_not(None)
        if session.get_bind().dialect.name == "postgresql":
            # Subtracted and gathered per rater in the database: an interval's exact microseconds as a float
            # are what timedelta.total_seconds() gives (each rounds the same fraction once), and a list of
            # floats per rater is not ten thousand rows for Python's collector to walk.
            took = cast(func.extract("epoch", TaskLease.answered_at - TaskLease.leased_at), Float)
            leases = (select(TaskLease.rater_id, func.array_agg(took))
                      .join(ComparisonTask, ComparisonTask.id == TaskLease.task_id)
                      .where(near_leases, answered).group_by(TaskLease.rater_id))
            for rater, seconds in session.execute(leases):
                out.seconds[rater].extend(seconds)
        else:
            leases = (select(TaskLease.rater_id, TaskLease.leased_at, TaskLease.answered_at)
                      .join(ComparisonTask, ComparisonTask.id == TaskLease.task_id).where(near_leases, answered))
            for rater, leased_at, answered_at in session.execute(leases):
                out.seconds[rater].append((answered_at - leased_at).total_seconds())
    return out


def window_numbers(session: Session, *, start: datetime, end: datetime) -> dict[str, Any]:
    """The batches registered in [start, end): how many, their comparisons, and their rater agreement as
    ``store.feedback.rater_agreement`` gives it, counted in the database.

    ``agreement_of`` groups the comparisons by (prompt, the two responses in either order) with each verdict
    turned to the sorted order; here a group's verdicts are counted per verdict (n_v, m in all), so its
    rater pairs are m(m-1)/2 and its agreeing pairs the sum of n_v(n_v-1)/2. The database's order of the
    responses may differ from Python's, but it turns every verdict of a group alike, which leaves the
    agreeing pairs as they are.
    """
    in_window = and_(FeedbackBatch.created_at >= start, FeedbackBatch.created_at < end)
    batches, comparisons = session.execute(
        select(func.count(), func.coalesce(func.sum(FeedbackBatch.comparison_count), 0)).where(in_window)
    ).one()
    a, b, choice = Comparison.response_a, Comparison.response_b, Comparison.choice
    turned = and_(a > b, choice != "tie")
    verdict = case((turned, case((choice == "a", "b"), else_="a")), else_=choice)
    lo, hi = case((a <= b, a), else_=b), case((a <= b, b), else_=a)
    per_pair = (
        select(func.count().label("m"),
               *(func.sum(case((verdict == v, 1), else_=0)).label(f"n_{v}") for v in CHOICES))
        .where(Comparison.batch_id.in_(select(FeedbackBatch.id).where(in_window)))
        .group_by(Comparison.prompt, lo, hi)
        .subquery()
    )
    m, n = per_pair.c.m, [per_pair.c[f"n_{v}"] for v in CHOICES]
    shared, m2, m1, sq = session.execute(
        select(func.coalesce(func.sum(case((m >= 2, 1), else_=0)), 0), func.coalesce(func.sum(m * m), 0),
               func.coalesce(func.sum(m), 0), func.coalesce(func.sum(n[0] * n[0] + n[1] * n[1] + n[2] * n[2]), 0))
    ).one()
    total, agree = (int(m2) - int(m1)) // 2, (int(sq) - int(m1)) // 2
    return {"comparisons": int(comparisons), "batches": int(batches), "pairs_with_multiple_raters": int(shared),
            "rater_pairs": total, "agreement": agree / total if total else None}


# -- closing a cycle --------------------------------------------------------------------------------


def close_cycle(session: Session, *, cycle_id: int) -> CycleAggregate:
    """Compute and keep the aggregates of a cycle that has closed (succeeded, failed or cancelled),
    replacing any it had, and keep the totals in step (module docstring). Call it in the transaction that
    closes the cycle, after its open tasks are closed. ``Conflict`` for a running cycle."""
    _one_at_a_time(session)
    cycle = session.get(Cycle, cycle_id)
    if cycle is None:
        raise NotFound(f"cycle {cycle_id} does not exist")
    if cycle.status == "running" or cycle.finished_at is None:
        raise Conflict(f"cycle {cycle.week} is {cycle.status}: its aggregates are kept when it closes")
    _drop_stale_from_totals(session)
    old = session.get(CycleAggregate, cycle_id)
    if old is not None:
        if old.in_totals:
            _count_in_totals(session, cycle_id, sign=-1)
        session.delete(old)
    session.execute(delete(CycleRaterPair).where(CycleRaterPair.cycle_id == cycle_id))
    session.execute(delete(CycleRaterAggregate).where(CycleRaterAggregate.cycle_id == cycle_id))
    session.flush()

    numbers = scope_numbers(session, ComparisonTask.cycle_id == cycle_id, ranges=task_ranges(session, [cycle_id]))
    open_tasks = session.scalar(select(func.count()).select_from(ComparisonTask).where(
        ComparisonTask.cycle_id == cycle_id, ComparisonTask.status == "open"))
    window = window_numbers(session, start=cycle.created_at, end=cycle.finished_at)
    units = numbers.units
    newest = session.scalar(select(func.max(CycleAggregate.computed_at)))
    now = utcnow() if newest is None else max(utcnow(), newest + timedelta(microseconds=1))
    row = CycleAggregate(
        cycle_id=cycle_id, status=cycle.status, finished_at=cycle.finished_at, open_tasks=int(open_tasks),
        comparisons=window["comparisons"], batches=window["batches"],
        pairs_with_multiple_raters=window["pairs_with_multiple_raters"], rater_pairs=window["rater_pairs"],
        agreement=window["agreement"], overlap_tasks=len(units),
        overlap_raters=len({r for u in units.values() for r in u}),
        alpha=krippendorff_alpha([list(u.values()) for u in units.values()]),
        in_totals=int(open_tasks) == 0, computed_at=now,
    )
    session.add(row)
    raters = set(numbers.answered) | set(numbers.gold_answered) | set(numbers.seconds)
    session.add_all(
        CycleRaterAggregate(cycle_id=cycle_id, rater_id=r, answered=numbers.answered[r],
                            gold_answered=numbers.gold_answered[r], gold_correct=numbers.gold_correct[r],
                            timed=len(numbers.seconds.get(r, ())),
                            seconds=dense(histogram_of(numbers.seconds.get(r, ()))))
        for r in sorted(raters)
    )
    session.add_all(
        CycleRaterPair(cycle_id=cycle_id, rater_id=r, other_rater_id=o, **_pair_columns(counts))
        for (r, o), counts in sorted(numbers.pairs.items())
    )
    session.flush()
    if row.in_totals:
        _count_in_totals(session, cycle_id, sign=1)
    return row


def backfill(session: Session) -> list[int]:
    """Close every closed cycle whose aggregates do not hold (made before migration 0007, or closed without
    ``close_cycle``); the ids it closed. A failed cycle whose tasks were still open is closed again each
    time: once they are done, its numbers are kept."""
    done = []
    for state in coverage(session).states:
        if state.status != "running" and state.finished_at is not None and not state.tasks_hold:
            close_cycle(session, cycle_id=state.cycle_id)
            done.append(state.cycle_id)
    return done


def _one_at_a_time(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})


def _pair_columns(counts: Mapping[tuple[str, str], int]) -> dict[str, int]:
    return {name: int(counts.get(key, 0)) for name, key in zip(PAIR_COLUMNS, PAIR_KEYS)}


def _pairs_of(values: Sequence[int]) -> Pairs:
    return Counter({key: int(v) for key, v in zip(PAIR_KEYS, values) if v})


def _pair_sums(table) -> list:
    return [func.coalesce(func.sum(getattr(table, name)), 0) for name in PAIR_COLUMNS]


def _count_in_totals(session: Session, cycle_id: int, *, sign: int) -> None:
    """Add (``sign`` 1) or take away (-1) a cycle's kept per-rater rows to or from the totals, and mark it."""
    rows = session.execute(
        select(CycleRaterAggregate.rater_id, CycleRaterAggregate.answered, CycleRaterAggregate.gold_answered,
               CycleRaterAggregate.gold_correct, CycleRaterAggregate.timed, CycleRaterAggregate.seconds)
        .where(CycleRaterAggregate.cycle_id == cycle_id)).all()
    against_all = {rater: [int(v) for v in values] for rater, *values in session.execute(
        select(CycleRaterPair.rater_id, *_pair_sums(CycleRaterPair)).where(CycleRaterPair.cycle_id == cycle_id)
        .group_by(CycleRaterPair.rater_id))}
    raters = sorted({r.rater_id for r in rows} | set(against_all))
    totals = {t.rater_id: t for t in session.scalars(select(RaterTotal).where(RaterTotal.rater_id.in_(raters)))}
    by_rater = {r.rater_id: r for r in rows}
    for rater in raters:
        total = totals.get(rater)
        if total is None:
            total = RaterTotal(rater_id=rater, answered=0, gold_answered=0, gold_correct=0, timed=0, seconds=[],
                               **_pair_columns({}))
            session.add(total)
        mine = by_rater.get(rater)
        if mine is not None:
            total.answered += sign * mine.answered
            total.gold_answered += sign * mine.gold_answered
            total.gold_correct += sign * mine.gold_correct
            total.timed += sign * mine.timed
            histogram = sparse(total.seconds)
            for bucket, n in sparse(mine.seconds).items():
                histogram[bucket] += sign * n
            total.seconds = dense(histogram)
        for name, n in zip(PAIR_COLUMNS, against_all.get(rater, ())):
            setattr(total, name, getattr(total, name) + sign * n)
        if total.answered == 0 and total.timed == 0 and not any(getattr(total, n) for n in PAIR_COLUMNS):
            _forget(session, total)
    # The pairs, in the database: a cycle has a few thousand, the totals tens of thousands.
    pairs = select(CycleRaterPair.rater_id, CycleRaterPair.other_rater_id,
                   *(getattr(CycleRaterPair, n) * sign for n in PAIR_COLUMNS)).where(CycleRaterPair.cycle_id == cycle_id)
    upsert = _insert(session)(RaterPairTotal).from_select(["rater_id", "other_rater_id", *PAIR_COLUMNS], pairs)
    session.execute(upsert.on_conflict_do_update(
        index_elements=["rater_id", "other_rater_id"],
        set_={n: getattr(RaterPairTotal, n) + getattr(upsert.excluded, n) for n in PAIR_COLUMNS}))
    if sign < 0:
        session.execute(delete(RaterPairTotal).where(*(getattr(RaterPairTotal, n) == 0 for n in PAIR_COLUMNS)))
    aggregate = session.get(CycleAggregate, cycle_id)
    if aggregate is not None:
        aggregate.in_totals = sign > 0
    session.flush()


def _insert(session: Session):
    """The dialect's INSERT, which has ON CONFLICT DO UPDATE (PostgreSQL, SQLite)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def _forget(session: Session, row) -> None:
    """Delete a totals row that sums to nothing (one made in this flush is just dropped)."""
    if row in session.new:
        session.expunge(row)
    else:
        session.delete(row)


def _drop_stale_from_totals(session: Session) -> None:
    """Take out of the totals the cycles counted in them whose aggregates no longer hold (a re-run)."""
    for state in coverage(session).states:
        if state.in_totals and not state.tasks_hold:
            _count_in_totals(session, state.cycle_id, sign=-1)


# -- what holds ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CycleState:
    """A cycle, and the aggregates it closed with, if any."""

    cycle_id: int
    status: str
    finished_at: datetime | None
    kept_status: str | None
    kept_finished_at: datetime | None
    open_tasks: int | None
    in_totals: bool

    @property
    def window_holds(self) -> bool:
        """Whether its kept feedback numbers (its time window's) are still its numbers."""
        return (self.kept_status is not None and self.status != "running" and self.status == self.kept_status
                and self.finished_at is not None and self.finished_at == self.kept_finished_at)

    @property
    def tasks_hold(self) -> bool:
        """Whether its kept numbers of its tasks (alpha, the per-rater rows) are still its numbers."""
        return self.window_holds and self.open_tasks == 0


@dataclass(frozen=True)
class Coverage:
    """Which cycles the kept aggregates cover now."""

    states: list[CycleState]

    @property
    def held(self) -> set[int]:
        """cycles whose per-rater numbers are read from their aggregates"""
        return {s.cycle_id for s in self.states if s.tasks_hold}

    @property
    def stale(self) -> list[int]:
        """cycles counted in the totals whose aggregates no longer hold: taken out again when read"""
        return [s.cycle_id for s in self.states if s.in_totals and not s.tasks_hold]

    @property
    def live(self) -> list[int]:
        """cycles computed from their comparisons"""
        return [s.cycle_id for s in self.states if not s.tasks_hold]


def coverage(session: Session, cycle_ids: Sequence[int] | None = None) -> Coverage:
    """Every cycle (or those of ``cycle_ids``) with the aggregates it closed with."""
    query = (
        select(Cycle.id, Cycle.status, Cycle.finished_at, CycleAggregate.status, CycleAggregate.finished_at,
               CycleAggregate.open_tasks, CycleAggregate.in_totals)
        .outerjoin(CycleAggregate, CycleAggregate.cycle_id == Cycle.id)
        .order_by(Cycle.id)
    )
    if cycle_ids is not None:
        query = query.where(Cycle.id.in_(list(cycle_ids)))
    return Coverage([CycleState(i, status, finished, kept_status, kept_finished, open_tasks, bool(in_totals))
                     for i, status, finished, kept_status, kept_finished, open_tasks, in_totals
                     in session.execute(query)])


def held_aggregates(session: Session, cycle_ids: Sequence[int], *, tasks: bool) -> dict[int, CycleAggregate]:
    """The kept aggregates of those of ``cycle_ids`` whose numbers still hold: of their time window, or
    (``tasks``) also of their tasks."""
    if not cycle_ids:
        return {}
    query = (select(CycleAggregate, Cycle.status, Cycle.finished_at).join(Cycle, Cycle.id == CycleAggregate.cycle_id)
             .where(CycleAggregate.cycle_id.in_(list(cycle_ids))))
    out = {}
    for row, status, finished_at in session.execute(query):
        state = CycleState(row.cycle_id, status, finished_at, row.status, row.finished_at, row.open_tasks, row.in_totals)
        if state.tasks_hold if tasks else state.window_holds:
            out[row.cycle_id] = row
    return out


# -- reading: kept totals plus the live rest ------------------------------------------------------------


@dataclass
class RaterParts:
    """Every rater's numbers as ``rater_stats`` needs them: kept totals plus the live rest (module docstring)."""

    answered: Counter[str]
    gold_answered: Counter[str]
    gold_correct: Counter[str]
    pairs: dict[str, Pairs]
    """rater -> its pair counts against every other rater"""
    session: Session
    coverage: Coverage
    kept_pairs: dict[str, Pairs]
    """rater -> its kept pair counts against every other rater (totals less stale cycles)"""
    kept_histograms: dict[str, list[int]]
    """rater -> its kept times (``dense``)"""
    live: ScopeNumbers
    stamp: tuple[int, datetime | None]
    """``aggregates_stamp`` before the first read"""

    def unchanged(self) -> bool:
        """Whether no close committed since these numbers began to be read (``pairs_with`` included): else
        they may mix two states of the kept aggregates, and are to be read again."""
        return aggregates_stamp(self.session) == self.stamp

    def pairs_with(self, trusted: set[str]) -> dict[str, Pairs]:
        """rater -> its pair counts against the raters of ``trusted`` only.

        The kept part is asked of the database for the shorter of two lists: the trusted raters, or the
        kept raters outside them (their counts are then taken from the counts against everyone).
        """
        out: dict[str, Pairs] = defaultdict(Counter)
        kept_raters = set(self.kept_pairs)  # every kept pair's other rater has kept pairs of its own
        outside = kept_raters - trusted
        if len(outside) <= len(trusted):
            for rater, counts in self.kept_pairs.items():
                out[rater].update(counts)
            for rater, values in self._kept_pair_sums(outside):
                out[rater].subtract(_pairs_of(values))
        else:
            for rater, values in self._kept_pair_sums(trusted & kept_raters):
                out[rater].update(_pairs_of(values))
        for (rater, other), counts in self.live.pairs.items():
            if other in trusted:
                out[rater].update(counts)
        return {r: kept for r, c in out.items() if (kept := _positive(c))}

    def _kept_pair_sums(self, others: set[str]) -> list[tuple[str, list[int]]]:
        """Per rater, its kept pair counts against ``others`` (totals less stale cycles), summed."""
        if not others:
            return []
        chosen = sorted(others)
        sums: dict[str, list[int]] = {}
        query = (select(RaterPairTotal.rater_id, *_pair_sums(RaterPairTotal))
                 .where(RaterPairTotal.other_rater_id.in_(chosen)).group_by(RaterPairTotal.rater_id))
        for rater, *values in self.session.execute(query):
            sums[rater] = [int(v) for v in values]
        if self.coverage.stale:
            query = (select(CycleRaterPair.rater_id, *_pair_sums(CycleRaterPair))
                     .where(CycleRaterPair.cycle_id.in_(self.coverage.stale), CycleRaterPair.other_rater_id.in_(chosen))
                     .group_by(CycleRaterPair.rater_id))
            for rater, *values in self.session.execute(query):
                sums[rater] = [a - int(b) for a, b in zip(sums.get(rater, [0] * len(PAIR_COLUMNS)), values)]
        return list(sums.items())

    def median_seconds(self, raters: Iterable[str]) -> dict[str, float]:
        """rater -> its median lease-to-answer seconds: exact while none of its times is kept, else from the
        merged histogram (module docstring)."""
        out = {}
        for rater in raters:
            live = self.live.seconds.get(rater, [])
            kept = self.kept_histograms.get(rater)
            median = histogram_median(kept, histogram_of(live)) if kept else (statistics.median(live) if live else None)
            if median is not None:
                out[rater] = median
        return out


def aggregates_stamp(session: Session) -> tuple[int, datetime | None]:
    """What changes whenever a close commits: how many cycles have kept aggregates, and when the newest was
    computed (``close_cycle`` makes that later than any before it)."""
    n, newest = session.execute(select(func.count(), func.max(CycleAggregate.computed_at))).one()
    return int(n), newest


def rater_parts(session: Session, *, counts: bool = True) -> RaterParts:
    """The numbers ``rater_stats`` sums: the kept totals, less the cycles in them that no longer hold, plus
    a live computation over what the held cycles do not cover. ``counts=False`` skips the live answer
    counts and times (``rater_stats`` leaves them out then). Under PostgreSQL's READ COMMITTED each statement
    sees what was committed when it began, so a close committing between two of them could count a cycle
    twice or not at all: ``RaterParts.unchanged`` says whether one did."""
    stamp = aggregates_stamp(session)
    cover = coverage(session)
    answered: Counter[str] = Counter()
    gold_answered: Counter[str] = Counter()
    gold_correct: Counter[str] = Counter()
    kept_pairs: dict[str, Pairs] = {}
    histograms: dict[str, list[int]] = {}
    kept = select(RaterTotal.rater_id, RaterTotal.answered, RaterTotal.gold_answered, RaterTotal.gold_correct,
                  RaterTotal.seconds, *(getattr(RaterTotal, n) for n in PAIR_COLUMNS))
    for rater, n_answered, n_gold, n_correct, seconds, *pair_values in session.execute(kept):
        answered[rater] += n_answered
        gold_answered[rater] += n_gold
        gold_correct[rater] += n_correct
        if pairs_ := _pairs_of(pair_values):
            kept_pairs[rater] = pairs_
        if counts and seconds:
            histograms[rater] = seconds
    if cover.stale:  # counted in the totals, no longer held: taken out again
        stale_seconds: dict[str, Counter[int]] = defaultdict(Counter)
        for r in session.scalars(select(CycleRaterAggregate).where(CycleRaterAggregate.cycle_id.in_(cover.stale))):
            answered[r.rater_id] -= r.answered
            gold_answered[r.rater_id] -= r.gold_answered
            gold_correct[r.rater_id] -= r.gold_correct
            stale_seconds[r.rater_id].update(sparse(r.seconds))
        for rater, seconds in stale_seconds.items():
            if rater in histograms:
                left = sparse(histograms[rater])
                left.subtract(seconds)
                histograms[rater] = dense(left)
        query = (select(CycleRaterPair.rater_id, *_pair_sums(CycleRaterPair))
                 .where(CycleRaterPair.cycle_id.in_(cover.stale)).group_by(CycleRaterPair.rater_id))
        for rater, *values in session.execute(query):
            left = kept_pairs.get(rater, Counter())
            left.subtract(_pairs_of([int(v) for v in values]))
            kept_pairs[rater] = _positive(left)
        kept_pairs = {r: c for r, c in kept_pairs.items() if c}
        histograms = {r: h for r, h in histograms.items() if h}
    live = scope_numbers(session, ComparisonTask.cycle_id.is_(None), untasked=True, counts=counts)
    if cover.live:
        live.add(scope_numbers(session, ComparisonTask.cycle_id.in_(cover.live), ranges=task_ranges(session, cover.live),
                               counts=counts))
    answered.update(live.answered)
    gold_answered.update(live.gold_answered)
    gold_correct.update(live.gold_correct)
    pairs: dict[str, Pairs] = {r: Counter(c) for r, c in kept_pairs.items()}
    for (rater, _), counts_ in live.pairs.items():
        pairs.setdefault(rater, Counter()).update(counts_)
    return RaterParts(
        answered=_positive(answered), gold_answered=_positive(gold_answered), gold_correct=_positive(gold_correct),
        pairs=pairs, session=session, coverage=cover, kept_pairs=kept_pairs, kept_histograms=histograms, live=live,
        stamp=stamp,
    )


def _positive(counts: Counter) -> Counter:
    """``counts`` without its zero (and, never expected, negative) entries."""
    return Counter({k: v for k, v in counts.items() if v > 0})


# -- the backfill command --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Keep the aggregates of every closed cycle without ones that hold (once, after migration 0007).

    ``python -m store.aggregates [--database-url URL]``
    """
    parser = argparse.ArgumentParser(prog="python -m store.aggregates", description=main.__doc__.split("\n")[0])
    parser.add_argument("--database-url", help="the store (default: the server's RATCHET_DATABASE_URL settings)")
    args = parser.parse_args(argv)
    from store.db import open_database
    from store.settings import get_settings

    database = open_database(args.database_url or get_settings().resolved_database_url)
    try:
        with database.session() as session:
            closed = backfill(session)
    finally:
        database.dispose()
    print(f"kept the aggregates of {len(closed)} cycle(s)" + (f": {', '.join(map(str, closed))}" if closed else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
