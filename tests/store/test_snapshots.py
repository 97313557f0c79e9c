import json

import pytest

from store.datasets import snapshot_comparisons
from store.errors import InvalidInput, NotFound
from tests import builders


def test_same_batches_give_the_same_snapshot(db, artifacts):
    with db.session() as s:
        b1, b2 = builders.batch(s, start=0), builders.batch(s, start=10)
        first, created = snapshot_comparisons(s, artifacts=artifacts, batch_ids=[b1.id, b2.id])
        assert created and first.version == 1 and first.row_count == 6
        again, created_again = snapshot_comparisons(s, artifacts=artifacts, batch_ids=[b2.id, b1.id])
        assert not created_again
        assert (again.id, again.version, again.content_sha256) == (first.id, 1, first.content_sha256)
        everything, created_all = snapshot_comparisons(s, artifacts=artifacts)
        assert not created_all and everything.id == first.id


def test_a_new_batch_makes_a_new_version(db, artifacts):
    with db.session() as s:
        b1 = builders.batch(s, start=0)
        v1, _ = snapshot_comparisons(s, artifacts=artifacts)
        builders.batch(s, start=10, n=2)
        v2, created = snapshot_comparisons(s, artifacts=artifacts)
        assert created and v2.version == 2 and v2.row_count == 5
        assert v2.content_sha256 != v1.content_sha256
        assert [b.id for b in v1.batches] == [b1.id]


def test_snapshot_artifact_holds_every_comparison(db, artifacts):
    with db.session() as s:
        builders.batch(s, n=4)
        ds, _ = snapshot_comparisons(s, artifacts=artifacts)
        art = ds.artifact
    rows = [json.loads(line) for line in artifacts.read_bytes(art.uri, art.sha256).decode().splitlines()]
    assert [r["prompt"] for r in rows] == [f"Human: question {i}?\n\nAssistant:" for i in range(4)]
    assert {r["choice"] for r in rows} == {"a"}


def test_snapshot_of_nothing_is_refused(db, artifacts):
    with db.session() as s:
        with pytest.raises(InvalidInput, match="no feedback batches"):
            snapshot_comparisons(s, artifacts=artifacts)
        with pytest.raises(NotFound, match=r"\[42\]"):
            snapshot_comparisons(s, artifacts=artifacts, batch_ids=[42])


def test_a_snapshot_records_each_comparisons_source_and_counts_ai_feedback_apart(db, artifacts):
    from store.feedback import create_feedback_batch

    with db.session() as s:
        builders.batch(s, n=3, start=0, source="vendor-a")
        builders.batch(s, n=2, start=10, source="ai:lm:judge-7b")
        builders.batch(s, n=1, start=20, source="ai:pm:pm-v3")
        # a left-out rater's answers count under no source
        left_out = [builders.comparison(30 + i, rater="r2") for i in range(4)]
        create_feedback_batch(s, source="ai:pm:pm-v3", comparisons=left_out)
        ds, _ = snapshot_comparisons(s, artifacts=artifacts, excluded_raters={"r2": "excluded by an operator"})
        art, meta = ds.artifact, dict(ds.meta)
    assert meta["sources"] == {"ai:lm:judge-7b": 2, "ai:pm:pm-v3": 1, "vendor-a": 3}
    assert meta["ai_comparisons"] == 3  # sources starting "ai:"
    rows = [json.loads(line) for line in artifacts.read_bytes(art.uri, art.sha256).decode().splitlines()]
    assert [r["source"] for r in rows] == ["vendor-a"] * 3 + ["ai:lm:judge-7b"] * 2 + ["ai:pm:pm-v3"]
