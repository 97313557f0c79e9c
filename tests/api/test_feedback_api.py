"""Feedback batches through the real app and PostgreSQL: every answer and error path."""

import pytest
from sqlalchemy import func, select

from store.models import Comparison, ComparisonTask, FeedbackBatch
from store.tasks import create_tasks
from store.settings import Settings
from tests.api.conftest import batch_body, comparison, lose_the_idempotency_race


@pytest.fixture(params=["inline", "copy"])
def api_settings(request, tmp_path) -> Settings:
    """Every test runs on both write paths: small batches from the event loop
    in one statement (inline) and through COPY in a worker thread (copy)."""
    inline_bytes = 256 * 1024 if request.param == "inline" else 0
    return Settings(
        home=tmp_path, max_batch_records=1000, max_request_bytes=1_000_000, max_import_bytes=8_000_000,
        inline_batch_bytes=inline_bytes,
    )


def test_the_write_path_is_the_one_asked_for(client, api_settings):
    assert (client.app.state.inline_writer is not None) == (api_settings.inline_batch_bytes > 0)


def test_the_small_batch_pool_has_the_size_asked_for(pg_db, artifacts, tmp_path, keys):
    from fastapi.testclient import TestClient

    from api.app import create_app

    app = create_app(Settings(home=tmp_path, inline_pool_size=2), database=pg_db, artifacts=artifacts)
    with TestClient(app) as c:
        assert c.app.state.inline_writer._pool.get_max_size() == 2
        assert c.post("/v1/feedback-batches", json=batch_body(2), headers=keys.labeler).status_code == 201


def counts(db) -> tuple[int, int]:
    with db.session() as s:
        return (
            s.scalar(select(func.count()).select_from(FeedbackBatch)),
            s.scalar(select(func.count()).select_from(Comparison)),
        )


def test_register_a_batch(client, keys, pg_db):
    r = client.post("/v1/feedback-batches", json=batch_body(3), headers=keys.labeler)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["comparison_count"] == 3 and body["source"] == "vendor-x"
    assert counts(pg_db) == (1, 3)
    got = client.get(f"/v1/feedback-batches/{body['id']}", headers=keys.labeler).json()
    assert got["agreement"] == {"pairs_with_multiple_raters": 0, "rater_pairs": 0, "agreement": None}


def test_empty_response_is_valid_and_kept_empty(client, keys, pg_db):
    r = client.post("/v1/feedback-batches", json=batch_body(1) | {"comparisons": [comparison(0, response_a="")]}, headers=keys.labeler)
    assert r.status_code == 201, r.text
    with pg_db.session() as s:
        assert s.scalar(select(Comparison.response_a)) == ""


def test_replay_returns_the_first_answer_and_a_changed_body_conflicts(client, keys, pg_db):
    headers = keys.labeler | {"Idempotency-Key": "vendor-x-2026-11-23-001"}
    first = client.post("/v1/feedback-batches", json=batch_body(2), headers=headers)
    again = client.post("/v1/feedback-batches", json=batch_body(2), headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    changed = client.post("/v1/feedback-batches", json=batch_body(3), headers=headers)
    assert changed.status_code == 409 and "different request" in changed.json()["detail"]
    assert counts(pg_db) == (1, 2)


def test_a_registration_that_loses_an_idempotency_race_answers_the_winners_batch(
    pg_db, artifacts, tmp_path, keys, monkeypatch
):
    from fastapi.testclient import TestClient

    import api.routes.feedback_batches
    from api.app import create_app

    app = create_app(Settings(home=tmp_path, inline_batch_bytes=0), database=pg_db, artifacts=artifacts)
    headers = keys.labeler | {"Idempotency-Key": "vendor-x-race"}
    with TestClient(app) as c:
        first = c.post("/v1/feedback-batches", json=batch_body(2), headers=headers)
        lose_the_idempotency_race(monkeypatch, (api.routes.feedback_batches, "find_replay"), store_misses=1)
        lost = c.post("/v1/feedback-batches", json=batch_body(2), headers=headers)
    assert (first.status_code, lost.status_code) == (201, 200), lost.text
    assert lost.json() == first.json()
    assert counts(pg_db) == (1, 2)


def test_invalid_records_are_all_named_and_nothing_is_written(client, keys, pg_db):
    records = [
        comparison(0),
        comparison(1, prompt="   "),
        comparison(2, response_b=" kind answer 2", response_a=" kind answer 2"),
        comparison(3, choice="maybe"),
        comparison(4, response_a="x" * 200_001),
        {k: v for k, v in comparison(5).items() if k != "rater_id"},
        comparison(6, prompt="nul \x00 inside"),
        comparison(7, response_a="same", response_b="same", choice="tie"),
    ]
    r = client.post("/v1/feedback-batches", json={"source": "s", "comparisons": records}, headers=keys.labeler)
    assert r.status_code == 422
    named = {(e["index"], e["field"]) for e in r.json()["errors"]}
    assert named == {(1, "prompt"), (2, "choice"), (3, "choice"), (4, "response_a"), (5, "rater_id"), (6, "prompt")}
    assert counts(pg_db) == (0, 0)


def test_bad_records_far_apart_are_all_named_and_nothing_is_written(client, keys, pg_db):
    # The COPY path validates 500 records at a time while earlier ones stream
    # into PostgreSQL: a bad record in a late chunk still names every bad one
    # and rolls the whole batch back.
    records = [comparison(i) for i in range(1000)]
    records[3] = comparison(3, prompt="")
    records[600] = comparison(600, choice="maybe")
    records[750] = "not an object"
    records[999] = comparison(999, task_id="5")
    r = client.post("/v1/feedback-batches", json={"source": "s", "comparisons": records}, headers=keys.labeler)
    assert r.status_code == 422, r.text
    named = {(e["index"], e["field"]) for e in r.json()["errors"]}
    assert named == {(3, "prompt"), (600, "choice"), (750, "(body)"), (999, "task_id")}
    only_last = [comparison(i) for i in range(999)] + [comparison(999, rater_id=" ")]
    r = client.post("/v1/feedback-batches", json={"source": "s", "comparisons": only_last}, headers=keys.labeler)
    assert r.status_code == 422 and [(e["index"], e["field"]) for e in r.json()["errors"]] == [(999, "rater_id")]
    assert counts(pg_db) == (0, 0)


def test_unknown_task_is_named(client, keys, pg_db):
    r = client.post("/v1/feedback-batches", json=batch_body(1) | {"comparisons": [comparison(0, task_id=12345)]}, headers=keys.labeler)
    assert r.status_code == 422
    assert r.json()["errors"] == [{"index": 0, "field": "task_id", "message": "comparison task 12345 does not exist"}]
    assert counts(pg_db) == (0, 0)


@pytest.mark.parametrize(
    "body, field",
    [(b"not json", "(body)"), (b"[]", "(body)"), (b'{"source": "s", "comparisons": []}', "comparisons")],
)
def test_malformed_bodies_are_422(client, keys, body, field):
    r = client.post("/v1/feedback-batches", content=body, headers=keys.labeler | {"Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == field


def test_too_many_records_is_413_with_the_limit(client, keys, pg_db):
    r = client.post("/v1/feedback-batches", json=batch_body(1001), headers=keys.labeler)
    assert r.status_code == 413 and "limit of 1000 per batch" in r.json()["detail"]
    assert counts(pg_db) == (0, 0)


def test_too_many_bytes_is_413_with_the_limit(client, keys):
    body = batch_body(1) | {"comparisons": [comparison(0, response_a="x" * 1_000_001)]}
    r = client.post("/v1/feedback-batches", json=body, headers=keys.labeler)
    assert r.status_code == 413 and "limit of 1000000 bytes" in r.json()["detail"]


def test_auth_missing_revoked_and_wrong_role(client, keys):
    assert client.post("/v1/feedback-batches", json=batch_body(1)).status_code == 401
    r = client.post("/v1/feedback-batches", json=batch_body(1), headers=keys.revoked)
    assert r.status_code == 401 and r.json()["detail"] == "unknown or revoked API key"
    assert client.post("/v1/feedback-batches", json=batch_body(1), headers={"Authorization": "Bearer nope"}).status_code == 401
    r = client.post("/v1/deployments/rollback", json={}, headers=keys.labeler)
    assert r.status_code == 403 and "operator role" in r.json()["detail"]
    assert client.get("/v1/api-keys", headers=keys.operator).status_code == 403


def test_tasks_are_leased_once_and_answered_tasks_are_done(client, keys, pg_db):
    with pg_db.session() as s:
        create_tasks(s, tasks=[{"prompt": f"p{i}", "response_a": "x", "response_b": "y"} for i in range(3)])
    first = client.get("/v1/comparison-tasks?limit=2", headers=keys.labeler).json()
    second = client.get("/v1/comparison-tasks?limit=2", headers=keys.operator).json()
    assert first["count"] == 2 and second["count"] == 1
    assert not {t["id"] for t in first["data"]} & {t["id"] for t in second["data"]}
    task = first["data"][0]
    answer = comparison(0, prompt=task["prompt"], response_a=task["response_a"], response_b=task["response_b"],
                        task_id=task["id"], rater_id=first["rater_id"])
    assert client.post("/v1/feedback-batches", json={"source": "s", "comparisons": [answer]}, headers=keys.labeler).status_code == 201
    with pg_db.session() as s:
        assert s.get(ComparisonTask, task["id"]).status == "done"


def test_eval_tasks_are_served_first_blinded_and_a_finished_cycles_tasks_never(client, keys, pg_db):
    from store.cycles import finish_cycle, open_cycle

    with pg_db.session() as s:
        done, _ = open_cycle(s, week="2026-W01")
        create_tasks(s, cycle_id=done.id, tasks=[{"prompt": "stale", "response_a": "x", "response_b": "y"}])
        finish_cycle(s, cycle_id=done.id, status="succeeded")  # closes its open task
        running, _ = open_cycle(s, week="2026-W02")
        create_tasks(s, cycle_id=running.id, tasks=[{"prompt": "train", "response_a": "x", "response_b": "y"}])
        create_tasks(s, cycle_id=running.id, kind="eval", tasks=[
            {"prompt": "eval", "response_a": "candidate", "response_b": "deployed", "candidate_side": "a"}])
    leased = client.get("/v1/comparison-tasks?limit=10", headers=keys.labeler).json()["data"]
    assert [t["prompt"] for t in leased] == ["eval", "train"]  # the eval task first; the stale one never
    assert set(leased[0]) == set(leased[1])  # an eval task looks like any other
    assert not {"candidate_side", "kind", "metadata"} & set(leased[0])  # nor which policy wrote which response
    assert client.get(f"/v1/comparison-tasks?cycle_id={done.id}", headers=keys.labeler).json()["count"] == 0


def test_list_pages_with_a_cursor(client, keys):
    for i in range(5):
        client.post("/v1/feedback-batches", json=batch_body(1, source=f"s{i}"), headers=keys.labeler)
    page1 = client.get("/v1/feedback-batches?limit=2", headers=keys.labeler).json()
    page2 = client.get(f"/v1/feedback-batches?limit=2&cursor={page1['next_cursor']}", headers=keys.labeler).json()
    page3 = client.get(f"/v1/feedback-batches?limit=2&cursor={page2['next_cursor']}", headers=keys.labeler).json()
    sources = [b["source"] for p in (page1, page2, page3) for b in p["data"]]
    assert sources == [f"s{i}" for i in range(5)] and page3["next_cursor"] is None
    bad = client.get("/v1/feedback-batches?cursor=garbage", headers=keys.labeler)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "cursor"


def test_missing_batch_is_404(client, keys):
    r = client.get("/v1/feedback-batches/999", headers=keys.labeler)
    assert r.status_code == 404 and r.json()["detail"] == "feedback batch 999 does not exist"
    assert client.get("/v1/feedback-batches/0", headers=keys.labeler).status_code == 422


def test_identical_responses_name_the_choice_given(client, keys, pg_db):
    same = comparison(0, response_a=" same", response_b=" same", choice="b")
    r = client.post("/v1/feedback-batches", json=batch_body(1) | {"comparisons": [same]}, headers=keys.labeler)
    assert r.status_code == 422
    assert r.json()["errors"] == [
        {"index": 0, "field": "choice", "message": "response_a and response_b are identical, so choice must be 'tie', not 'b'"}
    ]


@pytest.mark.parametrize("size", [3, 700], ids=["small", "large"])
def test_a_json_syntax_error_names_the_record_it_breaks(client, keys, pg_db, size):
    import json

    records = [json.dumps(comparison(i)) for i in range(size)]
    records[size - 2] = records[size - 2].replace('"choice": "a",', '"choice": "a"')  # a missing comma
    body = '{"source": "s", "comparisons": [' + ", ".join(records) + "]}"
    r = client.post("/v1/feedback-batches", content=body, headers=keys.labeler | {"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    [error] = r.json()["errors"]
    assert (error["index"], error["field"]) == (size - 2, "choice")
    assert error["message"].startswith(f"invalid JSON in comparison {size - 2}: Expecting ',' delimiter at line 1 column ")
    assert counts(pg_db) == (0, 0)
