"""The AI labeler: a PM or an LM judge (``workers.judge``) answering comparison tasks through the REST API.

It is a rater like any other (RLAIF: Bai et al. 2022b; Lee et al. 2023):
it leases tasks under its own rater id (``GET
/v1/comparison-tasks?limit=N&rater_id=...``), judges them, and posts one
feedback batch per lease (``POST /v1/feedback-batches`` with an
``Idempotency-Key``, so a retried POST registers once). Quality control
treats it as it treats people: gold tasks, overlap tasks answered by it
and by others (its Cohen's kappa against the trusted raters, ``GET
/v1/raters``), flags, and a 403 when it is left out.

Its batches say they are AI feedback: the batch ``source`` is
``ai:<judge kind>:<judge name>`` (``ai:pm:pm-v3``, ``ai:lm:qwen2.5-7b``;
the convention is that a source starting with ``ai:`` is an AI labeler's,
and snapshots count them apart, ``store.datasets.snapshot_comparisons``),
and the batch metadata is ``{"labeler": "ai", "judge": <the judge's
settings>, "principles_sha256": <its constitution's sha256, None for a
PM>}``. Each comparison carries the rater id, the task id, the choice, the
strength and, in its metadata, the judge's P(A is better) (``p_a``).

The lease-and-post protocol (``lease_tasks``, ``answer_of``,
``idempotency_key``, ``post_batch``) is the one every labeling client of
Ratchet speaks; the demo's simulated raters use it too.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote

import httpx

from store.datasets import AI_SOURCE_PREFIX

if TYPE_CHECKING:
    from workers.judge import Judge

log = logging.getLogger(__name__)

MAX_LEASE = 500
"""the most tasks one ``GET /v1/comparison-tasks`` hands out"""


@dataclass
class AILabelerStats:
    """What an AI labeler has done."""

    batches: int = 0
    comparisons: int = 0
    choices: Counter = field(default_factory=Counter)
    """answers by choice (a, b, tie)"""
    excluded: str | None = None
    """why the server hands this rater no tasks (quality control left it out), while it does"""
    errors: list[str] = field(default_factory=list)
    """HTTP errors a polling labeler logged and outlived"""

    def as_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "comparisons": self.comparisons,
                "choices": {c: self.choices[c] for c in ("a", "b", "tie")}, "excluded": self.excluded,
                "errors": len(self.errors)}


class RaterAgreement(NamedTuple):
    """A rater's quality-control numbers (``GET /v1/raters/{rater_id}``)."""

    rater_id: str
    answered: int
    agreement_pairs: int
    """pairs of its answer with another rater's answer to the same overlap task"""
    kappa: float | None
    """Cohen's kappa against the trusted raters on those tasks (None: no pair)"""
    gold_answered: int
    gold_accuracy: float | None
    flagged: bool
    excluded: bool


class AILabeler:
    """A judge answering comparison tasks through the REST API under one rater id."""

    def __init__(
        self,
        base_url: str,
        token: str,
        judge: Judge,
        *,
        rater_id: str,
        source: str | None = None,
        batch_size: int = 32,
        timeout_s: float = 60.0,
        client: httpx.Client | None = None,
    ):
        source = source or f"{AI_SOURCE_PREFIX}{judge.kind}:{judge.name}"
        if not source.startswith(AI_SOURCE_PREFIX):
            raise ValueError(
                f"source ({source!r}) must start with {AI_SOURCE_PREFIX!r}: that is how AI feedback is told apart"
            )
        if not 1 <= batch_size <= MAX_LEASE:
            raise ValueError(f"batch_size ({batch_size}) must be from 1 to {MAX_LEASE}")
        self.client = client or httpx.Client(base_url=base_url, timeout=timeout_s)
        self.client.headers["Authorization"] = f"Bearer {token}"
        self.judge = judge
        self.rater_id = rater_id
        self.source = source
        self.batch_size = batch_size
        self.metadata = {"labeler": "ai", "judge": judge.describe(), "principles_sha256": judge.principles_sha256}
        self.stats = AILabelerStats()

    def label_once(self, limit: int | None = None) -> int:
        """Lease up to ``limit`` (default ``batch_size``) tasks, judge them, post one batch; how many were answered."""
        from workers.judge import Pair

        leased = lease_tasks(self.client, rater_id=self.rater_id, limit=min(limit or self.batch_size, self.batch_size))
        if leased.excluded is not None:
            if self.stats.excluded is None:
                log.info("AI labeler %s: %s", self.rater_id, leased.excluded)
            self.stats.excluded = leased.excluded
            return 0
        self.stats.excluded = None
        tasks = leased.tasks
        if not tasks:
            return 0
        # The task id seeds an LM judge's principle draw: every judge with this seed draws the same one for it.
        verdicts = self.judge.judge_many(
            [Pair(t["prompt"], t["response_a"], t["response_b"], key=f"task:{t['id']}") for t in tasks]
        )
        comparisons = [
            answer_of(t, rater_id=self.rater_id, choice=v.choice, strength=v.strength,
                      metadata={"p_a": round(v.p_a, 6)})
            for t, v in zip(tasks, verdicts)
        ]
        post_batch(self.client, source=self.source, comparisons=comparisons, metadata=self.metadata,
                   key=idempotency_key(self.rater_id, tasks))
        self.stats.batches += 1
        self.stats.comparisons += len(comparisons)
        self.stats.choices.update(v.choice for v in verdicts)
        return len(comparisons)

    def run(
        self,
        *,
        max_tasks: int | None = None,
        poll_s: float | None = None,
        stop: threading.Event | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> AILabelerStats:
        """Label until no task is left (the default), ``max_tasks`` are answered, or ``stop`` is set.

        With ``poll_s`` an empty lease (or a 403) is not the end: the labeler
        asks again every ``poll_s`` seconds, and an HTTP error is logged and
        retried after the pause, until ``stop`` is set or ``max_tasks`` are
        answered. ``on_batch`` is called with each batch's size.
        """
        if max_tasks is not None and max_tasks < 1:
            raise ValueError(f"max_tasks ({max_tasks}) must be at least 1")
        if poll_s is not None and poll_s <= 0:
            raise ValueError(f"poll_s ({poll_s}) must be above 0")
        stop = stop or threading.Event()
        answered = 0
        while not stop.is_set() and (max_tasks is None or answered < max_tasks):
            remaining = None if max_tasks is None else max_tasks - answered
            try:
                n = self.label_once(remaining)
            except httpx.HTTPError as exc:
                if poll_s is None:
                    raise
                self.stats.errors.append(str(exc))
                log.warning("AI labeler %s: %s", self.rater_id, exc)
                n = 0
            answered += n
            if n and on_batch is not None:
                on_batch(n)
            if n:
                continue
            if poll_s is None:
                break
            stop.wait(poll_s)
        return self.stats

    def agreement(self, operator_token: str) -> RaterAgreement | None:
        """This rater's numbers from quality control, read with an operator key; None before its first answer."""
        response = self.client.get(f"/v1/raters/{quote(self.rater_id, safe='')}",
                                   headers={"Authorization": f"Bearer {operator_token}"})
        if response.status_code == 404:
            return None
        response.raise_for_status()
        row = response.json()
        return RaterAgreement(row["rater_id"], row["answered"], row["agreement_pairs"], row["kappa"],
                              row["gold_answered"], row["gold_accuracy"], row["flagged"], row["excluded"])

    def close(self) -> None:
        self.client.close()


# -- the labeling protocol -------------------------------------------------------------------


class Lease(NamedTuple):
    """What ``GET /v1/comparison-tasks`` handed a rater."""

    tasks: list[dict[str, Any]]
    """the tasks leased (empty: none is open for the rater)"""
    excluded: str | None
    """why quality control leaves the rater out (a 403), else None"""


def lease_tasks(client: httpx.Client, *, rater_id: str, limit: int) -> Lease:
    """Lease up to ``limit`` tasks for ``rater_id`` under the client's key."""
    response = client.get("/v1/comparison-tasks", params={"limit": limit, "rater_id": rater_id})
    if response.status_code == 403:
        # Quality control left this rater out: it is handed no tasks until an operator includes it.
        return Lease([], response.json().get("detail", "excluded"))
    response.raise_for_status()
    return Lease(response.json()["data"], None)


def answer_of(task: dict[str, Any], *, rater_id: str, choice: str, strength: float,
              metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """A comparison answering a leased task (its texts exactly as handed out)."""
    answer = {"prompt": task["prompt"], "response_a": task["response_a"], "response_b": task["response_b"],
              "choice": choice, "strength": strength, "rater_id": rater_id, "task_id": task["id"]}
    if metadata is not None:
        answer["metadata"] = metadata
    return answer


def idempotency_key(rater_id: str, tasks: Sequence[dict[str, Any]]) -> str:
    """The key of the batch answering these tasks: the same lease retried is the same batch."""
    return f"{rater_id}:" + hashlib.sha256(",".join(str(t["id"]) for t in tasks).encode()).hexdigest()[:32]


def post_batch(
    client: httpx.Client,
    *,
    source: str,
    comparisons: list[dict[str, Any]],
    metadata: dict[str, Any],
    key: str,
    attempts: int = 3,
) -> dict[str, Any]:
    """``POST /v1/feedback-batches`` under ``key``, retried on a transport error; the batch registered."""
    if attempts < 1:
        raise ValueError(f"attempts ({attempts}) must be at least 1")
    body = {"source": source, "comparisons": comparisons, "metadata": metadata}
    for attempt in range(1, attempts + 1):
        try:
            posted = client.post("/v1/feedback-batches", json=body, headers={"Idempotency-Key": key})
            posted.raise_for_status()
            return posted.json()
        except httpx.TransportError:  # the same key makes the retry land once
            if attempt == attempts:
                raise
            time.sleep(0.5 * attempt)
