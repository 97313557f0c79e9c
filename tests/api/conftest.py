"""The real app on a real PostgreSQL store, with one key per role."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from store.keys import create_api_key
from store.settings import Settings


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
