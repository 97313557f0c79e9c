"""Feedback batches and their comparisons: registered whole or not at all."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from store.errors import Conflict, InvalidInput
from store.models import CHOICES, Comparison, ComparisonTask, FeedbackBatch, utcnow
from store.versioning import get_row, list_rows

COMPARISON_FIELDS = ("prompt", "response_a", "response_b", "choice", "rater_id", "task_id", "metadata")


@dataclass(frozen=True)
class NewComparison:
    """One comparison to register (already validated for shape by the caller)."""

    prompt: str
    response_a: str
    response_b: str
    choice: str
    rater_id: str
    task_id: int | None = None
    metadata: dict[str, Any] | None = None

    def canonical(self) -> dict[str, Any]:
        """The fields that define the comparison's content, for hashing and export."""
        return {
            "prompt": self.prompt,
            "response_a": self.response_a,
            "response_b": self.response_b,
            "choice": self.choice,
            "rater_id": self.rater_id,
            "task_id": self.task_id,
            "metadata": self.metadata,
        }


def content_sha256(comparisons: Sequence[NewComparison]) -> str:
    """The sha256 of a batch's comparisons in order (canonical JSON lines)."""
    digest = hashlib.sha256()
    for comp in comparisons:
        digest.update(json.dumps(comp.canonical(), sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def check_comparisons(comparisons: Sequence[NewComparison], *, max_errors: int = 100) -> None:
    """Raise ``InvalidInput`` naming each bad record by index and field.

    The store's own rules (the API checks shapes and sizes before this):
    a non-empty prompt, a known choice, a rater id, and identical responses
    only with a tie. An empty response is valid: saying nothing is sometimes
    the preferred, harmless reply.
    """
    problems: list[dict] = []

    def bad(index: int, field: str, msg: str) -> None:
        if len(problems) < max_errors:
            problems.append({"index": index, "field": field, "message": msg})

    if not comparisons:
        raise InvalidInput("a feedback batch needs at least one comparison", [])
    for i, comp in enumerate(comparisons):
        if not comp.prompt.strip():
            bad(i, "prompt", "prompt is empty")
        if comp.choice not in CHOICES:
            bad(i, "choice", f"choice {comp.choice!r} is not one of {', '.join(CHOICES)}")
        elif comp.response_a == comp.response_b and comp.choice != "tie":
            bad(i, "choice", f"response_a and response_b are identical, so choice must be 'tie', not {comp.choice!r}")
        if not comp.rater_id.strip():
            bad(i, "rater_id", "rater_id is empty")
    if problems:
        raise InvalidInput(f"{len(problems)} invalid comparison field(s)", problems)


def create_feedback_batch(
    session: Session,
    *,
    source: str,
    comparisons: Sequence[NewComparison],
    idempotency_key: str | None = None,
    request_sha256: str | None = None,
    api_key_id: int | None = None,
    cycle_id: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> tuple[FeedbackBatch, bool]:
    """Register a batch in the caller's transaction; returns (batch, created).

    A replay with the same idempotency key and request hash returns the first
    batch with ``created=False``; the same key with another request raises
    ``Conflict``. Task ids must name existing tasks; their tasks become done.
    """
    if idempotency_key is not None:
        first = session.scalar(select(FeedbackBatch).where(FeedbackBatch.idempotency_key == idempotency_key))
        if first is not None:
            if request_sha256 is not None and first.request_sha256 != request_sha256:
                raise Conflict(f"idempotency key {idempotency_key!r} was used for a different request")
            return first, False
    check_comparisons(comparisons)
    task_ids = {c.task_id for c in comparisons if c.task_id is not None}
    if task_ids:
        known = set(session.scalars(select(ComparisonTask.id).where(ComparisonTask.id.in_(task_ids))))
        unknown = [
            {"index": i, "field": "task_id", "message": f"comparison task {c.task_id} does not exist"}
            for i, c in enumerate(comparisons)
            if c.task_id is not None and c.task_id not in known
        ]
        if unknown:
            raise InvalidInput(f"{len(unknown)} comparison(s) name unknown tasks", unknown[:100])
    batch = FeedbackBatch(
        source=source,
        idempotency_key=idempotency_key,
        request_sha256=request_sha256,
        content_sha256=content_sha256(comparisons),
        comparison_count=len(comparisons),
        api_key_id=api_key_id,
        cycle_id=cycle_id,
        meta=metadata or {},
    )
    session.add(batch)
    session.flush()
    session.execute(
        insert(Comparison),
        [
            {
                "batch_id": batch.id,
                "position": i,
                "prompt": c.prompt,
                "response_a": c.response_a,
                "response_b": c.response_b,
                "choice": c.choice,
                "rater_id": c.rater_id,
                "task_id": c.task_id,
                "meta": c.metadata,
            }
            for i, c in enumerate(comparisons)
        ],
    )
    if task_ids:
        session.execute(
            update(ComparisonTask)
            .where(ComparisonTask.id.in_(task_ids), ComparisonTask.status == "open")
            .values(status="done", done_at=utcnow(), leased_by=None, leased_until=None)
        )
    return batch, True


def get_feedback_batch(session: Session, batch_id: int) -> FeedbackBatch:
    """The batch ``batch_id``."""
    return get_row(session, FeedbackBatch, batch_id, label="feedback batch")


def list_feedback_batches(session: Session, *, limit: int = 50, after_id: int | None = None) -> list[FeedbackBatch]:
    """Batches in id order, ``limit`` at a time after ``after_id`` (keyset paging)."""
    return list_rows(session, FeedbackBatch, limit=limit, after_id=after_id)


def comparisons_of(session: Session, batch_ids: Sequence[int]) -> list[Comparison]:
    """The comparisons of these batches, in (batch, position) order."""
    return list(
        session.scalars(
            select(Comparison)
            .where(Comparison.batch_id.in_(list(batch_ids)))
            .order_by(Comparison.batch_id, Comparison.position)
        )
    )


def count_comparisons(session: Session, *, since: datetime | None = None, cycle_id: int | None = None) -> int:
    """How many comparisons were registered (optionally since a time or for a cycle)."""
    query = select(func.coalesce(func.sum(FeedbackBatch.comparison_count), 0))
    if since is not None:
        query = query.where(FeedbackBatch.created_at >= since)
    if cycle_id is not None:
        query = query.where(FeedbackBatch.cycle_id == cycle_id)
    return int(session.scalar(query))


def rater_agreement(session: Session, batch_ids: Sequence[int]) -> dict[str, float | int | None]:
    """Agreement among raters who judged the same (prompt, response pair).

    A pair counts when two or more raters judged it; responses are compared
    regardless of order (a pair shown as b/a is the same pair). Agreement is
    the fraction of rater pairs on the same pair that gave the same verdict.
    """
    groups: dict[tuple[str, str, str], list[str]] = {}
    for comp in comparisons_of(session, batch_ids):
        lo, hi = sorted((comp.response_a, comp.response_b))
        verdict = comp.choice
        if comp.response_a != lo and verdict != "tie":
            verdict = "a" if verdict == "b" else "b"
        groups.setdefault((comp.prompt, lo, hi), []).append(verdict)
    agree = total = shared = 0
    for verdicts in groups.values():
        if len(verdicts) < 2:
            continue
        shared += 1
        for i in range(len(verdicts)):
            for j in range(i + 1, len(verdicts)):
                total += 1
                agree += verdicts[i] == verdicts[j]
    return {"pairs_with_multiple_raters": shared, "rater_pairs": total, "agreement": agree / total if total else None}
