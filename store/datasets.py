"""Datasets: prompt sets, sample sets and content-addressed comparison snapshots."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from store.artifacts import ArtifactRef, ArtifactStore, register_artifact
from store.errors import InvalidInput, NotFound
from store.feedback import agreement_of, comparisons_of
from store.models import DATASET_KINDS, Dataset, FeedbackBatch, dataset_batches
from store.versioning import create_version, get_named_version, get_row, list_rows


def create_dataset(
    session: Session,
    *,
    name: str,
    kind: str,
    content_sha256: str,
    row_count: int,
    artifact: ArtifactRef | None = None,
    source_dataset_id: int | None = None,
    cycle_id: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> tuple[Dataset, bool]:
    """A new version of dataset ``name``, or the existing one with the same content.

    Returns (dataset, created). Content is addressed by ``content_sha256``:
    registering the same content under the same name again returns the
    version that already holds it.
    """
    if kind not in DATASET_KINDS:
        raise InvalidInput(f"dataset kind {kind!r} is not one of {', '.join(DATASET_KINDS)}")
    existing = session.scalar(select(Dataset).where(Dataset.name == name, Dataset.content_sha256 == content_sha256))
    if existing is not None:
        return existing, False
    artifact_row = register_artifact(session, artifact) if artifact is not None else None
    dataset = create_version(
        session,
        Dataset,
        name=name,
        kind=kind,
        content_sha256=content_sha256,
        row_count=row_count,
        artifact_id=artifact_row.id if artifact_row else None,
        source_dataset_id=source_dataset_id,
        cycle_id=cycle_id,
        meta=metadata or {},
    )
    return dataset, True


def snapshot_sha256(batches: Sequence[FeedbackBatch]) -> str:
    """The content address of a set of batches: order-free, content-based."""
    digest = hashlib.sha256()
    for sha in sorted(b.content_sha256 for b in batches):
        digest.update(sha.encode() + b"\n")
    return digest.hexdigest()


def snapshot_comparisons(
    session: Session,
    *,
    artifacts: ArtifactStore,
    name: str = "comparisons",
    batch_ids: Sequence[int] | None = None,
    cycle_id: int | None = None,
) -> tuple[Dataset, bool]:
    """Snapshot feedback batches (all of them by default) into a comparisons dataset.

    The snapshot is content-addressed: the same set of batches gives the same
    sha256 and the same version, not a new one. Its artifact is a JSONL file
    (one comparison a line, batch and position order) at a content-addressed
    key, so a crash between writing the file and committing the row is
    repaired by simply running the snapshot again.
    """
    query = select(FeedbackBatch).order_by(FeedbackBatch.id)
    if batch_ids is not None:
        query = query.where(FeedbackBatch.id.in_(list(batch_ids)))
    batches = list(session.scalars(query))
    if batch_ids is not None and len(batches) != len(set(batch_ids)):
        missing = sorted(set(batch_ids) - {b.id for b in batches})
        raise NotFound(f"feedback batches {missing} do not exist")
    if not batches:
        raise InvalidInput("there are no feedback batches to snapshot")
    sha = snapshot_sha256(batches)
    existing = session.scalar(select(Dataset).where(Dataset.name == name, Dataset.content_sha256 == sha))
    if existing is not None:
        return existing, False
    lines = []
    comparisons = comparisons_of(session, [b.id for b in batches])
    for comp in comparisons:
        record = {
            "batch_id": comp.batch_id,
            "prompt": comp.prompt,
            "response_a": comp.response_a,
            "response_b": comp.response_b,
            "choice": comp.choice,
            "rater_id": comp.rater_id,
        }
        if comp.task_id is not None:
            record["task_id"] = comp.task_id
        if comp.meta:
            record["metadata"] = comp.meta
        lines.append(json.dumps(record, ensure_ascii=False))
    ref = artifacts.put_bytes(f"datasets/{name}/{sha}.jsonl", ("\n".join(lines) + "\n").encode())
    dataset, created = create_dataset(
        session,
        name=name,
        kind="comparisons",
        content_sha256=sha,
        row_count=len(lines),
        artifact=ref,
        cycle_id=cycle_id,
        # A snapshot never changes, so its rater agreement is computed once, here.
        metadata={"batch_count": len(batches), "agreement": agreement_of(comparisons)},
    )
    if created:
        session.execute(insert(dataset_batches), [{"dataset_id": dataset.id, "batch_id": b.id} for b in batches])
    return dataset, created


def get_dataset(session: Session, dataset_id: int) -> Dataset:
    """The dataset ``dataset_id``."""
    return get_row(session, Dataset, dataset_id, label="dataset")


def get_dataset_version(session: Session, *, name: str, version: int | None = None) -> Dataset:
    """Dataset ``name`` at ``version`` (the newest when None)."""
    return get_named_version(session, Dataset, name=name, version=version, label="dataset")


def list_datasets(
    session: Session, *, kind: str | None = None, limit: int = 50, after_id: int | None = None
) -> list[Dataset]:
    """Datasets in id order (keyset paging), optionally of one kind."""
    return list_rows(session, Dataset, limit=limit, after_id=after_id, kind=kind)
