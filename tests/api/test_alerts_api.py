"""A rollback through the API is alerted after its answer, and a receiver that is down never fails it."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from store.deployments import deploy
from store.models import Alert
from store.settings import Settings
from tests import builders
from tests.receivers import Receiver


@pytest.fixture
def two_deploys(pg_db) -> list[int]:
    with pg_db.session() as s:
        return [deploy(s, policy_id=builders.policy(s).id, reason=f"deploy {i}", actor="ops").id for i in range(2)]


def _client(pg_db, artifacts, tmp_path, hook: Receiver) -> TestClient:
    settings = Settings(home=tmp_path, alert_webhook=hook.url, alert_retries=1, alert_retry_delay_s=0,
                        public_url="https://ratchet.example")
    return TestClient(create_app(settings, database=pg_db, artifacts=artifacts))


@pytest.mark.parametrize("status", [200, 500])
def test_a_rollback_through_the_api_is_alerted_and_a_failing_receiver_does_not_fail_it(
        pg_db, artifacts, tmp_path, keys, two_deploys, status):
    with Receiver(status) as hook, _client(pg_db, artifacts, tmp_path, hook) as client:
        r = client.post("/v1/deployments/rollback", json={"reason": "users complain"}, headers=keys.operator)
    assert r.status_code == 201, r.text
    tries = 1 if status == 200 else 2
    assert hook.events() == ["deploy"] * tries + ["deploy"] * tries + ["rollback"] * tries  # every pending alert
    rolled = hook.bodies[-1]
    assert rolled["dedupe_key"] == f"deploy:{r.json()['id']}" and rolled["link"] == "https://ratchet.example/dashboard"
    assert "Rolled back 'default' by operator" in rolled["text"] and "users complain" in rolled["text"]
    with pg_db.session() as s:
        statuses = {a.status for a in s.scalars(select(Alert))}
    assert statuses == ({"delivered"} if status == 200 else {"failed"})


def test_a_refused_rollback_records_no_alert(pg_db, artifacts, tmp_path, keys):
    with Receiver() as hook, _client(pg_db, artifacts, tmp_path, hook) as client:
        r = client.post("/v1/deployments/rollback", json={"reason": "nothing to undo"}, headers=keys.operator)
    assert r.status_code == 404 and hook.bodies == []
    with pg_db.session() as s:
        assert s.scalars(select(Alert)).all() == []
