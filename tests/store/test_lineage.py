import pytest

from store.datasets import snapshot_comparisons
from store.errors import NotFound
from store.lineage import lineage_back, lineage_forward, policies_trained_on_batch
from tests import builders


@pytest.fixture
def world(db, artifacts):
    """b1, b2 -> D1 {b1}, D2 {b1, b2} -> PM1 on D1, PM2 on D2 (warm from PM1)
    -> P0 (base), P1 (init P0, ref P0, PM1), P2 (init P1, ref P0, PM2), and an
    unrelated P3 trained against a PM on another batch b3."""
    with db.session() as s:
        b1, b2, b3 = builders.batch(s, start=0), builders.batch(s, start=10), builders.batch(s, start=20)
        d1, _ = snapshot_comparisons(s, artifacts=artifacts, batch_ids=[b1.id])
        d2, _ = snapshot_comparisons(s, artifacts=artifacts, batch_ids=[b1.id, b2.id])
        d3, _ = snapshot_comparisons(s, artifacts=artifacts, name="other", batch_ids=[b3.id])
        pm1 = builders.pm(s, dataset_id=d1.id)
        pm2 = builders.pm(s, dataset_id=d2.id, init_pm_id=pm1.id)
        pm3 = builders.pm(s, name="other-pm", dataset_id=d3.id)
        p0 = builders.policy(s)
        p1 = builders.policy(s, init_policy_id=p0.id, reference_policy_id=p0.id, pm_id=pm1.id)
        p2 = builders.policy(s, init_policy_id=p1.id, reference_policy_id=p0.id, pm_id=pm2.id)
        p3 = builders.policy(s, name="other", init_policy_id=p0.id, reference_policy_id=p0.id, pm_id=pm3.id)
        return {k: v.id for k, v in locals().items() if k in "b1 b2 b3 d1 d2 d3 pm1 pm2 pm3 p0 p1 p2 p3".split()}


def test_policy_walks_back_to_its_pm_dataset_and_batches(db, world):
    w = world
    with db.session() as s:
        graph = lineage_back(s, kind="policy", id=w["p2"])
    assert graph.ids("policy") == sorted([w["p0"], w["p1"], w["p2"]])
    assert graph.ids("pm") == sorted([w["pm1"], w["pm2"]])
    assert graph.ids("dataset") == sorted([w["d1"], w["d2"]])
    assert graph.ids("feedback_batch") == sorted([w["b1"], w["b2"]])
    relations = {(e.child, e.parent): e.relation for e in graph.edges}
    assert relations[(("policy", w["p2"]), ("pm", w["pm2"]))] == "trained_against"
    assert relations[(("policy", w["p2"]), ("policy", w["p0"]))] == "reference"
    assert relations[(("pm", w["pm2"]), ("dataset", w["d2"]))] == "trained_on"
    assert relations[(("dataset", w["d2"]), ("feedback_batch", w["b2"]))] == "contains"


def test_batch_walks_forward_to_every_policy_trained_on_it(db, world):
    w = world
    with db.session() as s:
        assert policies_trained_on_batch(s, batch_id=w["b1"]) == sorted([w["p1"], w["p2"]])
        # b2 entered only through D2 -> PM2 -> P2.
        assert policies_trained_on_batch(s, batch_id=w["b2"]) == [w["p2"]]
        assert policies_trained_on_batch(s, batch_id=w["b3"]) == [w["p3"]]
        forward = lineage_forward(s, kind="feedback_batch", id=w["b2"])
    assert forward.ids("pm") == [w["pm2"]]
    assert forward.ids("dataset") == [w["d2"]]


def test_lineage_of_a_missing_version_is_not_found(db):
    with db.session() as s, pytest.raises(NotFound, match="policy 999 does not exist"):
        lineage_back(s, kind="policy", id=999)
