"""The deploy gate: a candidate policy replaces the deployed one only if people prefer it, with
confidence, and the PMs and the KL raise no objection.

The first judge is people: the human A/B evaluation (``human_eval`` stage)
shows labelers the candidate's and the deployed policy's responses to
held-out prompts, blinded, and the lower confidence bound of the candidate's
win rate (ties count half) must be above 0.5 + ``human_margin``. Two PMs
trained on the same few hundred comparisons share blind spots, and the
policy optimiser finds them; people do not share them.

Then the PMs: each must be clearly better than chance on its held-out
comparisons (the lower bound of its accuracy above ``min_pm_accuracy``): a
verdict from a PM that is not is no evidence either way. The candidate must
beat the deployed policy under the test PM, and the two PMs must agree:
reward hacking shows up as the train PM's verdict improving while the test
PM's does not (Bai et al. 2022, the robustness experiments). Last, the KL to
the reference must stay within budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from store.intervals import wilson_lower_bound


@dataclass(frozen=True)
class GateConfig:
    """Thresholds of the deploy gate."""

    human_margin: float = 0.0
    """the lower bound of the candidate's human win rate must be above 0.5 + human_margin"""
    confidence: float = 0.9
    """level of the one-sided lower bounds (human win rate, PM held-out accuracy)"""
    interval: Literal["wilson", "bootstrap"] = "bootstrap"
    """how the human win rate's lower bound is computed"""
    min_pm_accuracy: float = 0.5
    """each PM's held-out accuracy must have its lower bound above this"""
    win_margin: float = 0.02
    """the candidate must win at least 0.5 + win_margin of comparisons under the test PM"""
    kl_budget: float = 1.0
    """largest mean KL(candidate || reference) per response, in nats"""
    max_pm_gap: float = 0.2
    """largest allowed train-PM win rate minus test-PM win rate"""

    def __post_init__(self) -> None:
        if not 0 <= self.win_margin < 0.5 or not 0 <= self.human_margin < 0.5:
            raise ValueError(f"win_margin ({self.win_margin}) and human_margin ({self.human_margin}) must be in [0, 0.5)")
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"confidence ({self.confidence}) must be in (0.5, 1)")
        if self.interval not in ("wilson", "bootstrap"):
            raise ValueError(f"interval ({self.interval!r}) must be wilson or bootstrap")
        if not 0 <= self.min_pm_accuracy < 1:
            raise ValueError(f"min_pm_accuracy ({self.min_pm_accuracy}) must be in [0, 1)")
        if self.kl_budget < 0:
            raise ValueError(f"kl_budget ({self.kl_budget}) must be >= 0")
        if self.max_pm_gap < 0:
            raise ValueError(f"max_pm_gap ({self.max_pm_gap}) must be >= 0")


@dataclass(frozen=True)
class HumanVerdict:
    """What labelers said in the blinded A/B evaluation, as the candidate sees it."""

    wins: int
    """answers preferring the candidate"""
    ties: int
    """answers calling it even"""
    losses: int
    """answers preferring the deployed policy"""
    required: int
    """answers the gate needs (human_eval.min_comparisons)"""
    tasks: int | None = None
    """eval tasks there were to answer"""
    outcome: str = "deadline"
    """how the wait ended: enough, answered (every task answered) or deadline"""

    @property
    def answers(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float | None:
        """(wins + ties / 2) / answers; None without answers."""
        return (self.wins + 0.5 * self.ties) / self.answers if self.answers else None


@dataclass(frozen=True)
class PMEvidence:
    """A PM's held-out accuracy and how many decisive comparisons it was measured on."""

    accuracy: float | None
    decisive: int


@dataclass(frozen=True)
class GateInput:
    """What the evaluate step (and the human evaluation, and the PMs' held-out split) measured."""

    win_rate_test_pm: float
    """fraction of held-out prompts where the test PM prefers the candidate (ties half)"""
    win_rate_train_pm: float
    """the same under the train PM"""
    kl: float
    """mean KL(candidate || reference) per response"""
    test_pm_delta: float
    """mean test-PM score of the candidate minus that of the deployed policy"""
    train_pm_delta: float
    """mean train-PM score of the candidate minus that of the deployed policy"""
    human: HumanVerdict | None = None
    """the labelers' verdict (None: the human evaluation is switched off)"""
    train_pm: PMEvidence | None = None
    """the train PM's held-out accuracy (None: not checked)"""
    test_pm: PMEvidence | None = None
    """the test PM's held-out accuracy (None: not checked)"""


@dataclass(frozen=True)
class GateDecision:
    deploy: bool
    reasons: list[str] = field(default_factory=list)
    """why not (empty when deploying)"""
    checks: dict[str, bool] = field(default_factory=dict)
    measures: dict[str, float | int | str | None] = field(default_factory=dict)
    """the numbers behind the checks: the human win rate and its bound, the PMs' accuracy bounds"""

    def as_dict(self) -> dict:
        return asdict(self)


# -- lower confidence bounds ---------------------------------------------------------------


def bootstrap_lower_bound(outcomes: list[float], level: float, *, resamples: int = 4000, seed: int = 0) -> float | None:
    """The ``1 - level`` quantile of the mean of ``outcomes`` over seeded bootstrap resamples (None when empty)."""
    if not outcomes:
        return None
    values = np.asarray(outcomes, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    return float(np.quantile(values[draws].mean(axis=1), 1 - level))


def human_lower_bound(human: HumanVerdict, config: GateConfig) -> float | None:
    """The lower bound of the candidate's human win rate, by the gate's interval and confidence."""
    if config.interval == "wilson":
        return wilson_lower_bound(human.wins + 0.5 * human.ties, human.answers, config.confidence)
    outcomes = [1.0] * human.wins + [0.5] * human.ties + [0.0] * human.losses
    return bootstrap_lower_bound(outcomes, config.confidence)


# -- the decision --------------------------------------------------------------------------


def decide(measured: GateInput, config: GateConfig) -> GateDecision:
    """Deploy or reject, with every failed check named and its numbers."""
    reasons: list[str] = []
    checks: dict[str, bool] = {}
    measures: dict[str, float | int | str | None] = {"confidence": config.confidence}

    # 1. People: enough answers, and the lower bound of the candidate's win rate above the bar.
    if measured.human is None:
        measures["human_eval"] = "off"
    else:
        human = measured.human
        bound = human_lower_bound(human, config)
        bar = 0.5 + config.human_margin
        measures.update({"human_eval": "on", "human_answers": human.answers, "human_wins": human.wins,
                         "human_ties": human.ties, "human_losses": human.losses, "human_win_rate": human.win_rate,
                         "human_lower_bound": bound, "human_bar": bar, "interval": config.interval})
        enough = human.answers >= human.required
        checks["enough_human_answers"] = enough
        checks["people_prefer_candidate"] = enough and bound is not None and bound > bar
        if not enough:
            when = f"(all {human.tasks} eval tasks are answered)" if human.outcome == "answered" else "by the deadline"
            reasons.append(f"only {human.answers} of the {human.required} human answers the gate needs arrived {when}")
        elif not checks["people_prefer_candidate"]:
            reasons.append(
                f"human win rate {human.win_rate:.3f} ({human.wins} wins, {human.ties} ties, {human.losses} losses): "
                f"its {config.confidence:.0%} lower bound {bound:.3f} ({config.interval}) is not above {bar:.3f}"
            )

    # 2. The PMs are evidence only if each is clearly better than chance on its held-out comparisons.
    for role, evidence in (("train", measured.train_pm), ("test", measured.test_pm)):
        if evidence is None:
            continue
        bound = (
            wilson_lower_bound(evidence.accuracy * evidence.decisive, evidence.decisive, config.confidence)
            if evidence.accuracy is not None else None
        )
        measures[f"{role}_pm_accuracy"] = evidence.accuracy
        measures[f"{role}_pm_accuracy_lower_bound"] = bound
        ok = bound is not None and bound > config.min_pm_accuracy
        checks[f"{role}_pm_is_evidence"] = ok
        if not ok:
            shown = "none" if evidence.accuracy is None else f"{evidence.accuracy:.3f}"
            reasons.append(
                f"the {role} PM is no evidence: held-out accuracy {shown} on {evidence.decisive} decisive "
                f"comparisons, lower bound {'-' if bound is None else f'{bound:.3f}'} is not above "
                f"{config.min_pm_accuracy:.3f}"
            )

    # 3. The PMs' verdicts and the KL budget.
    needed = 0.5 + config.win_margin
    checks["beats_deployed_under_test_pm"] = measured.win_rate_test_pm >= needed
    checks["within_kl_budget"] = measured.kl <= config.kl_budget
    checks["pms_agree"] = (
        measured.win_rate_train_pm - measured.win_rate_test_pm <= config.max_pm_gap
        and not (measured.train_pm_delta > 0 and measured.test_pm_delta < 0)
    )
    if not checks["beats_deployed_under_test_pm"]:
        reasons.append(f"test-PM win rate {measured.win_rate_test_pm:.3f} is below the required {needed:.3f}")
    if not checks["within_kl_budget"]:
        reasons.append(f"KL to the reference {measured.kl:.4f} is over the budget {config.kl_budget:.4f}")
    if not checks["pms_agree"]:
        reasons.append(
            "train and test PMs disagree (possible reward hacking): win rate "
            f"{measured.win_rate_train_pm:.3f} (train) vs {measured.win_rate_test_pm:.3f} (test), "
            f"score change {measured.train_pm_delta:+.4f} (train) vs {measured.test_pm_delta:+.4f} (test)"
        )
    return GateDecision(deploy=not reasons, reasons=reasons, checks=checks, measures=measures)
