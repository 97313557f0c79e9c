from datetime import timedelta

import pytest
from sqlalchemy import func, select

from store.errors import Conflict, InvalidInput
from store.feedback import NewComparison, create_feedback_batch, rater_agreement
from store.models import Comparison, ComparisonTask, FeedbackBatch
from store.tasks import create_tasks, lease_tasks
from tests import builders


def _count(s, model) -> int:
    return s.scalar(select(func.count()).select_from(model))


def test_batch_is_written_whole_with_positions(db):
    with db.session() as s:
        b = builders.batch(s, n=5)
    with db.session() as s:
        rows = s.scalars(select(Comparison).where(Comparison.batch_id == b.id).order_by(Comparison.position)).all()
        assert [r.position for r in rows] == list(range(5))
        assert b.comparison_count == 5 and len(b.content_sha256) == 64


def test_idempotent_replay_returns_the_first_batch(db):
    comps = [builders.comparison(i) for i in range(3)]
    with db.session() as s:
        first, created = create_feedback_batch(s, source="t", comparisons=comps, idempotency_key="k1", request_sha256="h1")
    with db.session() as s:
        again, created_again = create_feedback_batch(s, source="t", comparisons=comps, idempotency_key="k1", request_sha256="h1")
    assert created and not created_again and again.id == first.id
    with db.session() as s:
        assert _count(s, FeedbackBatch) == 1 and _count(s, Comparison) == 3
    with pytest.raises(Conflict, match="different request"):
        with db.session() as s:
            create_feedback_batch(s, source="t", comparisons=comps[:1], idempotency_key="k1", request_sha256="h2")


def test_invalid_records_are_named_and_nothing_is_written(db):
    comps = [
        builders.comparison(0),
        NewComparison(prompt="  ", response_a="x", response_b="y", choice="a", rater_id="r"),
        NewComparison(prompt="p", response_a="same", response_b="same", choice="b", rater_id="r"),
        NewComparison(prompt="p", response_a="x", response_b="y", choice="maybe", rater_id=""),
        NewComparison(prompt="p", response_a="", response_b="y", choice="a", rater_id="r"),
    ]
    with pytest.raises(InvalidInput) as info:
        with db.session() as s:
            create_feedback_batch(s, source="t", comparisons=comps)
    assert [(e["index"], e["field"]) for e in info.value.errors] == [
        (1, "prompt"),
        (2, "choice"),
        (3, "choice"),
        (3, "rater_id"),
    ]
    with db.session() as s:
        assert _count(s, FeedbackBatch) == 0 and _count(s, Comparison) == 0


def test_unknown_task_is_refused_and_known_tasks_are_done(db):
    answer = builders.comparison(0)
    with db.session() as s:
        (task,) = create_tasks(s, tasks=[{"prompt": answer.prompt, "response_a": answer.response_a,
                                          "response_b": answer.response_b}])
        (leased,) = lease_tasks(s, rater_id=answer.rater_id, limit=1, lease=timedelta(minutes=5))
        assert leased.task.id == task.id
    with pytest.raises(InvalidInput) as info:
        with db.session() as s:
            create_feedback_batch(s, source="t", comparisons=[builders.comparison(0, task_id=task.id + 1)])
    assert info.value.errors == [{"index": 0, "field": "task_id", "message": f"comparison task {task.id + 1} does not exist"}]
    with db.session() as s:
        create_feedback_batch(s, source="t", comparisons=[builders.comparison(0, task_id=task.id)])
    with db.session() as s:
        task = s.get(ComparisonTask, task.id)
        assert (task.status, task.answers) == ("done", 1)


def test_rater_agreement_counts_pairs_judged_twice(db):
    same = builders.comparison(0)
    flipped = NewComparison(
        prompt=same.prompt, response_a=same.response_b, response_b=same.response_a, choice="b", rater_id="r2"
    )
    disagree = NewComparison(
        prompt=same.prompt, response_a=same.response_a, response_b=same.response_b, choice="b", rater_id="r3"
    )
    with db.session() as s:
        b, _ = create_feedback_batch(s, source="t", comparisons=[same, flipped, disagree, builders.comparison(1)])
        stats = rater_agreement(s, [b.id])
    # r1 and r2 agree (b/a flipped), r3 disagrees with both: 1 of 3 rater pairs agree.
    assert stats == {"pairs_with_multiple_raters": 1, "rater_pairs": 3, "agreement": pytest.approx(1 / 3)}
