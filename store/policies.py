"""Policies: versions that name their init policy, reference policy and PM."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from store.artifacts import ArtifactRef, register_artifact
from store.models import Policy
from store.versioning import create_version, get_named_version, get_row, list_rows


def create_policy(
    session: Session,
    *,
    name: str,
    base_model: str,
    artifact: ArtifactRef | None,
    init_policy_id: int | None = None,
    reference_policy_id: int | None = None,
    pm_id: int | None = None,
    cycle_id: int | None = None,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Policy:
    """Register a new version of policy ``name``.

    The initial policy (P0) has no init, reference or PM; a PPO-trained one
    names all three, which is what lineage walks.
    """
    artifact_row = register_artifact(session, artifact) if artifact is not None else None
    return create_version(
        session,
        Policy,
        name=name,
        base_model=base_model,
        init_policy_id=init_policy_id,
        reference_policy_id=reference_policy_id,
        pm_id=pm_id,
        artifact_id=artifact_row.id if artifact_row else None,
        cycle_id=cycle_id,
        config=config or {},
        metrics=metrics or {},
    )


def get_policy(session: Session, policy_id: int) -> Policy:
    """The policy ``policy_id``."""
    return get_row(session, Policy, policy_id, label="policy")


def get_policy_version(session: Session, *, name: str, version: int | None = None) -> Policy:
    """Policy ``name`` at ``version`` (the newest when None)."""
    return get_named_version(session, Policy, name=name, version=version, label="policy")


def list_policies(session: Session, *, limit: int = 50, after_id: int | None = None) -> list[Policy]:
    """Policies in id order (keyset paging)."""
    return list_rows(session, Policy, limit=limit, after_id=after_id)
