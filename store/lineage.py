"""Lineage: walk a version back to everything it came from, or a feedback batch
forward to everything trained on it.

Back from a policy: its init policy (and theirs), its reference policy, the
PM it was trained against, that PM's dataset and warm-start PM, and the
feedback batches in the dataset. Forward from a batch: the snapshots that
contain it, PMs trained on those (or warm-started from such a PM), and
policies trained against those PMs (or initialised from such a policy); from
a dataset also the datasets made from it (a prompt set's samples). The
reference policy is not a forward edge: a KL anchor is not training data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.errors import NotFound
from store.models import Dataset, FeedbackBatch, Policy, PreferenceModel, dataset_batches

MODELS = {"policy": Policy, "pm": PreferenceModel, "dataset": Dataset, "feedback_batch": FeedbackBatch}


@dataclass(frozen=True)
class Node:
    """One version in a lineage graph."""

    kind: str
    id: int
    name: str | None
    version: int | None


@dataclass(frozen=True)
class Edge:
    """``child`` was made from ``parent`` in the way ``relation`` says."""

    child: tuple[str, int]
    parent: tuple[str, int]
    relation: str


@dataclass(frozen=True)
class Exclusion:
    """Comparisons a snapshot left out: every one of a rater's, and why (quality control or an operator)."""

    dataset_id: int
    rater_id: str
    reason: str
    comparisons: int


@dataclass
class Lineage:
    """The versions reached from ``root``, the edges between them, and the raters left out of the
    comparison snapshots reached (walking back)."""

    root: tuple[str, int]
    nodes: dict[tuple[str, int], Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    exclusions: list[Exclusion] = field(default_factory=list)

    def ids(self, kind: str) -> list[int]:
        """Ids of the reached nodes of ``kind``, sorted (the root included)."""
        return sorted(i for k, i in self.nodes if k == kind)


def _node(row) -> Node:
    kind = next(k for k, m in MODELS.items() if isinstance(row, m))
    return Node(kind, row.id, getattr(row, "name", None) or getattr(row, "source", None), getattr(row, "version", None))


def _parents(session: Session, kind: str, row) -> list[tuple[str, int, str]]:
    if kind == "policy":
        return [
            (k, i, rel)
            for k, i, rel in (
                ("policy", row.init_policy_id, "init"),
                ("policy", row.reference_policy_id, "reference"),
                ("pm", row.pm_id, "trained_against"),
            )
            if i is not None
        ]
    if kind == "pm":
        out = [("dataset", row.dataset_id, "trained_on")]
        if row.init_pm_id is not None:
            out.append(("pm", row.init_pm_id, "init"))
        return out
    if kind == "dataset":
        batch_ids = session.scalars(
            select(dataset_batches.c.batch_id).where(dataset_batches.c.dataset_id == row.id)
        )
        out = [("feedback_batch", b, "contains") for b in sorted(batch_ids)]
        if row.source_dataset_id is not None:
            out.append(("dataset", row.source_dataset_id, "source"))
        return out
    return []


def _children(session: Session, kind: str, row_id: int) -> list[tuple[str, int, str]]:
    if kind == "feedback_batch":
        ids = session.scalars(select(dataset_batches.c.dataset_id).where(dataset_batches.c.batch_id == row_id))
        return [("dataset", i, "contains") for i in ids]
    if kind == "dataset":
        pms = session.scalars(select(PreferenceModel.id).where(PreferenceModel.dataset_id == row_id))
        derived = session.scalars(select(Dataset.id).where(Dataset.source_dataset_id == row_id))
        return [("pm", i, "trained_on") for i in pms] + [("dataset", i, "source") for i in derived]
    if kind == "pm":
        pms = session.scalars(select(PreferenceModel.id).where(PreferenceModel.init_pm_id == row_id))
        pols = session.scalars(select(Policy.id).where(Policy.pm_id == row_id))
        return [("pm", i, "init") for i in pms] + [("policy", i, "trained_against") for i in pols]
    if kind == "policy":
        ids = session.scalars(select(Policy.id).where(Policy.init_policy_id == row_id))
        return [("policy", i, "init") for i in ids]
    return []


def _load(session: Session, kind: str, row_id: int):
    row = session.get(MODELS[kind], row_id)
    if row is None:
        raise NotFound(f"{kind.replace('_', ' ')} {row_id} does not exist")
    return row


def lineage_back(session: Session, *, kind: str, id: int) -> Lineage:
    """Everything the version (kind, id) was made from, transitively."""
    graph = Lineage(root=(kind, id))
    todo = [(kind, id)]
    while todo:
        key = todo.pop()
        if key in graph.nodes:
            continue
        row = _load(session, *key)
        graph.nodes[key] = _node(row)
        if key[0] == "dataset":
            graph.exclusions += [
                Exclusion(row.id, e["rater_id"], e["reason"], e["comparisons"])
                for e in (row.meta or {}).get("excluded_raters", [])
            ]
        for pkind, pid, rel in _parents(session, key[0], row):
            graph.edges.append(Edge(child=key, parent=(pkind, pid), relation=rel))
            todo.append((pkind, pid))
    return graph


def lineage_forward(session: Session, *, kind: str, id: int) -> Lineage:
    """Everything made from the version (kind, id), transitively."""
    graph = Lineage(root=(kind, id))
    todo = [(kind, id)]
    while todo:
        key = todo.pop()
        if key in graph.nodes:
            continue
        graph.nodes[key] = _node(_load(session, *key))
        for ckind, cid, rel in _children(session, *key):
            graph.edges.append(Edge(child=(ckind, cid), parent=key, relation=rel))
            todo.append((ckind, cid))
    return graph


def policies_trained_on_batch(session: Session, *, batch_id: int) -> list[int]:
    """Ids of every policy whose training data includes feedback batch ``batch_id``."""
    return [i for i in lineage_forward(session, kind="feedback_batch", id=batch_id).ids("policy")]
