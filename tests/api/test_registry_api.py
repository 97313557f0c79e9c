"""Registry reads, deployments, cycles, health and keys through the real app."""

from concurrent.futures import ThreadPoolExecutor
from threading import Barrier

from api.app import create_app
from fastapi.testclient import TestClient
from store.datasets import snapshot_comparisons
from store.deployments import deploy
from tests import builders


def test_policy_lineage_reaches_its_feedback(client, keys, pg_db, artifacts):
    with pg_db.session() as s:
        b = builders.batch(s)
        ds, _ = snapshot_comparisons(s, artifacts=artifacts)
        pm = builders.pm(s, dataset_id=ds.id)
        p0 = builders.policy(s)
        p1 = builders.policy(s, init_policy_id=p0.id, reference_policy_id=p0.id, pm_id=pm.id)
    lineage = client.get(f"/v1/policies/{p1.id}/lineage", headers=keys.labeler).json()
    kinds = {(n["kind"], n["id"]) for n in lineage["nodes"]}
    assert {("policy", p0.id), ("pm", pm.id), ("dataset", ds.id), ("feedback_batch", b.id)} <= kinds
    forward = client.get(f"/v1/feedback-batches/{b.id}/lineage", headers=keys.labeler).json()
    assert ("policy", p1.id) in {(n["kind"], n["id"]) for n in forward["nodes"]}
    assert client.get(f"/v1/policies/{p1.id}", headers=keys.labeler).json()["pm_id"] == pm.id
    assert client.get(f"/v1/preference-models/{pm.id}", headers=keys.labeler).json()["dataset_id"] == ds.id
    assert client.get("/v1/policies", headers=keys.labeler).json()["count"] == 2
    assert client.get("/v1/datasets?kind=comparisons", headers=keys.labeler).json()["count"] == 1
    assert client.get("/v1/policies/999", headers=keys.labeler).status_code == 404


def test_rollback_restores_the_previous_deployment(client, keys, pg_db):
    with pg_db.session() as s:
        p1, p2 = builders.policy(s), builders.policy(s)
        deploy(s, policy_id=p1.id)
        deploy(s, policy_id=p2.id)
    assert client.get("/v1/deployments/active", headers=keys.labeler).json()["policy_id"] == p2.id
    r = client.post("/v1/deployments/rollback", json={"reason": "regression"}, headers=keys.operator)
    assert r.status_code == 201 and r.json()["policy_id"] == p1.id and r.json()["actor"] == "operator"
    again = client.post("/v1/deployments/rollback", json={}, headers=keys.operator)
    assert again.status_code == 409 and "no earlier deployment" in again.json()["detail"]
    assert client.get("/v1/deployments", headers=keys.labeler).json()["count"] == 3


def test_concurrent_rollbacks_walk_back_one_step_each_and_then_conflict(client, keys, pg_db):
    with pg_db.session() as s:
        policies = [builders.policy(s).id for _ in range(5)]
        for p in policies:
            deploy(s, policy_id=p)
    barrier = Barrier(8)

    def roll_back(i):
        barrier.wait()
        return client.post("/v1/deployments/rollback", json={"reason": f"storm {i}"}, headers=keys.operator)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(roll_back, range(8)))
    # Five deploys leave four steps to walk back (to p4, p3, p2, p1); the other four find nothing left.
    done = [r.json() for r in answers if r.status_code == 201]
    refused = [r.json()["detail"] for r in answers if r.status_code != 201]
    assert sorted(d["policy_id"] for d in done) == policies[:4]
    assert sorted(d["version"] for d in done) == [6, 7, 8, 9] and len({d["rolled_back_id"] for d in done}) == 4
    assert [r.status_code for r in answers].count(409) == 4 and all("no earlier deployment" in d for d in refused)
    assert client.get("/v1/deployments/active", headers=keys.labeler).json()["policy_id"] == policies[0]


def test_rollback_of_a_target_never_deployed_is_404(client, keys):
    r = client.post("/v1/deployments/rollback", json={"name": "canary"}, headers=keys.operator)
    assert r.status_code == 404
    assert client.get("/v1/deployments/active?name=canary", headers=keys.labeler).status_code == 404


def test_starting_a_cycle_needs_an_orchestrator(client, keys):
    r = client.post("/v1/cycles", json={}, headers=keys.operator)
    assert r.status_code == 503 and "no orchestrator" in r.json()["detail"]
    assert "RATCHET_CYCLE_LAUNCHER" in r.json()["detail"] and "ratchet cycle run" in r.json()["detail"]
    assert client.post("/v1/cycles", json={"week": "last week"}, headers=keys.operator).status_code == 422


def test_a_cycle_for_a_week_that_does_not_exist_is_422(client, keys):
    for week, why in [("2026-W99", "ISO year 2026 has 53 weeks"), ("2026-W00", "ISO year 2026 has 53 weeks"),
                      ("2027-W53", "ISO year 2027 has 52 weeks"), ("0000-W01", "before year 1")]:
        r = client.post("/v1/cycles", json={"week": week}, headers=keys.operator)
        assert r.status_code == 422, (week, r.text)
        (error,) = r.json()["errors"]
        assert error["field"] == "week" and why in error["message"], error
    # 2026 has a 53rd week: valid, so the request gets as far as the (missing) orchestrator.
    assert client.post("/v1/cycles", json={"week": "2026-W53"}, headers=keys.operator).status_code == 503


def test_admin_creates_and_revokes_keys(client, keys):
    created = client.post("/v1/api-keys", json={"name": "vendor-y", "role": "labeler"}, headers=keys.admin)
    assert created.status_code == 201
    token = {"Authorization": f"Bearer {created.json()['token']}"}
    assert client.get("/v1/feedback-batches", headers=token).status_code == 200
    assert client.post("/v1/api-keys", json={"name": "vendor-y", "role": "labeler"}, headers=keys.admin).status_code == 409
    assert client.post("/v1/api-keys/vendor-y/revoke", headers=keys.admin).status_code == 200
    assert client.get("/v1/feedback-batches", headers=token).status_code == 401
    assert client.post("/v1/api-keys/nobody/revoke", headers=keys.admin).status_code == 404


def test_health_reports_schema_and_database(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert r.headers["server-timing"].startswith("app;dur=")


def test_health_is_503_when_the_schema_falls_behind(pg_db, pg_url, artifacts, api_settings):
    from alembic import command

    from store.db import alembic_config, upgrade

    app = create_app(api_settings, database=pg_db, artifacts=artifacts)
    command.downgrade(alembic_config(pg_url), "base")
    try:
        with TestClient(app) as c:
            r = c.get("/healthz")
        assert r.status_code == 503 and r.json()["database"] == "schema_not_at_head"
    finally:
        upgrade(pg_url)


def test_the_app_refuses_to_start_on_an_old_schema(tmp_path):
    import pytest

    from store.errors import SchemaNotAtHead
    from store.settings import Settings

    with pytest.raises(SchemaNotAtHead, match="ratchet db upgrade"):
        create_app(Settings(home=tmp_path))
