"""Aggregates kept when a cycle closes (``store.aggregates``): what the pages read from them is what computing
everything from the comparisons gives (the median of kept times within its stated bound)."""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter, defaultdict
from datetime import timedelta

import pytest
from sqlalchemy import delete, func, select, update

from store.aggregates import (
    SECONDS_RATIO,
    backfill,
    bucket_seconds,
    close_cycle,
    coverage,
    dense,
    histogram_median,
    histogram_of,
    seconds_bucket,
    sparse,
    window_numbers,
)
from store.cycles import claim_cycle, finish_cycle, open_cycle, rerun_cycle
from store.errors import Conflict
from store.feedback import NewComparison, create_feedback_batch, rater_agreement
from store.models import (
    CHOICES,
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
from store.raters import (
    QCPolicy,
    RaterStats,
    _decisions,
    _overlap_units,
    _task_answers,
    cohen_kappa,
    cohen_kappa_of_counts,
    cycle_agreement,
    decide,
    gold_flag,
    krippendorff_alpha,
    rater_stats,
    register_gold,
)
from store.status import feedback_by_cycle, recent_cycles
from store.tasks import create_tasks, lease_tasks
from tests.builders import batch

POLICY = QCPolicy(min_gold_answers=3, min_agreement_pairs=4)
"""flags soon enough for a store of a few dozen answers"""
RATERS = {"careful-1": 0.95, "careful-2": 0.9, "careful-3": 0.85, "noisy": 0.6, "random": None, "vetoed": 0.9}
"""rater -> how often it gives a task's true answer (None: at random, and gold wrong)"""
BOUND = math.sqrt(SECONDS_RATIO) - 1
"""the median's stated relative error once kept times are in it"""


# -- the full computation, as store.raters.rater_stats did it before aggregates ------------------------


def full_rater_stats(session, policy: QCPolicy, *, counts: bool = True) -> list[RaterStats]:
    """``rater_stats`` computed from every comparison and lease: its code before ``store.aggregates``."""
    stats: dict[str, RaterStats] = {}

    def of(rater: str) -> RaterStats:
        if rater not in stats:
            stats[rater] = RaterStats(rater)
        return stats[rater]

    if counts:
        for rater, n in session.execute(select(Comparison.rater_id, func.count()).group_by(Comparison.rater_id)):
            of(rater).answered = int(n)
    rows = _task_answers(session)
    seen_gold: set[tuple[int, str]] = set()
    for task_id, rater, choice, kind, expected, _ in rows:
        if kind == "gold" and (task_id, rater) not in seen_gold:
            seen_gold.add((task_id, rater))
            s = of(rater)
            s.gold_answered += 1
            s.gold_correct += choice == expected
    for rater, row in _decisions(session).items():
        s = of(rater)
        s.decision, s.decision_reason = row.decision, row.reason
    for s in stats.values():
        if flag := gold_flag(s.gold_correct, s.gold_answered, policy):
            s.flags.append(flag)
    trusted = {r for r, s in stats.items() if not s.flags and s.decision != "exclude"}
    with_trusted: dict[str, list] = defaultdict(list)
    with_all: dict[str, list] = defaultdict(list)
    for answers in _overlap_units(rows).values():
        for rater, choice in answers.items():
            others = [(r, other) for r, other in answers.items() if r != rater]
            with_all[rater] += [(choice, other) for _, other in others]
            with_trusted[rater] += [(choice, other) for r, other in others if r in trusted]
    for rater, everyone in with_all.items():
        mine = with_trusted[rater] or everyone
        s = of(rater)
        s.agreement_pairs, s.kappa = len(mine), cohen_kappa(mine)
        if s.agreement_pairs >= policy.min_agreement_pairs and s.kappa is not None and s.kappa < policy.min_agreement:
            s.flags.append(f"agreement (Cohen's kappa) {s.kappa:.2f} over {s.agreement_pairs} answer pairs is under "
                           f"{policy.min_agreement:g}")
    if counts:
        durations: dict[str, list[float]] = defaultdict(list)
        for rater, leased_at, answered_at in session.execute(
            select(TaskLease.rater_id, TaskLease.leased_at, TaskLease.answered_at).where(TaskLease.answered_at.is_not(None))
        ):
            durations[rater].append((answered_at - leased_at).total_seconds())
        for rater, seconds in durations.items():
            if rater in stats:
                stats[rater].median_seconds = statistics.median(seconds)
    return [stats[r] for r in sorted(stats)]


def full_cycle_agreement(session, cycle_id: int) -> dict:
    units = _overlap_units(_task_answers(session, cycle_id=cycle_id))
    return {"tasks": len(units), "raters": len({r for u in units.values() for r in u}),
            "alpha": krippendorff_alpha([list(u.values()) for u in units.values()])}


def full_feedback_by_cycle(session, cycles: list[dict]) -> list[dict]:
    """``feedback_by_cycle`` before aggregates: the batches of each cycle's window and ``rater_agreement``."""
    rows = session.execute(select(FeedbackBatch.id, FeedbackBatch.created_at, FeedbackBatch.comparison_count)).all()
    out = []
    for c in cycles:
        end = c["finished_at"] or utcnow()
        inside = [(i, n) for i, created, n in rows if c["started_at"] <= created < end]
        out.append({"week": c["week"], "comparisons": sum(n for _, n in inside), "batches": len(inside),
                    **rater_agreement(session, [i for i, _ in inside])})
    return out


def assert_same_stats(session, policy: QCPolicy = POLICY) -> list[RaterStats]:
    """``rater_stats`` (kept + live) against the full computation: equal, but for kept medians (within BOUND).
    Returns the full computation's raters."""
    for counts in (False, True):
        full = full_rater_stats(session, policy, counts=counts)
        assert_matches(rater_stats(session, policy, counts=counts), full)
    return full


def assert_matches(got: list[RaterStats], full: list[RaterStats]) -> None:
    got_by, full_by = {s.rater_id: s for s in got}, {s.rater_id: s for s in full}
    assert set(got_by) == set(full_by)
    for rater, want in full_by.items():
        have = got_by[rater]
        assert (have.answered, have.gold_answered, have.gold_correct, have.agreement_pairs, have.flags,
                have.decision) == (want.answered, want.gold_answered, want.gold_correct, want.agreement_pairs,
                                   want.flags, want.decision), rater
        assert have.kappa == want.kappa, rater  # the same float: the same integer sums
        if want.median_seconds is None:
            assert have.median_seconds is None
        else:
            assert have.median_seconds == pytest.approx(want.median_seconds, rel=BOUND + 1e-9), rater


# -- building a store through the store's own functions ------------------------------------------------


def texts(i: int) -> dict:
    return {"prompt": f"Human: question {i}?\n\nAssistant:", "response_a": f" answer {i} (kind)",
            "response_b": f" answer {i} (curt)"}


def truth(task: ComparisonTask) -> str:
    return task.expected_choice if task.kind == "gold" else CHOICES[task.id % 3]


def choose(rater: str, task: ComparisonTask, rng: random.Random) -> str:
    right = RATERS[rater]
    if right is None and task.kind == "gold":
        return rng.choice([c for c in CHOICES if c != task.expected_choice])
    if right is None or rng.random() > right:
        return rng.choice(CHOICES)
    return truth(task)


class StoreBuilder:
    """Cycles with train, overlap and gold tasks, answered by ``RATERS`` through leases, closed (or not)."""

    def __init__(self, db, seed: int = 7):
        self.db, self.rng, self.next_task = db, random.Random(seed), 0
        with db.session() as s:
            register_gold(s, items=[{"prompt": f"gold {i}", "response_a": f"good {i}", "response_b": f"bad {i}",
                                     "choice": CHOICES[i % 3]} for i in range(40)])

    def cycle(self, week: str, *, tasks: int = 14, status: str | None = "succeeded", answer_all: bool = True) -> int:
        """A cycle of ``week`` whose tasks (a third of them overlap tasks) the raters answer; finished with
        ``status`` and closed (``close_cycle``), or left running (None)."""
        with self.db.session() as s:
            cycle, _ = open_cycle(s, week=week)
            cycle_id = cycle.id
            specs = []
            for _ in range(tasks):
                self.next_task += 1
                specs.append({**texts(self.next_task), "answers_needed": self.rng.choice([1, 1, 2, 3])})
            create_tasks(s, tasks=specs, cycle_id=cycle_id)
        self.answer(cycle_id, limit=6 if answer_all else 2)
        if status is not None:
            self.finish(cycle_id, status)
        return cycle_id

    def answer(self, cycle_id: int | None, *, limit: int, raters=tuple(RATERS)) -> None:
        """Each rater leases up to ``limit`` tasks (about half of them gold) and answers them, taking 2 s to 10 min
        each."""
        for rater in raters:
            with self.db.session() as s:
                page = lease_tasks(s, rater_id=rater, limit=limit, lease=timedelta(minutes=30), cycle_id=cycle_id,
                                   gold_share=0.5, rng=self.rng)
                answers = [NewComparison(prompt=p.task.prompt, response_a=p.task.response_a,
                                         response_b=p.task.response_b, choice=choose(rater, p.task, self.rng),
                                         rater_id=rater, task_id=p.task.id) for p in page]
                if not answers:
                    continue
                create_feedback_batch(s, source=f"vendor-{rater}", comparisons=answers)
                for lease in s.scalars(select(TaskLease).where(
                        TaskLease.rater_id == rater, TaskLease.task_id.in_([p.task.id for p in page]))):
                    lease.leased_at = lease.answered_at - timedelta(seconds=self.rng.uniform(2, 600))

    def finish(self, cycle_id: int, status: str) -> None:
        with self.db.session() as s:
            finish_cycle(s, cycle_id=cycle_id, status=status)
            close_cycle(s, cycle_id=cycle_id)


@pytest.fixture
def store(pg_db) -> StoreBuilder:
    """Three closed cycles (two succeeded, one cancelled after half its answers), a vetoed rater, comparisons of
    no task and tasks of no cycle, and a running cycle with some answers."""
    b = StoreBuilder(pg_db)
    b.cycle("2026-W01")
    b.cycle("2026-W02")
    b.cycle("2026-W03", status="cancelled", answer_all=False)
    with pg_db.session() as s:
        decide(s, rater_id="vetoed", decision="exclude", reason="known spammer", actor="op")
        batch(s, n=4)  # comparisons that answer no task (rater r1)
        create_tasks(s, tasks=[{**texts(900 + i), "answers_needed": 2} for i in range(4)])  # of no cycle
    b.answer(None, limit=3, raters=("careful-1", "noisy", "random"))
    b.cycle("2026-W04", status=None, answer_all=False)
    return b


# -- the numbers -------------------------------------------------------------------------------------


def test_rater_stats_from_aggregates_equal_the_full_computation(pg_db, store):
    with pg_db.session() as s:
        cover = coverage(s)
        assert len(cover.held) == 3 and len(cover.live) == 1  # three closed cycles kept, the running one live
        full = assert_same_stats(s)
        by_rater = {r.rater_id: r for r in full}
    # the case is a real one: gold flags the random rater, so the others' kappa is against the trusted only,
    # and the vetoed rater's partners do not count it either
    assert by_rater["random"].flags and "gold accuracy" in by_rater["random"].flags[0]
    assert by_rater["vetoed"].decision == "exclude"
    assert by_rater["r1"].answered == 4 and by_rater["r1"].kappa is None
    assert all(by_rater[r].agreement_pairs > 0 for r in RATERS)
    with pg_db.session() as s:
        kept = {r.rater_id for r in s.scalars(select(RaterTotal))}
        assert kept >= set(RATERS) and "r1" not in kept  # comparisons of no task are always live


def test_trusted_kappa_is_exact_whichever_list_is_asked_for(pg_db, store):
    # with every rater but one vetoed, the trusted list is the shorter one: the other branch of pairs_with
    with pg_db.session() as s:
        for rater in ("careful-2", "careful-3", "noisy", "random"):
            decide(s, rater_id=rater, decision="exclude", reason="test", actor="op")
    with pg_db.session() as s:
        assert_same_stats(s)
    with pg_db.session() as s:  # and an operator including the flagged rater again trusts it
        decide(s, rater_id="random", decision="include", reason="test", actor="op")
        assert_same_stats(s, QCPolicy(min_gold_answers=1, min_agreement_pairs=1, min_agreement=0.9))


def test_closing_a_cycle_twice_replaces_its_numbers(pg_db, store):
    with pg_db.session() as s:
        before = totals(s)
        first = s.scalar(select(Cycle.id).order_by(Cycle.id).limit(1))
    for _ in range(2):
        with pg_db.session() as s:
            close_cycle(s, cycle_id=first)
    with pg_db.session() as s:
        assert totals(s) == before
        assert totals(s) == summed_cycle_rows(s)
        assert_same_stats(s)


def totals(session) -> tuple:
    raters = sorted((t.rater_id, t.answered, t.gold_answered, t.gold_correct, t.timed, tuple(t.seconds),
                     t.a_a, t.a_b, t.b_tie, t.tie_tie) for t in session.scalars(select(RaterTotal)))
    pairs = sorted((p.rater_id, p.other_rater_id, p.a_a, p.b_b, p.tie_a) for p in session.scalars(select(RaterPairTotal)))
    return raters, pairs


def summed_cycle_rows(session) -> tuple:
    """The totals as they should be: the kept rows of the cycles counted in them, summed."""
    counted = [c for c, in session.execute(select(CycleAggregate.cycle_id).where(CycleAggregate.in_totals))]
    sums: dict[str, list] = {}
    for r in session.scalars(select(CycleRaterAggregate).where(CycleRaterAggregate.cycle_id.in_(counted))):
        row = sums.setdefault(r.rater_id, [0, 0, 0, 0, Counter(), 0, 0, 0, 0])
        for i, v in enumerate((r.answered, r.gold_answered, r.gold_correct, r.timed)):
            row[i] += v
        row[4].update(sparse(r.seconds))
    pair_sums: dict[tuple, list] = {}
    for p in session.scalars(select(CycleRaterPair).where(CycleRaterPair.cycle_id.in_(counted))):
        row = sums[p.rater_id]
        for i, v in enumerate((p.a_a, p.a_b, p.b_tie, p.tie_tie)):
            row[5 + i] += v
        pair = pair_sums.setdefault((p.rater_id, p.other_rater_id), [0, 0, 0])
        for i, v in enumerate((p.a_a, p.b_b, p.tie_a)):
            pair[i] += v
    raters = sorted((r, *v[:4], tuple(dense(v[4])), *v[5:]) for r, v in sums.items())
    return raters, sorted((r, o, *v) for (r, o), v in pair_sums.items())


def test_a_rerun_cycle_is_computed_live_until_it_closes_again(pg_db, store):
    with pg_db.session() as s:
        cancelled = s.scalar(select(Cycle.id).where(Cycle.status == "cancelled"))
        rerun_cycle(s, cycle_id=cancelled, params={}, settings=None, changed=[], rerun=["gather"], actor="op")
    with pg_db.session() as s:
        cover = coverage(s)
        assert cancelled in cover.stale and cancelled in cover.live  # counted in the totals, taken out when read
        assert_same_stats(s)
        claim_cycle(s, cycle_id=cancelled, flow_run_id=None)
    store.answer(cancelled, limit=4)  # its reopened tasks get more answers while it runs again
    with pg_db.session() as s:
        assert_same_stats(s)
    store.finish(cancelled, "succeeded")
    with pg_db.session() as s:
        assert cancelled in coverage(s).held and not coverage(s).stale
        assert totals(s) == summed_cycle_rows(s)
        assert_same_stats(s)


def test_a_failed_cycle_with_open_tasks_stays_live(pg_db, store):
    failed = store.cycle("2026-W05", status=None, answer_all=False)
    with pg_db.session() as s:  # a lease taken while the cycle runs ...
        held = lease_tasks(s, rater_id="careful-2", limit=3, lease=timedelta(minutes=30), cycle_id=failed)
        assert held
    store.finish(failed, "failed")
    with pg_db.session() as s:
        kept = s.get(CycleAggregate, failed)
        assert kept.open_tasks > 0 and not kept.in_totals
        assert failed in coverage(s).live
    with pg_db.session() as s:  # ... is answered after it failed: its open tasks still take answers
        create_feedback_batch(s, source="late", comparisons=[
            NewComparison(prompt=p.task.prompt, response_a=p.task.response_a, response_b=p.task.response_b,
                          choice="a", rater_id="careful-2", task_id=p.task.id) for p in held])
    with pg_db.session() as s:
        assert failed in coverage(s).live
        assert_same_stats(s)
        assert cycle_agreement(s, cycle_id=failed) == full_cycle_agreement(s, failed)


def test_a_cycle_closing_while_rater_stats_reads_is_read_again(pg_db, store, monkeypatch):
    import store.aggregates as aggregates

    with pg_db.session() as s:
        running = s.scalar(select(Cycle.id).where(Cycle.status == "running"))
    real, reads, inside = aggregates.coverage, [], []

    def closing_meanwhile(session, cycle_ids=None):
        cover = real(session, cycle_ids)
        if inside:  # the close's own read
            return cover
        reads.append(cover)
        if len(reads) == 1:  # another transaction closes the running cycle after rater_stats' first read
            inside.append(True)
            store.finish(running, "succeeded")
            inside.clear()
        return cover

    monkeypatch.setattr(aggregates, "coverage", closing_meanwhile)
    with pg_db.session() as s:
        got = rater_stats(s, POLICY)
    # the first read found the cycle live, and its totals counted it too: read again
    assert running in reads[0].live and running in reads[1].held and len(reads) == 2
    with pg_db.session() as s:
        assert_matches(got, full_rater_stats(s, POLICY))


def test_a_running_cycle_cannot_be_closed(pg_db, store):
    with pg_db.session() as s:
        running = s.scalar(select(Cycle.id).where(Cycle.status == "running"))
        with pytest.raises(Conflict, match="running"):
            close_cycle(s, cycle_id=running)


def test_cycles_closed_before_the_aggregates_are_computed_live_then_backfilled(pg_db, store):
    with pg_db.session() as s:
        for table in (RaterPairTotal, RaterTotal, CycleRaterPair, CycleRaterAggregate, CycleAggregate):
            s.execute(delete(table))
    with pg_db.session() as s:
        assert not coverage(s).held
        assert_same_stats(s)
        week_rows = recent_cycles(s, limit=10)
        assert feedback_by_cycle(s, week_rows) == full_feedback_by_cycle(s, week_rows)
        assert len(backfill(s)) == 3
    with pg_db.session() as s:
        assert len(coverage(s).held) == 3 and backfill(s) == []
        assert totals(s) == summed_cycle_rows(s)
        assert_same_stats(s)


def test_cycle_agreement_and_feedback_from_aggregates_equal_live_values(pg_db, store):
    with pg_db.session() as s:
        cycles = recent_cycles(s, limit=10)
        held = coverage(s).held
        assert len(held) == 3
        for c in cycles:
            assert cycle_agreement(s, cycle_id=c["cycle_id"]) == full_cycle_agreement(s, c["cycle_id"])
        kept = feedback_by_cycle(s, cycles)
        assert kept == full_feedback_by_cycle(s, cycles)
        assert sum(row["rater_pairs"] for row in kept) > 0
        # the kept rows are what was read: change one and the page shows it
        s.execute(update(CycleAggregate).where(CycleAggregate.cycle_id == min(held)).values(alpha=0.125, batches=-1))
        assert cycle_agreement(s, cycle_id=min(held))["alpha"] == 0.125
        assert feedback_by_cycle(s, cycles)[0]["batches"] == -1


# -- window agreement and the histogram --------------------------------------------------------------------


def test_window_agreement_counted_in_the_database_is_rater_agreement(db):
    rng = random.Random(3)
    start = utcnow()
    with db.session() as s:
        ids = []
        for k in range(6):
            comparisons = []
            for i in range(12):
                j = rng.randrange(5)  # five pairs, shown either way round, some with equal responses
                a, b = (f"x{j}", f"y{j}") if j != 4 else ("same", "same")
                if rng.random() < 0.5:
                    a, b = b, a
                choice = "tie" if a == b else rng.choice(CHOICES)
                comparisons.append(NewComparison(prompt=f"p{j % 3}", response_a=a, response_b=b, choice=choice,
                                                 rater_id=f"r{k}"))
            row, _ = create_feedback_batch(s, source="t", comparisons=comparisons)
            ids.append(row.id)
    with db.session() as s:
        got = window_numbers(s, start=start, end=utcnow() + timedelta(seconds=1))
        assert got == {"comparisons": 72, "batches": 6, **rater_agreement(s, ids)}
        assert got["rater_pairs"] > 0 and 0 < got["agreement"] < 1
        empty = window_numbers(s, start=start - timedelta(days=2), end=start - timedelta(days=1))
        assert empty == {"comparisons": 0, "batches": 0, **rater_agreement(s, [])}


def test_kappa_of_counts_is_kappa_of_the_pairs():
    rng = random.Random(5)
    for _ in range(200):
        pairs = [(rng.choice(CHOICES), rng.choice(CHOICES)) for _ in range(rng.randrange(1, 30))]
        counts = defaultdict(int)
        for p in pairs:
            counts[p] += 1
        assert cohen_kappa_of_counts(counts) == cohen_kappa(pairs)
    assert cohen_kappa_of_counts({}) is None and cohen_kappa_of_counts({("a", "a"): 3}) is None


def test_histogram_buckets_and_median_by_hand():
    # bucket k holds [0.001 * 1.02**k, 0.001 * 1.02**(k+1)): 1 s is 1000x the floor, log(1000)/log(1.02) = 348.8
    assert seconds_bucket(1.0) == 348 and seconds_bucket(0.0) == -1 and seconds_bucket(0.001) == 0
    assert 0.001 * 1.02**348 <= 1.0 < 0.001 * 1.02**349
    assert bucket_seconds(348) == pytest.approx(0.001 * 1.02**348.5)
    # kept as [first bucket, counts...]: 1 s and 1.03 s are buckets 348 and 350
    kept = dense(histogram_of([1.0, 1.03, 1.03]))
    assert kept == [348, 1, 0, 2] and sparse(kept) == {348: 1, 350: 2} and dense({}) == [] and sparse([]) == {}
    assert histogram_median(kept) == pytest.approx(bucket_seconds(350))
    # four times: the median is the mean of the 2nd and 3rd, each read as its bucket's middle; kept and extra
    # times merge, in either part
    times = [1.0, 10.0, 20.0, 300.0]
    assert histogram_median([], histogram_of(times)) == pytest.approx(15.0, rel=BOUND)
    assert histogram_median(dense(histogram_of(times[:1])), histogram_of(times[1:])) == pytest.approx(15.0, rel=BOUND)
    assert histogram_median(dense(histogram_of(times[2:])), histogram_of(times[:2])) == pytest.approx(15.0, rel=BOUND)
    assert histogram_median([]) is None and histogram_median([], {}) is None


def test_histogram_median_is_within_the_bound():
    rng = random.Random(11)
    worst = 0.0
    for _ in range(300):
        times = [rng.lognormvariate(3.5, 1.0) for _ in range(rng.randrange(1, 400))]
        cut = rng.randrange(len(times) + 1)
        exact = statistics.median(times)
        read = histogram_median(dense(histogram_of(times[:cut])), histogram_of(times[cut:]))
        worst = max(worst, abs(read / exact - 1))
    assert worst <= BOUND + 1e-12
    assert BOUND < 0.01


def test_closing_cycles_on_either_backend(db):
    b = StoreBuilder(db)
    first = b.cycle("2026-W01")
    b.cycle("2026-W02", status="cancelled", answer_all=False)
    b.cycle("2026-W03", status=None)
    with db.session() as s:
        assert len(coverage(s).held) == 2
        assert_same_stats(s)
        close_cycle(s, cycle_id=first)
    with db.session() as s:
        assert totals(s) == summed_cycle_rows(s)
        assert_same_stats(s)
