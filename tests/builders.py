"""Builders for store rows, so tests say what they need in one line."""

from __future__ import annotations

import itertools

from sqlalchemy.orm import Session

from store.artifacts import ArtifactRef, sha256_bytes
from store.feedback import NewComparison, create_feedback_batch
from store.models import FeedbackBatch, Policy, PreferenceModel
from store.pms import create_pm
from store.policies import create_policy

_counter = itertools.count()


def comparison(i: int = 0, *, choice: str = "a", rater: str = "r1", task_id: int | None = None) -> NewComparison:
    """A valid comparison whose texts depend on ``i``."""
    return NewComparison(
        prompt=f"Human: question {i}?\n\nAssistant:",
        response_a=f" answer {i} (kind)",
        response_b=f" answer {i} (curt)",
        choice=choice,
        rater_id=rater,
        task_id=task_id,
    )


def batch(session: Session, n: int = 3, *, start: int = 0, source: str = "test", **kw) -> FeedbackBatch:
    """A registered feedback batch of ``n`` comparisons."""
    row, created = create_feedback_batch(
        session, source=source, comparisons=[comparison(start + i) for i in range(n)], **kw
    )
    assert created
    return row


def fake_artifact(label: str = "") -> ArtifactRef:
    """An artifact ref with a unique URI (rows only; no bytes behind it)."""
    data = f"{label}-{next(_counter)}".encode()
    return ArtifactRef(uri=f"file:///nowhere/{data.decode()}", sha256=sha256_bytes(data), size_bytes=len(data))


def pm(session: Session, *, dataset_id: int, name: str = "pm", **kw) -> PreferenceModel:
    """A registered PM on ``dataset_id``."""
    return create_pm(session, name=name, dataset_id=dataset_id, base_model="tiny", artifact=fake_artifact("pm"), **kw)


def policy(session: Session, *, name: str = "policy", **kw) -> Policy:
    """A registered policy."""
    return create_policy(session, name=name, base_model="tiny", artifact=fake_artifact("policy"), **kw)
