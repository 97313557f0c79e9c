"""Simulated raters: each fetches comparison tasks and posts feedback batches through the REST API.

A rater behaves as an outside labeling tool would (httpx, its own labeler
API key, ``GET /v1/comparison-tasks?limit=N&rater_id=...`` then ``POST
/v1/feedback-batches`` with an ``Idempotency-Key``, so a retried POST
registers once: the protocol of ``orchestrator.ai_labeler``). It answers
every task it is handed alike: training, eval, overlap and gold tasks look
the same to it. How it judges is its profile (``RaterProfile``):

- ``gold`` (a careful or a noisy rater): with probability ``noise`` a
  judgement is a coin flip between A and B; otherwise the response with the
  higher gold score wins, and equal scores are a tie. With noise 0.35, 65%
  of the judgements follow gold and the other 35% land on the gold side
  half the time: about 82.5% agreement with gold on pairs that have a winner.
- ``random`` (a bad rater): A, B or tie uniformly at random on every task,
  so a third of its answers to gold tasks are right.

Every answer carries a strength (the default scale: 1 slightly, 2 better,
3 much better; 0 for a tie). A judgement that follows gold takes it from
the gold score gap (scores in [-1, 1], in steps of 0.5): a gap of 1.5 or
more (the right response against the wrong one, or a helpful answer off the
topic against a refusal) is 3, a gap of 0.75 or more (1.0: half of it
right, e.g. a refusal that also complies against plain compliance) is 2,
a smaller gap (0.5: on the topic against off it) is 1. A coin flip and a
random rater's choice of A or B take a strength uniformly from 1, 2 and 3:
the strength of a careless judgement says nothing either.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import httpx

from orchestrator.ai_labeler import answer_of, idempotency_key, lease_tasks, post_batch

log = logging.getLogger(__name__)

Gold = Callable[[str, str], float]

Kind = Literal["gold", "random"]

STRENGTH_BY_GAP = ((1.5, 3.0), (0.75, 2.0), (0.0, 1.0))
"""(smallest gold score gap, strength) from the largest gap down: a gap above 0 is at least "slightly" better"""

STRENGTHS = (1.0, 2.0, 3.0)
"""the strengths a careless judgement of A or B draws from"""


@dataclass(frozen=True)
class RaterProfile:
    """Who a simulated rater is and how it judges."""

    rater_id: str
    """the rater's id, and the name of its API key"""
    kind: Kind = "gold"
    """``gold``: by the gold preference with ``noise`` coin flips; ``random``: a, b or tie at random"""
    noise: float = 0.1
    """share of a ``gold`` rater's judgements that are coin flips between A and B"""


CAREFUL = RaterProfile("sim-careful", "gold", 0.1)
"""the demo's careful rater: gold preference, 10% coin flips"""
NOISY = RaterProfile("sim-noisy", "gold", 0.35)
"""a noisier rater quality control keeps: 35% coin flips (about 82.5% agreement with gold where gold has a winner)"""
RANDOM = RaterProfile("sim-random", "random")
"""a bad rater quality control must flag: a third of its gold answers right, no agreement beyond chance"""

DEMO_RATERS: dict[str, tuple[RaterProfile, ...]] = {"all": (CAREFUL, NOISY, RANDOM), "one": (CAREFUL,)}
"""the raters of ``ratchet demo --raters all|one``"""


class Judgement(NamedTuple):
    """One answer to a task."""

    choice: str
    """``a``, ``b`` or ``tie``"""
    strength: float
    """0 for a tie, else 1 (slightly) to 3 (much better), for the chosen response"""


def strength_of(gap: float) -> float:
    """The strength of a judgement that follows gold, from the absolute gold score gap (0 for no gap: a tie)."""
    if gap <= 0:
        return 0.0
    return next(strength for least, strength in STRENGTH_BY_GAP if gap >= least)


@dataclass
class LabelerStats:
    """What a labeler has done."""

    batches: int = 0
    comparisons: int = 0
    ties: int = 0
    random_choices: int = 0
    """judgements that ignored gold (a noisy rater's coin flips; every judgement of a random rater)"""
    errors: list[str] = field(default_factory=list)


class SimulatedLabeler:
    """One rater labeling comparison tasks through the REST API, by its profile."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        gold: Gold,
        kind: Kind = "gold",
        noise: float = 0.1,
        rater_id: str = "sim-labeler-1",
        source: str = "simulated-labeler",
        batch_size: int = 200,
        seed: int = 0,
        timeout_s: float = 30.0,
        client: httpx.Client | None = None,
    ):
        if kind not in ("gold", "random"):
            raise ValueError(f"kind ({kind!r}) must be 'gold' or 'random'")
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise ({noise}) must be in [0, 1]")
        if batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) must be at least 1")
        self.client = client or httpx.Client(base_url=base_url, timeout=timeout_s)
        self.client.headers["Authorization"] = f"Bearer {token}"
        self.gold = gold
        self.kind = kind
        self.noise = noise
        self.rater_id = rater_id
        self.source = source
        self.batch_size = batch_size
        self.rng = random.Random(f"{rater_id}:{seed}")
        self.stats = LabelerStats()
        self.excluded: str | None = None
        """why the server hands this rater no tasks (quality control left it out), while it does"""

    @classmethod
    def of(cls, profile: RaterProfile, base_url: str, token: str, **kwargs) -> SimulatedLabeler:
        """A labeler judging as ``profile`` says, under its rater id."""
        return cls(base_url, token, kind=profile.kind, noise=profile.noise, rater_id=profile.rater_id, **kwargs)

    def judge(self, prompt: str, response_a: str, response_b: str) -> Judgement:
        """The rater's answer to one pair."""
        if self.kind == "random":
            self.stats.random_choices += 1
            choice = self.rng.choice(("a", "b", "tie"))
            return Judgement(choice, 0.0 if choice == "tie" else self.rng.choice(STRENGTHS))
        if self.rng.random() < self.noise:
            self.stats.random_choices += 1
            return Judgement(self.rng.choice(("a", "b")), self.rng.choice(STRENGTHS))
        score_a, score_b = self.gold(prompt, response_a), self.gold(prompt, response_b)
        if score_a == score_b:
            return Judgement("tie", 0.0)
        return Judgement("a" if score_a > score_b else "b", strength_of(abs(score_a - score_b)))

    def label_once(self) -> int:
        """Lease up to ``batch_size`` tasks, judge them, post one batch; returns how many were labeled."""
        leased = lease_tasks(self.client, rater_id=self.rater_id, limit=self.batch_size)
        if leased.excluded is not None:
            if self.excluded is None:
                log.info("labeler %s: %s", self.rater_id, leased.excluded)
            self.excluded = leased.excluded
            return 0
        self.excluded = None
        tasks = leased.tasks
        if not tasks:
            return 0
        comparisons = []
        for t in tasks:
            judgement = self.judge(t["prompt"], t["response_a"], t["response_b"])
            self.stats.ties += judgement.choice == "tie"
            comparisons.append(
                answer_of(t, rater_id=self.rater_id, choice=judgement.choice, strength=judgement.strength)
            )
        post_batch(self.client, source=self.source, comparisons=comparisons, metadata={"labeler": self.rater_id},
                   key=idempotency_key(self.rater_id, tasks))
        self.stats.batches += 1
        self.stats.comparisons += len(comparisons)
        return len(comparisons)

    def run(self, stop: threading.Event, *, poll_interval_s: float = 0.5, max_interval_s: float = 2.0) -> LabelerStats:
        """Label until ``stop`` is set; errors are logged and retried after a pause.

        With no task to answer the pause doubles, up to ``max_interval_s``, and
        is ``poll_interval_s`` again once tasks come: an idle labeler costs
        the server little while a cycle trains.
        """
        pause = poll_interval_s
        while not stop.is_set():
            try:
                if self.label_once():
                    pause = poll_interval_s
                    continue
            except httpx.HTTPError as exc:
                self.stats.errors.append(str(exc))
                log.warning("labeler %s: %s", self.rater_id, exc)
            stop.wait(pause)
            pause = min(pause * 2, max_interval_s)
        return self.stats

    def close(self) -> None:
        self.client.close()
