"""A summary of what the store holds, for ``ratchet status`` and the health check."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.deployments import active_deployment
from store.models import (
    ApiKey,
    Artifact,
    Comparison,
    ComparisonTask,
    Cycle,
    Dataset,
    Deployment,
    FeedbackBatch,
    Policy,
    PreferenceModel,
)

COUNTED = {
    "datasets": Dataset,
    "feedback_batches": FeedbackBatch,
    "comparisons": Comparison,
    "comparison_tasks": ComparisonTask,
    "preference_models": PreferenceModel,
    "policies": Policy,
    "deployments": Deployment,
    "cycles": Cycle,
    "artifacts": Artifact,
    "api_keys": ApiKey,
}


def store_counts(session: Session) -> dict[str, Any]:
    """Row counts per entity and the active deployment."""
    counts = {name: session.scalar(select(func.count()).select_from(model)) for name, model in COUNTED.items()}
    active = active_deployment(session)
    counts["active_deployment"] = (
        None
        if active is None
        else {"version": active.version, "policy_id": active.policy_id, "action": active.action}
    )
    return counts
