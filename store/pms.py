"""Preference models: versions that name the dataset they were trained on."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from store.artifacts import ArtifactRef, register_artifact
from store.errors import InvalidInput
from store.models import PM_ROLES, PreferenceModel
from store.versioning import create_version, get_named_version, get_row, list_rows


def create_pm(
    session: Session,
    *,
    name: str,
    dataset_id: int,
    base_model: str,
    artifact: ArtifactRef | None,
    role: str = "train",
    init_pm_id: int | None = None,
    cycle_id: int | None = None,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> PreferenceModel:
    """Register a new version of PM ``name`` trained on ``dataset_id``."""
    if role not in PM_ROLES:
        raise InvalidInput(f"PM role {role!r} is not one of {', '.join(PM_ROLES)}")
    artifact_row = register_artifact(session, artifact) if artifact is not None else None
    return create_version(
        session,
        PreferenceModel,
        name=name,
        role=role,
        dataset_id=dataset_id,
        base_model=base_model,
        init_pm_id=init_pm_id,
        artifact_id=artifact_row.id if artifact_row else None,
        cycle_id=cycle_id,
        config=config or {},
        metrics=metrics or {},
    )


def get_pm(session: Session, pm_id: int) -> PreferenceModel:
    """The PM ``pm_id``."""
    return get_row(session, PreferenceModel, pm_id, label="preference model")


def get_pm_version(session: Session, *, name: str, version: int | None = None) -> PreferenceModel:
    """PM ``name`` at ``version`` (the newest when None)."""
    return get_named_version(session, PreferenceModel, name=name, version=version, label="preference model")


def list_pms(session: Session, *, limit: int = 50, after_id: int | None = None) -> list[PreferenceModel]:
    """PMs in id order (keyset paging)."""
    return list_rows(session, PreferenceModel, limit=limit, after_id=after_id)
