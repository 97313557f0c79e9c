"""Datasets: prompt sets, sample sets and content-addressed comparison snapshots."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from store.artifacts import ArtifactRef, ArtifactStore, register_artifact
from store.errors import InvalidInput, NotFound
from store.feedback import agreement_of, comparisons_of, prompt_messages
from store.models import DATASET_KINDS, Comparison, ComparisonTask, Cycle, Dataset, FeedbackBatch, dataset_batches
from store.tasks import chat_task_metadata
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


def snapshot_sha256(batches: Sequence[FeedbackBatch], excluded: dict[int, list[int]] | None = None) -> str:
    """The content address of a set of batches (less the ``excluded`` positions of some): order-free, content-based."""
    excluded = excluded or {}
    lines = []
    for b in batches:
        line = b.content_sha256
        if excluded.get(b.id):
            line += " -" + ",".join(str(p) for p in sorted(excluded[b.id]))
        lines.append(line)
    digest = hashlib.sha256()
    for line in sorted(lines):
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def excluded_eval_positions(
    session: Session, batch_ids: Sequence[int], *, include_eval: bool, cycle_id: int | None
) -> dict[int, list[int]]:
    """batch id -> positions of its comparisons that answer eval tasks and so stay out of a training snapshot.

    Answers to a cycle's own eval tasks never train that cycle's PMs; with
    ``include_eval`` those of other cycles may.
    """
    query = (
        select(Comparison.batch_id, Comparison.position)
        .join(ComparisonTask, ComparisonTask.id == Comparison.task_id)
        .where(Comparison.batch_id.in_(list(batch_ids)), ComparisonTask.kind == "eval")
    )
    if include_eval:
        if cycle_id is None:
            return {}
        query = query.where(ComparisonTask.cycle_id == cycle_id)
    return _by_batch(session.execute(query))


def _by_batch(rows) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for batch_id, position in rows:
        out.setdefault(batch_id, []).append(position)
    return out


def excluded_target_positions(
    session: Session, batch_ids: Sequence[int], *, targets: Sequence[str] | None
) -> dict[int, list[int]]:
    """batch id -> positions of its answers to tasks of cycles of deployment targets other than ``targets``.

    A target's snapshot takes the answers to its own cycles' tasks (and to those of the targets it takes feedback
    from: ``targets`` lists them all), and every comparison that answers no task or a task of no cycle (imports
    and direct posts belong to no target: every target takes them). None: every target's (one target alone).
    """
    if targets is None:
        return {}
    return _by_batch(session.execute(
        select(Comparison.batch_id, Comparison.position)
        .join(ComparisonTask, ComparisonTask.id == Comparison.task_id)
        .join(Cycle, Cycle.id == ComparisonTask.cycle_id)
        .where(Comparison.batch_id.in_(list(batch_ids)), Cycle.deploy_target.not_in(list(targets)))
    ))


def excluded_gold_positions(session: Session, batch_ids: Sequence[int]) -> dict[int, list[int]]:
    """batch id -> positions of its answers to gold tasks: quality control, never training data."""
    return _by_batch(session.execute(
        select(Comparison.batch_id, Comparison.position)
        .join(ComparisonTask, ComparisonTask.id == Comparison.task_id)
        .where(Comparison.batch_id.in_(list(batch_ids)), ComparisonTask.kind == "gold")
    ))


def excluded_rater_positions(session: Session, batch_ids: Sequence[int], raters: Sequence[str]) -> dict[int, list[int]]:
    """batch id -> positions of the comparisons given by ``raters``."""
    if not raters:
        return {}
    return _by_batch(session.execute(
        select(Comparison.batch_id, Comparison.position)
        .where(Comparison.batch_id.in_(list(batch_ids)), Comparison.rater_id.in_(list(raters)))
    ))


def _merge(*maps: dict[int, list[int]]) -> dict[int, list[int]]:
    out: dict[int, set[int]] = {}
    for m in maps:
        for batch_id, positions in m.items():
            out.setdefault(batch_id, set()).update(positions)
    return {b: sorted(p) for b, p in out.items()}


AI_SOURCE_PREFIX = "ai:"
"""how a feedback batch's source says it is AI feedback (``ai:<judge kind>:<name>``, ``orchestrator.ai_labeler``)"""


def snapshot_comparisons(
    session: Session,
    *,
    artifacts: ArtifactStore,
    name: str = "comparisons",
    batch_ids: Sequence[int] | None = None,
    cycle_id: int | None = None,
    include_eval: bool = False,
    excluded_raters: dict[str, str] | None = None,
    targets: Sequence[str] | None = None,
) -> tuple[Dataset, bool]:
    """Snapshot feedback batches (all of them by default) into a comparisons dataset for training PMs.

    ``targets`` (a cycle's deployment target and those it takes feedback from) leaves out the answers to the
    tasks of other targets' cycles (``excluded_target_positions``), counted in the metadata
    (``excluded_target_comparisons``); None takes every target's. While one target's cycles are all there are,
    nothing is left out that way, so the snapshot is the same (content and address) either way.

    Answers to eval tasks (the blinded human A/B evaluations of candidates)
    are left out: always those of ``cycle_id``'s own evaluation, and those of
    other cycles unless ``include_eval``. Answers to gold tasks are left out
    (quality control), and so is every comparison of the raters in
    ``excluded_raters`` (rater -> why; ``store.raters.excluded_raters``),
    each recorded with its reason and count in the snapshot's metadata (and
    so in its lineage). A batch left with nothing is not part of the
    snapshot; the positions left out of a batch are part of its address.

    Each record carries its batch's ``source``, and the metadata counts the
    records per source (``sources``) and those of AI labelers
    (``ai_comparisons``: sources starting ``ai:``), so a PM trained on the
    snapshot says how much of its data was AI feedback.

    A comparison of a chat prompt carries the prompt's ``messages`` (from its
    own metadata, else from its task's: ``store.feedback.prompt_messages``),
    so the PM and the policy steps encode it with the chat template; the
    metadata counts them (``chat_comparisons``). Messages that are no valid
    prompt are left out of the record (its plain-text prompt stays) and
    counted with the first reason (``invalid_messages``), never failing a
    snapshot over a rater's free-form metadata.

    The snapshot is content-addressed: the same set of comparisons gives the
    same sha256 and the same version, not a new one. Its artifact is a JSONL
    file (one comparison a line, batch and position order) at a
    content-addressed key, so a crash between writing the file and committing
    the row is repaired by simply running the snapshot again.
    """
    batches = _feedback_batches(session, batch_ids)
    ids = [b.id for b in batches]
    excluded_raters = excluded_raters or {}
    # 1. What stays out: eval and gold answers, answers to other targets' cycles, every answer of excluded raters.
    evals = excluded_eval_positions(session, ids, include_eval=include_eval, cycle_id=cycle_id)
    golds = excluded_gold_positions(session, ids)
    others = excluded_target_positions(session, ids, targets=targets)
    by_raters = excluded_rater_positions(session, ids, sorted(excluded_raters))
    excluded = _merge(evals, golds, others, by_raters)
    batches = [b for b in batches if len(excluded.get(b.id, ())) < b.comparison_count]
    if not batches:
        raise InvalidInput("there are no feedback batches to snapshot")
    # 2. The content address: the same comparisons are the version that already holds them.
    sha = snapshot_sha256(batches, excluded)
    existing = session.scalar(select(Dataset).where(Dataset.name == name, Dataset.content_sha256 == sha))
    if existing is not None:
        return existing, False
    # 3. The comparisons kept, as JSONL records, and what the metadata counts of them.
    comparisons = _kept_comparisons(session, batches, excluded)
    source_of = {b.id: b.source for b in batches}
    rater_counts = _excluded_rater_counts(session, ids, excluded_raters)
    lines, messages_meta = _jsonl_lines(session, batches, comparisons, source_of)
    # 4. The artifact, then the version and its batches.
    ref = artifacts.put_bytes(f"datasets/{name}/{sha}.jsonl", ("\n".join(lines) + "\n").encode())
    dataset, created = create_dataset(
        session,
        name=name,
        kind="comparisons",
        content_sha256=sha,
        row_count=len(lines),
        artifact=ref,
        cycle_id=cycle_id,
        metadata=_snapshot_metadata(
            batches, comparisons, source_of, evals=evals, golds=golds, excluded_raters=excluded_raters,
            rater_counts=rater_counts, messages_meta=messages_meta, others=others,
        ),
    )
    if created:
        session.execute(insert(dataset_batches), [{"dataset_id": dataset.id, "batch_id": b.id} for b in batches])
    return dataset, created


def _feedback_batches(session: Session, batch_ids: Sequence[int] | None) -> list[FeedbackBatch]:
    """The batches ``batch_ids`` (all of them when None) in id order; ``NotFound`` names any that do not exist."""
    query = select(FeedbackBatch).order_by(FeedbackBatch.id)
    if batch_ids is not None:
        query = query.where(FeedbackBatch.id.in_(list(batch_ids)))
    batches = list(session.scalars(query))
    if batch_ids is not None and len(batches) != len(set(batch_ids)):
        missing = sorted(set(batch_ids) - {b.id for b in batches})
        raise NotFound(f"feedback batches {missing} do not exist")
    return batches


def _kept_comparisons(
    session: Session, batches: Sequence[FeedbackBatch], excluded: dict[int, list[int]]
) -> list[Comparison]:
    """The comparisons of ``batches`` less the ``excluded`` positions, in batch and position order."""
    left_out = {b: set(p) for b, p in excluded.items()}
    everything = comparisons_of(session, [b.id for b in batches])
    return [comp for comp in everything if comp.position not in left_out.get(comp.batch_id, ())]


def _excluded_rater_counts(
    session: Session, batch_ids: Sequence[int], excluded_raters: dict[str, str]
) -> dict[str, int]:
    """rater -> comparisons in ``batch_ids``, for each of ``excluded_raters`` (0 for those with none)."""
    # Counted over every batch considered: a batch of one left-out rater's answers is not in the snapshot at all.
    rater_counts = {rater: 0 for rater in excluded_raters}
    rater_counts.update(session.execute(
        select(Comparison.rater_id, func.count())
        .where(Comparison.batch_id.in_(batch_ids), Comparison.rater_id.in_(sorted(excluded_raters)))
        .group_by(Comparison.rater_id)
    ).all())
    return rater_counts


def _jsonl_lines(
    session: Session, batches: Sequence[FeedbackBatch], comparisons: Sequence[Comparison], source_of: dict[int, str]
) -> tuple[list[str], dict[str, Any]]:
    """One JSON line a comparison, and the metadata that counts their chat messages (none when there are none)."""
    task_meta = chat_task_metadata(session, batch_ids=[b.id for b in batches])
    lines = []
    chat, invalid, first_invalid = 0, 0, None
    for comp in comparisons:
        messages, problem = prompt_messages(comp.meta, task_meta.get(comp.task_id))
        chat += messages is not None
        if problem is not None:
            invalid += 1
            first_invalid = first_invalid or problem
        lines.append(json.dumps(_record(comp, source_of[comp.batch_id], messages), ensure_ascii=False))
    messages_meta = {
        **({"chat_comparisons": chat} if chat else {}),
        **({"invalid_messages": {"comparisons": invalid, "first": first_invalid}} if invalid else {}),
    }
    return lines, messages_meta


def _record(comp: Comparison, source: str, messages: list[dict[str, str]] | None) -> dict[str, Any]:
    """A snapshot's record of ``comp``: its optional fields only when set."""
    record = {
        "batch_id": comp.batch_id,
        "prompt": comp.prompt,
        "response_a": comp.response_a,
        "response_b": comp.response_b,
        "choice": comp.choice,
        "rater_id": comp.rater_id,
        "source": source,
    }
    if comp.task_id is not None:
        record["task_id"] = comp.task_id
    if comp.meta:
        record["metadata"] = comp.meta
    if comp.strength is not None:
        record["strength"] = comp.strength
    if messages is not None:
        record["messages"] = messages
    return record


def _snapshot_metadata(
    batches: Sequence[FeedbackBatch],
    comparisons: Sequence[Comparison],
    source_of: dict[int, str],
    *,
    evals: dict[int, list[int]],
    golds: dict[int, list[int]],
    excluded_raters: dict[str, str],
    rater_counts: dict[str, int],
    messages_meta: dict[str, Any],
    others: dict[int, list[int]],
) -> dict[str, Any]:
    """A snapshot's metadata: its sources, rater agreement and what it left out (answers to other targets'
    cycles only when there were some, so a snapshot of one target's store reads as before)."""
    sources = Counter(source_of[comp.batch_id] for comp in comparisons)
    # counted once: an answer to another target's eval or gold task is counted as that
    other_targets = sum(len(set(p) - set(evals.get(b, ())) - set(golds.get(b, ()))) for b, p in others.items())
    # A snapshot never changes, so its rater agreement is computed once, here.
    return {
        "batch_count": len(batches),
        "sources": dict(sorted(sources.items())),
        "ai_comparisons": sum(n for source, n in sources.items() if source.startswith(AI_SOURCE_PREFIX)),
        "agreement": agreement_of(comparisons),
        "excluded_eval_comparisons": sum(len(v) for v in evals.values()),
        "excluded_gold_comparisons": sum(len(v) for v in golds.values()),
        "excluded_raters": [
            {"rater_id": rater, "reason": excluded_raters[rater], "comparisons": rater_counts[rater]}
            for rater in sorted(excluded_raters) if rater_counts[rater]
        ],
        **({"excluded_target_comparisons": other_targets} if other_targets else {}),
        **messages_meta,
    }


def get_dataset(session: Session, dataset_id: int) -> Dataset:
    """The dataset ``dataset_id``."""
    return get_row(session, Dataset, dataset_id, label="dataset")


def dataset_batch_ids(session: Session, *, dataset_id: int) -> list[int]:
    """The ids of the feedback batches in dataset ``dataset_id``, ascending."""
    return sorted(session.scalars(select(dataset_batches.c.batch_id).where(dataset_batches.c.dataset_id == dataset_id)))


def get_dataset_version(session: Session, *, name: str, version: int | None = None) -> Dataset:
    """Dataset ``name`` at ``version`` (the newest when None)."""
    return get_named_version(session, Dataset, name=name, version=version, label="dataset")


def list_datasets(
    session: Session, *, kind: str | None = None, limit: int = 50, after_id: int | None = None
) -> list[Dataset]:
    """Datasets in id order (keyset paging), optionally of one kind."""
    return list_rows(session, Dataset, limit=limit, after_id=after_id, kind=kind)
