"""A simulated labeler: fetches comparison tasks and posts feedback batches through the REST API.

It behaves as an outside labeling tool would (httpx, a labeler API key,
``GET /v1/comparison-tasks`` then ``POST /v1/feedback-batches`` with an
``Idempotency-Key``, so a retried POST registers once), and judges each pair
by a gold preference with configurable noise:

- with probability ``noise`` a judgement is a coin flip (a careless rater);
- otherwise the response with the higher gold score wins, and equal scores
  are a tie.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

log = logging.getLogger(__name__)

Gold = Callable[[str, str], float]


@dataclass
class LabelerStats:
    """What a labeler has done."""

    batches: int = 0
    comparisons: int = 0
    ties: int = 0
    random_choices: int = 0
    errors: list[str] = field(default_factory=list)


class SimulatedLabeler:
    """Labels comparison tasks by a gold preference, through the REST API."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        gold: Gold,
        noise: float = 0.1,
        rater_id: str = "sim-labeler-1",
        source: str = "simulated-labeler",
        batch_size: int = 200,
        seed: int = 0,
        timeout_s: float = 30.0,
        client: httpx.Client | None = None,
    ):
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise ({noise}) must be in [0, 1]")
        self.client = client or httpx.Client(base_url=base_url, timeout=timeout_s)
        self.client.headers["Authorization"] = f"Bearer {token}"
        self.gold = gold
        self.noise = noise
        self.rater_id = rater_id
        self.source = source
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self.stats = LabelerStats()

    def judge(self, prompt: str, response_a: str, response_b: str) -> str:
        """``a``, ``b`` or ``tie``."""
        if self.rng.random() < self.noise:
            self.stats.random_choices += 1
            return self.rng.choice(("a", "b"))
        score_a, score_b = self.gold(prompt, response_a), self.gold(prompt, response_b)
        if score_a == score_b:
            return "tie"
        return "a" if score_a > score_b else "b"

    def label_once(self) -> int:
        """Lease up to ``batch_size`` tasks, judge them, post one batch; returns how many were labeled."""
        response = self.client.get("/v1/comparison-tasks", params={"limit": self.batch_size})
        response.raise_for_status()
        tasks = response.json()["data"]
        if not tasks:
            return 0
        comparisons = []
        for t in tasks:
            choice = self.judge(t["prompt"], t["response_a"], t["response_b"])
            self.stats.ties += choice == "tie"
            comparisons.append({
                "prompt": t["prompt"],
                "response_a": t["response_a"],
                "response_b": t["response_b"],
                "choice": choice,
                "rater_id": self.rater_id,
                "task_id": t["id"],
            })
        key = f"{self.rater_id}:" + hashlib.sha256(",".join(str(t["id"]) for t in tasks).encode()).hexdigest()[:32]
        body = {"source": self.source, "comparisons": comparisons, "metadata": {"labeler": self.rater_id}}
        for attempt in range(3):
            try:
                posted = self.client.post("/v1/feedback-batches", json=body, headers={"Idempotency-Key": key})
                posted.raise_for_status()
                break
            except httpx.TransportError:  # the same key makes the retry land once
                if attempt == 2:
                    raise
                time.sleep(0.5 * (attempt + 1))
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
