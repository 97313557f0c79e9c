"""Exports of comparisons as preference pairs: which batches, how many ties, the pairs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.datasets import dataset_batch_ids, get_dataset
from store.db import Database
from store.errors import InvalidInput
from store.feedback import get_feedback_batch
from store.models import Comparison, Dataset

EXPORT_READ_ROWS = 1000
"""rows fetched from the database at a time while an export streams"""


@dataclass(frozen=True)
class PairExport:
    """The batches an export reads, in order, and how many ties it leaves out
    (a preference pair has a chosen and a rejected response; a tie has neither)."""

    batch_ids: list[int]
    skipped_ties: int


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    strength: float | None = None
    """how much better ``chosen`` is, when the rater said (``Comparison.strength``)"""


def count_ties(session: Session, *, batch_ids: Sequence[int]) -> int:
    """How many comparisons of these batches are ties."""
    return session.scalar(
        select(func.count())
        .select_from(Comparison)
        .where(Comparison.batch_id.in_(list(batch_ids)), Comparison.choice == "tie")
    )


def batch_export(session: Session, *, batch_id: int) -> PairExport:
    """The export of feedback batch ``batch_id`` (``NotFound`` when there is none)."""
    get_feedback_batch(session, batch_id)
    return PairExport([batch_id], count_ties(session, batch_ids=[batch_id]))


def dataset_export(session: Session, *, dataset_id: int) -> tuple[Dataset, PairExport]:
    """The comparison snapshot ``dataset_id`` and its export; ``InvalidInput`` for a
    dataset of prompts or samples, which holds no preference pairs."""
    dataset = get_dataset(session, dataset_id)
    if dataset.kind != "comparisons":
        raise InvalidInput(
            f"dataset {dataset_id} is a {dataset.kind} dataset; only comparison snapshots export as preference pairs",
            [{"field": "dataset_id", "message": f"dataset {dataset_id} holds {dataset.kind}"}],
        )
    batch_ids = dataset_batch_ids(session, dataset_id=dataset.id)
    return dataset, PairExport(batch_ids, count_ties(session, batch_ids=batch_ids))


def preference_pairs(database: Database, *, batch_ids: Sequence[int]) -> Iterator[PreferencePair]:
    """The non-tie comparisons of these batches as pairs, in (batch, position) order.

    Read in a session of its own, ``EXPORT_READ_ROWS`` rows at a time: a
    stream outlives the request that started it."""
    query = (
        select(Comparison.prompt, Comparison.response_a, Comparison.response_b, Comparison.choice,
               Comparison.strength)
        .where(Comparison.batch_id.in_(list(batch_ids)), Comparison.choice != "tie")
        .order_by(Comparison.batch_id, Comparison.position)
        .execution_options(yield_per=EXPORT_READ_ROWS)
    )
    with database.session() as session:
        for prompt, a, b, choice, strength in session.execute(query):
            chosen, rejected = (a, b) if choice == "a" else (b, a)
            yield PreferencePair(prompt, chosen, rejected, strength)
