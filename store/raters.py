"""Quality control of raters: gold (honeypot) comparisons, overlap agreement, flags and exclusions.

* **Gold.** An operator registers comparisons with a known answer
  (``register_gold``). A share of the tasks each rater is handed are gold
  tasks made from them (``store.tasks``): once per rater, A and B in a random
  order. A rater's gold accuracy is the share of its gold answers equal to the
  known one (a tie counts only where the known answer is a tie).
* **Overlap.** A share of a cycle's tasks need two or more raters
  (``answers_needed``). Agreement is chance-corrected and counted over
  distinct raters only: per rater, Cohen's kappa between its answers and the
  trusted raters' answers to the same tasks (every pair of its answer with
  another's; trusted: not flagged by gold, not excluded by an operator); per cycle, Krippendorff's alpha (nominal: a, b, tie) over
  its tasks with two or more answers.
* **Flags.** A rater is flagged when enough evidence says it is poor: after
  ``min_gold_answers`` gold answers, the one-sided upper bound of its gold
  accuracy at ``gold_confidence`` (Wilson's score interval) under
  ``min_gold_accuracy``; or kappa under ``min_agreement`` after
  ``min_agreement_pairs`` pairs. The bound, not the share itself: a good
  rater's first answers are a short run. Looked at after each of its first
  60 gold answers (from the 8th), a rater right 82.5% of the time has a
  share under 0.6 at some point in 7.6% of runs, and a 95% upper bound under
  0.6 in 0.1% (simulated, 20,000 runs). A flagged rater is left out of comparison snapshots (all of its
  comparisons, recorded in the snapshot), unless an operator includes it;
  an operator may also exclude a rater outright (``decide``). Gold answers
  never train a PM: they are QC, known already.

A closed cycle's numbers are kept when it closes (``store.aggregates``); the
rest (running cycles, tasks of no cycle) are computed from the comparisons and
leases each time they are asked for.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import false, func, or_, select, update
from sqlalchemy.orm import Session

from store.actions import record_action
from store.errors import InvalidInput
from store.intervals import wilson_upper_bound
from store.models import (
    CHOICES,
    Comparison,
    ComparisonTask,
    Cycle,
    GoldComparison,
    RaterDecision,
    StageRun,
    utcnow,
)
from store.settings import read_cycle_config

if TYPE_CHECKING:
    from store.aggregates import RaterParts


class QCPolicy(BaseModel):
    """How raters are checked and when they are left out (a cycle's ``qc`` settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    gold_share: float = Field(default=0.1, ge=0, lt=1)
    """share of the tasks handed to each rater that are gold (known-answer) tasks, while registered gold lasts"""
    overlap_share: float = Field(default=0.1, ge=0, le=1)
    """share of a cycle's training tasks handed to ``overlap_raters`` distinct raters instead of one"""
    overlap_raters: int = Field(default=2, ge=2, le=10)
    """how many raters answer an overlap task"""
    min_gold_answers: int = Field(default=5, ge=1)
    """gold answers a rater needs before its gold accuracy can flag it"""
    min_gold_accuracy: float = Field(default=0.6, ge=0, le=1)
    """gold accuracy under which a rater is flagged, once the upper bound of its accuracy is under it"""
    gold_confidence: float = Field(default=0.95, gt=0.5, lt=1)
    """level of that one-sided upper bound (Wilson's score interval): a rater is flagged only when its gold
    accuracy is under ``min_gold_accuracy`` with this confidence, not on a short unlucky run"""
    min_agreement_pairs: int = Field(default=10, ge=1)
    """answer pairs with other raters (on overlap tasks) a rater needs before its agreement can flag it"""
    min_agreement: float = Field(default=0.2, ge=-1, le=1)
    """Cohen's kappa against the other raters under which a rater is flagged"""
    exclude_flagged: bool = True
    """leave flagged raters out of comparison snapshots (False: flag only; operators' exclusions still apply)"""


# -- gold -----------------------------------------------------------------------------------


def register_gold(session: Session, *, items: Sequence[dict], created_by: str = "") -> list[GoldComparison]:
    """Register gold comparisons (prompt, response_a, response_b, choice, optional metadata)."""
    problems = []
    for i, item in enumerate(items):
        if item["choice"] not in CHOICES:
            problems.append({"index": i, "field": "choice", "message": f"choice {item['choice']!r} is not one of a, b, tie"})
        elif item["response_a"] == item["response_b"] and item["choice"] != "tie":
            problems.append({"index": i, "field": "choice", "message": "identical responses need choice 'tie'"})
    if problems:
        raise InvalidInput(f"{len(problems)} invalid gold comparison field(s)", problems)
    rows = [
        GoldComparison(prompt=item["prompt"], response_a=item["response_a"], response_b=item["response_b"],
                       choice=item["choice"], meta=item.get("metadata") or {}, created_by=created_by)
        for item in items
    ]
    session.add_all(rows)
    session.flush()
    return rows


def gold_counts(session: Session) -> dict[str, int]:
    """How many gold comparisons are registered, active (handed out) and retired."""
    total, retired = session.execute(
        select(func.count(), func.count(GoldComparison.retired_at)).select_from(GoldComparison)
    ).one()
    return {"registered": int(total), "active": int(total - retired), "retired": int(retired)}


def retire_gold(session: Session, *, gold_ids: Sequence[int]) -> int:
    """Stop handing these gold comparisons out; returns how many were active."""
    result = session.execute(
        update(GoldComparison).where(GoldComparison.id.in_(list(gold_ids)), GoldComparison.retired_at.is_(None))
        .values(retired_at=utcnow())
    )
    return int(result.rowcount or 0)


# -- agreement ------------------------------------------------------------------------------


def cohen_kappa(pairs: Sequence[tuple[str, str]]) -> float | None:
    """Cohen's kappa of (this rater, other rater) label pairs: (p_o - p_e) / (1 - p_e), with p_e from the
    two sides' own marginals (Cohen 1960). None when there is no pair or chance agreement is certain."""
    if not pairs:
        return None
    n = len(pairs)
    p_o = sum(a == b for a, b in pairs) / n
    left, right = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    p_e = sum(left[c] * right[c] for c in left) / (n * n)
    if p_e >= 1:
        return None
    return (p_o - p_e) / (1 - p_e)


def krippendorff_alpha(units: Iterable[Sequence[str]]) -> float | None:
    """Krippendorff's alpha for nominal labels over units (each the labels distinct raters gave one task):
    1 - D_o / D_e from the coincidence matrix (Krippendorff 2011, "Computing Krippendorff's alpha").
    Units with fewer than two labels carry no information and are left out. None when nothing is pairable
    or every label is the same."""
    coincidence: Counter[tuple[str, str]] = Counter()
    for labels in units:
        m = len(labels)
        if m < 2:
            continue
        counts = Counter(labels)
        for c in counts:
            for k in counts:
                pairs = counts[c] * (counts[k] - (c == k))
                if pairs:
                    coincidence[c, k] += pairs / (m - 1)
    n = sum(coincidence.values())
    if n <= 1:
        return None
    marginal: Counter[str] = Counter()
    for (c, _), v in coincidence.items():
        marginal[c] += v
    observed = sum(v for (c, k), v in coincidence.items() if c != k)
    expected = sum(marginal[c] * marginal[k] for c in marginal for k in marginal if c != k) / (n - 1)
    if expected == 0:
        return None
    return 1 - observed / expected


# -- per-rater numbers ------------------------------------------------------------------------


@dataclass
class RaterStats:
    """One rater's numbers, flags and the operator's decision."""

    rater_id: str
    answered: int = 0
    """comparisons the rater gave (imports included), gold answers included"""
    gold_answered: int = 0
    gold_correct: int = 0
    agreement_pairs: int = 0
    """pairs of its answer with another rater's answer to the same task"""
    kappa: float | None = None
    median_seconds: float | None = None
    """median time from taking a task's lease to answering it"""
    flags: list[str] = field(default_factory=list)
    """why quality control flags the rater (empty: not flagged)"""
    decision: str | None = None
    """an operator's ``include`` or ``exclude``, if any"""
    decision_reason: str = ""

    @property
    def gold_accuracy(self) -> float | None:
        return self.gold_correct / self.gold_answered if self.gold_answered else None

    @property
    def flagged(self) -> bool:
        return bool(self.flags)

    def excluded(self, policy: QCPolicy) -> bool:
        """Whether the rater is left out of comparison snapshots."""
        if self.decision == "exclude":
            return True
        return self.flagged and policy.exclude_flagged and self.decision != "include"

    def exclusion_reason(self) -> str:
        if self.decision == "exclude":
            return f"excluded by an operator: {self.decision_reason}".rstrip(": ")
        return "; ".join(self.flags)


def _task_answers(session: Session, *, cycle_id: int | None = None, tasks=None):
    """The answers quality control reads: to gold tasks, and to tasks two or more raters answered; of one
    cycle's tasks, or of those ``tasks`` (a condition on ``ComparisonTask``) picks."""
    query = (
        select(Comparison.task_id, Comparison.rater_id, Comparison.choice, ComparisonTask.kind,
               ComparisonTask.expected_choice, ComparisonTask.cycle_id)
        .join(ComparisonTask, ComparisonTask.id == Comparison.task_id)
        .where(or_(ComparisonTask.kind == "gold", ComparisonTask.answers >= 2))
        .order_by(Comparison.id)
    )
    if cycle_id is not None:
        query = query.where(ComparisonTask.cycle_id == cycle_id)
    if tasks is not None:
        query = query.where(tasks)
    return session.execute(query).all()


def _overlap_units(rows) -> dict[int, dict[str, str]]:
    """task id -> {rater: its first answer}, for non-gold tasks answered by two or more distinct raters."""
    by_task: dict[int, dict[str, str]] = defaultdict(dict)
    for task_id, rater, choice, kind, _, _ in rows:
        if kind != "gold":
            by_task[task_id].setdefault(rater, choice)
    return {t: answers for t, answers in by_task.items() if len(answers) >= 2}


def gold_flag(correct: int, answered: int, policy: QCPolicy) -> str | None:
    """Why ``correct`` right of ``answered`` gold answers flag a rater, or None: after ``min_gold_answers``,
    when the upper bound of its accuracy at ``gold_confidence`` is under ``min_gold_accuracy``."""
    if answered < policy.min_gold_answers:
        return None
    upper = wilson_upper_bound(correct, answered, policy.gold_confidence)
    if upper >= policy.min_gold_accuracy:
        return None
    return (f"gold accuracy {correct / answered:.2f} over {answered} gold answers is under {policy.min_gold_accuracy:g} "
            f"(at most {upper:.2f} at {policy.gold_confidence:.0%} confidence)")


def rater_stats(
    session: Session, policy: QCPolicy, *, rater_ids: Sequence[str] | None = None, counts: bool = True
) -> list[RaterStats]:
    """Every rater that gave a comparison or has an operator's decision (or those of ``rater_ids``), with
    its numbers, flagged against ``policy``, by rater id.

    Gold is judged first. Agreement is then measured against the *trusted*
    raters: those gold does not flag and no operator excludes (against every
    other rater when none of a rater's overlap partners is trusted). Pooled
    over everyone, a fast random rater who answers most overlap tasks drags
    every honest rater's kappa to zero and gets them flagged with it.
    ``counts=False`` leaves ``answered`` and ``median_seconds`` out (and the
    raters known only by them): what deciding exclusions needs, cheaply.

    The numbers of closed cycles are read from the aggregates kept when they closed, the rest computed
    from the comparisons (``store.aggregates.rater_parts``): the same counts, flags and kappas as computing
    everything from the comparisons; the median seconds of a rater with kept times is read from a
    histogram (within 1%).
    """
    from store.aggregates import rater_parts  # store.aggregates builds on this module

    for _ in range(READS):
        parts = rater_parts(session, counts=counts)
        stats = _stats_of(session, parts, policy, counts=counts)
        if parts.unchanged():  # else a cycle closed while they were read: read them again
            break
    wanted = set(stats) if rater_ids is None else set(rater_ids) & set(stats)
    return [stats[r] for r in sorted(wanted)]


READS = 3
"""how many times ``rater_stats`` reads the numbers while cycles close under it (then it keeps the last)"""


def _stats_of(session: Session, parts: RaterParts, policy: QCPolicy, *, counts: bool) -> dict[str, RaterStats]:
    """``rater_stats``'s raters from ``store.aggregates.rater_parts``, by rater id."""
    stats: dict[str, RaterStats] = {}

    def of(rater: str) -> RaterStats:
        if rater not in stats:
            stats[rater] = RaterStats(rater)
        return stats[rater]

    if counts:
        for rater, n in parts.answered.items():
            of(rater).answered = int(n)
    # 1. Gold accuracy, one answer per (task, rater).
    for rater, n in parts.gold_answered.items():
        s = of(rater)
        s.gold_answered, s.gold_correct = int(n), int(parts.gold_correct[rater])
    for rater, row in _decisions(session).items():  # a rater decided on before it answered is listed too
        s = of(rater)
        s.decision, s.decision_reason = row.decision, row.reason
    for s in stats.values():
        if flag := gold_flag(s.gold_correct, s.gold_answered, policy):
            s.flags.append(flag)
    # 2. Agreement with the trusted raters on overlap tasks (distinct raters only).
    trusted = {r for r, s in stats.items() if not s.flags and s.decision != "exclude"}
    with_trusted = parts.pairs_with(trusted)
    for rater, everyone in parts.pairs.items():
        mine = with_trusted.get(rater) or everyone
        s = of(rater)
        s.agreement_pairs, s.kappa = sum(mine.values()), cohen_kappa_of_counts(mine)
        if s.agreement_pairs >= policy.min_agreement_pairs and s.kappa is not None and s.kappa < policy.min_agreement:
            s.flags.append(f"agreement (Cohen's kappa) {s.kappa:.2f} over {s.agreement_pairs} answer pairs is under "
                           f"{policy.min_agreement:g}")
    # 3. Seconds from lease to answer.
    if counts:
        for rater, median in parts.median_seconds(stats).items():
            stats[rater].median_seconds = median
    return stats


def cohen_kappa_of_counts(counts: Mapping[tuple[str, str], int]) -> float | None:
    """``cohen_kappa`` of the pairs these (this rater's label, the other's) -> count stand for: the same
    number, from the same integer sums."""
    n = sum(counts.values())
    if not n:
        return None
    p_o = sum(v for (a, b), v in counts.items() if a == b) / n
    left: Counter[str] = Counter()
    right: Counter[str] = Counter()
    for (a, b), v in counts.items():
        left[a] += v
        right[b] += v
    p_e = sum(left[c] * right[c] for c in left) / (n * n)
    if p_e >= 1:
        return None
    return (p_o - p_e) / (1 - p_e)


def _decisions(session: Session) -> dict[str, RaterDecision]:
    """rater -> its newest decision still in force."""
    out: dict[str, RaterDecision] = {}
    for row in session.scalars(
        select(RaterDecision).where(RaterDecision.cleared_at.is_(None)).order_by(RaterDecision.id)
    ):
        out[row.rater_id] = row
    return out


def cycle_agreement(session: Session, *, cycle_id: int) -> dict[str, float | int | None]:
    """A cycle's agreement: Krippendorff's alpha over its tasks answered by two or more distinct raters; as
    kept when it closed (``store.aggregates``), else computed from its answers."""
    return cycle_agreements(session, cycle_ids=[cycle_id])[cycle_id]


def cycle_agreements(session: Session, *, cycle_ids: Sequence[int]) -> dict[int, dict[str, float | int | None]]:
    """``cycle_agreement`` of each of ``cycle_ids``, the kept ones read at once."""
    from store.aggregates import held_aggregates, task_ranges  # store.aggregates builds on this module

    kept = held_aggregates(session, cycle_ids, tasks=True)
    out: dict[int, dict[str, float | int | None]] = {}
    for cycle_id in cycle_ids:
        if (row := kept.get(cycle_id)) is not None:
            out[cycle_id] = {"tasks": row.overlap_tasks, "raters": row.overlap_raters, "alpha": row.alpha}
            continue
        near = or_(*(Comparison.task_id.between(lo, hi) for lo, hi in task_ranges(session, [cycle_id])), false())
        units = _overlap_units(_task_answers(session, cycle_id=cycle_id, tasks=near))
        out[cycle_id] = {"tasks": len(units), "raters": len({r for u in units.values() for r in u}),
                         "alpha": krippendorff_alpha([list(u.values()) for u in units.values()])}
    return out


def excluded_raters(session: Session, policy: QCPolicy) -> dict[str, str]:
    """rater -> why it is left out of comparison snapshots now."""
    return {s.rater_id: s.exclusion_reason() for s in rater_stats(session, policy, counts=False) if s.excluded(policy)}


def decide(
    session: Session, *, rater_id: str, decision: str | None, reason: str = "", actor: str = "",
    api_key_id: int | None = None, via: str = "api",
) -> RaterDecision | None:
    """An operator's decision on a rater: ``include`` (over a flag), ``exclude``, or None to clear the one in force;
    recorded as an operator's action (``store.actions``) with the key that did it and the way it came (``via``)."""
    now = utcnow()
    was = session.scalar(
        select(RaterDecision.decision).where(RaterDecision.rater_id == rater_id, RaterDecision.cleared_at.is_(None))
        .order_by(RaterDecision.id.desc()).limit(1)
    )
    record_action(session, action="rater_decision", subject_kind="rater", subject_id=rater_id, actor=actor,
                  api_key_id=api_key_id, via=via, detail={"decision": decision, "reason": reason, "was": was})
    session.execute(
        update(RaterDecision).where(RaterDecision.rater_id == rater_id, RaterDecision.cleared_at.is_(None))
        .values(cleared_at=now)
    )
    if decision is None:
        return None
    row = RaterDecision(rater_id=rater_id, decision=decision, reason=reason, actor=actor, created_at=now)
    session.add(row)
    session.flush()
    return row


def current_policy(session: Session, default: QCPolicy) -> QCPolicy:
    """The QC policy in force: the running cycle's (else the newest cycle's) resolved ``qc`` settings, as its
    open stage recorded them; ``default`` when no cycle recorded any."""
    row = session.execute(
        select(StageRun.outputs)
        .join(Cycle, Cycle.id == StageRun.cycle_id)
        .where(StageRun.stage == "open", StageRun.status == "succeeded")
        .order_by((Cycle.status == "running").desc(), Cycle.id.desc())
        .limit(1)
    ).scalar()
    qc = ((row or {}).get("settings") or {}).get("qc")
    return QCPolicy.model_validate(qc) if qc else default


def default_policy(cycle_config: str | Path | None) -> QCPolicy:
    """The QC policy ``current_policy`` falls back on: the ``qc`` section of the server's cycle settings file
    (``RATCHET_CYCLE_CONFIG``), or the built-in policy when there is no file or the file has no ``qc``.

    Only that section is read and checked here: the API needs nothing else of the file, and the
    orchestrator checks the whole of it when it loads the cycle's defaults. ``InvalidInput`` names the file
    and each bad field (``qc.min_gold_accuracy``).
    """
    if cycle_config is None:
        return QCPolicy()
    qc = read_cycle_config(cycle_config).get("qc", {})
    try:
        return QCPolicy.model_validate(qc)
    except ValidationError as exc:
        problems = [{"field": ".".join(["qc", *(str(p) for p in err["loc"])]), "message": err["msg"]}
                    for err in exc.errors()]
        named = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise InvalidInput(f"cycle config {cycle_config} is invalid: {named}", problems) from None
