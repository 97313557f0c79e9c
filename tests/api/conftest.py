"""The real app on a real PostgreSQL store, with one key per role."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.app import create_app
from store.keys import create_api_key
from store.models import Comparison, ComparisonTask, FeedbackBatch, TaskLease
from store.settings import Settings
from store.tasks import create_tasks


@dataclass
class Keys:
    labeler: dict
    operator: dict
    admin: dict
    revoked: dict


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def api_settings(tmp_path) -> Settings:
    return Settings(home=tmp_path, max_batch_records=1000, max_request_bytes=1_000_000, max_import_bytes=8_000_000)


@pytest.fixture
def client(pg_db, artifacts, api_settings):
    app = create_app(api_settings, database=pg_db, artifacts=artifacts)
    with TestClient(app) as c:
        yield c


@pytest.fixture
def keys(pg_db) -> Keys:
    from store.keys import revoke_api_key

    with pg_db.session() as s:
        tokens = {role: create_api_key(s, name=role, role=role)[1] for role in ("labeler", "operator", "admin")}
        tokens["revoked"] = create_api_key(s, name="gone", role="admin")[1]
        revoke_api_key(s, name="gone")
    return Keys(**{k: bearer(v) for k, v in tokens.items()})


def comparison(i: int = 0, **overrides) -> dict:
    record = {
        "prompt": f"\n\nHuman: question {i}?\n\nAssistant:",
        "response_a": f" kind answer {i}",
        "response_b": f" curt answer {i}",
        "choice": "a",
        "rater_id": "rater-1",
    }
    record.update(overrides)
    return record


def batch_body(n: int = 3, **overrides) -> dict:
    return {"source": "vendor-x", "comparisons": [comparison(i) for i in range(n)], **overrides}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if "tests/api/" in str(item.fspath) and "pg_db" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)


def lose_the_idempotency_race(monkeypatch, *route_lookups: tuple[object, str], store_misses: int = 0) -> None:
    """Make the next request with an idempotency key act as the loser of a race: its
    lookups before the insert (the route's own, named by module and attribute, and
    the store's first ``store_misses``) find no batch, as if the winner committed
    just after them, so its insert is the one that collides."""
    import store.feedback

    for module, name in route_lookups:
        monkeypatch.setattr(module, name, lambda *args, **kwargs: None)
    real, misses = store.feedback.find_replay, [store_misses]

    def find_replay(*args, **kwargs):
        if misses[0]:
            misses[0] -= 1
            return None
        return real(*args, **kwargs)

    monkeypatch.setattr(store.feedback, "find_replay", find_replay)


# -- labeling: tasks, leases and answers ----------------------------------------------------


def task_texts(i: int) -> dict:
    """The texts of the ``i``-th test task (distinct responses, so any choice is valid)."""
    return {"prompt": f"\n\nHuman: task {i}?\n\nAssistant:", "response_a": f" first {i}", "response_b": f" second {i}"}


def answer(task: dict, rater_id: str, choice: str = "a", **overrides) -> dict:
    """A comparison answering ``task`` (as GET /v1/comparison-tasks shows it) as ``rater_id``."""
    record = {"prompt": task["prompt"], "response_a": task["response_a"], "response_b": task["response_b"],
              "choice": choice, "rater_id": rater_id, "task_id": task["id"]}
    record.update(overrides)
    return record


@pytest.fixture
def make_tasks(pg_db):
    """``make_tasks(n, start=0, cycle_id=None, answers_needed=1)``: open ``n`` train tasks; returns their ids."""

    def make(n: int, *, start: int = 0, cycle_id: int | None = None, answers_needed: int = 1) -> list[int]:
        with pg_db.session() as s:
            rows = create_tasks(s, cycle_id=cycle_id, tasks=[
                task_texts(start + i) | {"answers_needed": answers_needed} for i in range(n)])
            return [r.id for r in rows]

    return make


@pytest.fixture
def labeler_key(pg_db):
    """``labeler_key(name)``: the headers of a new labeler key named ``name``."""

    def make(name: str) -> dict:
        with pg_db.session() as s:
            return bearer(create_api_key(s, name=name, role="labeler")[1])

    return make


@dataclass
class Labeling:
    """Leasing and answering through the API, for tests that say only who does what."""

    client: TestClient

    def lease(self, headers: dict, limit: int = 10, rater_id: str | None = None) -> list[dict]:
        """Lease up to ``limit`` tasks (asserting 200); the tasks as the rater sees them."""
        query = f"?limit={limit}" + (f"&rater_id={rater_id}" if rater_id else "")
        r = self.client.get(f"/v1/comparison-tasks{query}", headers=headers)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    def post(self, headers: dict, comparisons: list[dict], idempotency_key: str | None = None):
        """POST a feedback batch of ``comparisons``; the response."""
        if idempotency_key is not None:
            headers = headers | {"Idempotency-Key": idempotency_key}
        return self.client.post("/v1/feedback-batches", json={"source": "labeling", "comparisons": comparisons},
                                headers=headers)


@pytest.fixture
def labeling(client) -> Labeling:
    return Labeling(client)


@dataclass(frozen=True)
class Written:
    """What the labeling tables hold: a refused request must leave every number as it was."""

    batches: int
    comparisons: int
    answers: int
    """the answers counted on tasks"""
    answered_leases: int
    done_tasks: int


@pytest.fixture
def written(pg_db):
    """``written()``: the ``Written`` numbers now."""

    def count() -> Written:
        with pg_db.session() as s:
            return Written(
                batches=s.scalar(select(func.count()).select_from(FeedbackBatch)),
                comparisons=s.scalar(select(func.count()).select_from(Comparison)),
                answers=s.scalar(select(func.coalesce(func.sum(ComparisonTask.answers), 0))),
                answered_leases=s.scalar(select(func.count()).select_from(TaskLease)
                                         .where(TaskLease.answered_at.is_not(None))),
                done_tasks=s.scalar(select(func.count()).select_from(ComparisonTask)
                                    .where(ComparisonTask.status == "done")),
            )

    return count
