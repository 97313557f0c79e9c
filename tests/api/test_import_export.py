"""JSONL import (hh-rlhf, trl) and export through the real app and PostgreSQL."""

import gzip
import json
from pathlib import Path

from sqlalchemy import func, insert, select

from store.datasets import create_dataset, snapshot_comparisons
from store.models import Comparison, FeedbackBatch, dataset_batches
from tests.api.conftest import lose_the_idempotency_race

HH_SAMPLE = Path(__file__).parents[1] / "data" / "hh-rlhf" / "harmless-base-test.first1000.jsonl.gz"


def _rows(db) -> tuple[int, int]:
    with db.session() as s:
        return (
            s.scalar(select(func.count()).select_from(FeedbackBatch)),
            s.scalar(select(func.count()).select_from(Comparison)),
        )


def test_the_hh_sample_imports_whole_and_exports_byte_for_byte(client, keys, pg_db):
    raw = HH_SAMPLE.read_bytes()
    r = client.post(
        "/v1/feedback-batches/import?format=hh-rlhf",
        content=raw,
        headers=keys.labeler | {"Content-Type": "application/jsonl", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 201, r.text
    result = r.json()
    assert (result["imported"], result["skipped"], result["skipped_lines"]) == (1000, 0, [])
    exported = client.get(f"/v1/feedback-batches/{result['batch']['id']}/export?format=hh-rlhf", headers=keys.labeler)
    assert exported.status_code == 200 and exported.headers["x-ratchet-skipped-ties"] == "0"
    originals = [json.loads(line) for line in gzip.decompress(raw).decode().splitlines()]
    roundtrip = [json.loads(line) for line in exported.text.splitlines()]
    assert len(roundtrip) == 1000
    assert all(o["chosen"] == e["chosen"] and o["rejected"] == e["rejected"] for o, e in zip(originals, roundtrip, strict=True))


def test_bad_lines_are_reported_not_dropped_or_guessed(client, keys, pg_db):
    lines = [
        json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}),
        json.dumps({"chosen": "no assistant turn here", "rejected": "\n\nHuman: hi\n\nAssistant: x"}),
        "{not json",
        json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}),
        json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: same", "rejected": "\n\nHuman: hi\n\nAssistant: same"}),
    ]
    r = client.post("/v1/feedback-batches/import?format=hh-rlhf", content="\n".join(lines), headers=keys.labeler)
    assert r.status_code == 201, r.text
    result = r.json()
    assert (result["imported"], result["skipped"]) == (1, 4)
    reasons = {s["line"]: s["reason"] for s in result["skipped_lines"]}
    assert sorted(reasons) == [2, 3, 4, 5]
    assert "no Assistant turn" in reasons[2] and "invalid JSON" in reasons[3]
    assert "differ before their last Assistant turn" in reasons[4] and "identical" in reasons[5]


def test_strict_import_refuses_everything_on_one_bad_line(client, keys, pg_db):
    body = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"prompt": "p"})
    r = client.post("/v1/feedback-batches/import?format=trl&strict=true", content=body, headers=keys.labeler)
    assert r.status_code == 422
    assert r.json()["errors"] == [{"index": 2, "field": "line", "message": "field 'chosen' is missing"}]
    assert _rows(pg_db) == (0, 0)


def test_nothing_importable_is_422(client, keys, pg_db):
    r = client.post("/v1/feedback-batches/import?format=trl", content=b"{}\n", headers=keys.labeler)
    assert r.status_code == 422 and "no line could be imported" in r.json()["detail"]
    assert _rows(pg_db) == (0, 0)


def test_corrupt_gzip_is_422_and_writes_nothing(client, keys, pg_db):
    body = HH_SAMPLE.read_bytes()[:5000]
    r = client.post("/v1/feedback-batches/import?format=hh-rlhf", content=body, headers=keys.labeler)
    assert r.status_code == 422 and "gzip stream is truncated" in r.json()["detail"]
    assert _rows(pg_db) == (0, 0)


def test_import_over_the_byte_limit_is_413(client, keys, pg_db):
    r = client.post("/v1/feedback-batches/import?format=trl", content=b" " * 8_000_001, headers=keys.labeler)
    assert r.status_code == 413 and "limit of 8000000 bytes" in r.json()["detail"]


def test_import_replay_with_the_same_key_answers_the_first_import(client, keys, pg_db):
    body = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
    headers = keys.labeler | {"Idempotency-Key": "import-1"}
    first = client.post("/v1/feedback-batches/import?format=trl", content=body, headers=headers)
    again = client.post("/v1/feedback-batches/import?format=trl", content=body, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    other = client.post("/v1/feedback-batches/import?format=trl", content=body + body, headers=headers)
    assert other.status_code == 409
    assert _rows(pg_db) == (1, 1)


def test_an_import_that_loses_an_idempotency_race_answers_the_winners_import(client, keys, pg_db, monkeypatch):
    import api.routes.imports

    body = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
    headers = keys.labeler | {"Idempotency-Key": "import-race"}
    first = client.post("/v1/feedback-batches/import?format=trl", content=body, headers=headers)
    lose_the_idempotency_race(monkeypatch, (api.routes.imports, "replay_of"))
    lost = client.post("/v1/feedback-batches/import?format=trl", content=body, headers=headers)
    assert (first.status_code, lost.status_code) == (201, 200), lost.text
    assert lost.json() == first.json()
    assert _rows(pg_db) == (1, 1)


def test_trl_export_and_ties_are_left_out(client, keys, pg_db):
    records = [
        {"prompt": "Q1", "response_a": "good", "response_b": "bad", "choice": "a", "rater_id": "r"},
        {"prompt": "Q2", "response_a": "bad", "response_b": "good", "choice": "b", "rater_id": "r"},
        {"prompt": "Q3", "response_a": "x", "response_b": "y", "choice": "tie", "rater_id": "r"},
    ]
    batch = client.post("/v1/feedback-batches", json={"source": "s", "comparisons": records}, headers=keys.labeler).json()
    r = client.get(f"/v1/feedback-batches/{batch['id']}/export?format=trl", headers=keys.labeler)
    assert r.headers["x-ratchet-skipped-ties"] == "1"
    assert [json.loads(line) for line in r.text.splitlines()] == [
        {"prompt": "Q1", "chosen": "good", "rejected": "bad"},
        {"prompt": "Q2", "chosen": "good", "rejected": "bad"},
    ]


def test_dataset_snapshot_exports_and_reports_agreement(client, keys, pg_db, artifacts):
    same = {"prompt": "Q", "response_a": "x", "response_b": "y", "choice": "a"}
    client.post("/v1/feedback-batches", json={"source": "s", "comparisons": [same | {"rater_id": "r1"}]}, headers=keys.labeler)
    client.post("/v1/feedback-batches", json={"source": "s", "comparisons": [same | {"rater_id": "r2"}]}, headers=keys.labeler)
    with pg_db.session() as s:
        ds, _ = snapshot_comparisons(s, artifacts=artifacts)
    detail = client.get(f"/v1/datasets/{ds.id}", headers=keys.labeler).json()
    assert detail["row_count"] == 2 and len(detail["batch_ids"]) == 2
    expected = {"pairs_with_multiple_raters": 1, "rater_pairs": 1, "agreement": 1.0}
    assert detail["agreement"] == expected
    assert ds.meta["agreement"] == expected  # stored with the snapshot, not recomputed per read
    with pg_db.session() as s:  # a snapshot made before agreement was stored with it
        old, _ = create_dataset(s, name="older", kind="comparisons", content_sha256="0" * 64, row_count=2,
                                metadata={"batch_count": 2})
        s.execute(insert(dataset_batches), [{"dataset_id": old.id, "batch_id": b} for b in detail["batch_ids"]])
    assert client.get(f"/v1/datasets/{old.id}", headers=keys.labeler).json()["agreement"] == expected
    exported = client.get(f"/v1/datasets/{ds.id}/export?format=trl", headers=keys.labeler)
    assert exported.text.count("\n") == 2


def _trl_line(i: int, **overrides) -> bytes:
    record = {"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} | overrides
    return json.dumps(record).encode() + b"\n"


def test_a_line_nested_too_deep_is_skipped_not_a_500(client, keys, pg_db):
    body = _trl_line(1) + b"[" * 10_000 + b"]" * 10_000 + b"\n" + _trl_line(3)
    r = client.post("/v1/feedback-batches/import?format=trl", content=body, headers=keys.labeler)
    assert r.status_code == 201, r.text
    assert (r.json()["imported"], r.json()["skipped_lines"]) == (2, [{"line": 2, "reason": "invalid JSON: nested too deeply"}])


def test_a_gzip_bomb_is_413_without_being_inflated(client, keys, pg_db):
    import tracemalloc

    bomb = gzip.compress(b"\n" * (64 * 1024 * 1024), compresslevel=9)  # ~65 KB, 8x the 8 MB limit once inflated
    tracemalloc.start()
    try:
        r = client.post(
            "/v1/feedback-batches/import?format=trl", content=bomb,
            headers=keys.labeler | {"Content-Type": "application/jsonl", "Content-Encoding": "gzip"},
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 413, r.text
    assert "limit of 8000000 bytes (after gzip decoding)" in r.json()["detail"]
    assert peak < 24 * 1024 * 1024  # loose: inflating the whole bomb at once takes 64 MiB
    assert _rows(pg_db) == (0, 0)


def test_an_import_text_over_the_batch_limit_is_a_skipped_line(client, keys, pg_db):
    body = _trl_line(1) + _trl_line(2, chosen="x" * 200_001) + _trl_line(3)
    r = client.post("/v1/feedback-batches/import?format=trl", content=body, headers=keys.labeler)
    assert r.status_code == 201, r.text
    assert r.json()["imported"] == 2
    assert r.json()["skipped_lines"] == [{"line": 2, "reason": "chosen is 200001 characters long, over the limit of 200000"}]


def test_an_import_over_the_record_limit_is_413_and_writes_nothing(client, keys, pg_db):
    body = b"".join(_trl_line(i) for i in range(1_001))  # api_settings: max_batch_records=1000
    r = client.post("/v1/feedback-batches/import?format=trl", content=body, headers=keys.labeler)
    assert r.status_code == 413, r.text
    assert "over the limit of 1000 per batch" in r.json()["detail"]
    assert _rows(pg_db) == (0, 0)
    at_limit = client.post("/v1/feedback-batches/import?format=trl", content=b"".join(_trl_line(i) for i in range(1_000)),
                           headers=keys.labeler)
    assert at_limit.status_code == 201 and at_limit.json()["imported"] == 1_000


def _comparisons_of(db, batch_id: int) -> list[tuple[str, str, float | None]]:
    with db.session() as s:
        return [tuple(row) for row in s.execute(
            select(Comparison.response_a, Comparison.response_b, Comparison.strength)
            .where(Comparison.batch_id == batch_id).order_by(Comparison.position)
        )]


def test_strength_survives_a_trl_import_and_export(client, keys, pg_db):
    body = _trl_line(1, strength=2) + _trl_line(2) + _trl_line(3, strength=0.5)
    r = client.post("/v1/feedback-batches/import?format=trl", content=body, headers=keys.labeler)
    assert r.status_code == 201 and r.json()["skipped"] == 0, r.text
    batch_id = r.json()["batch"]["id"]
    assert _comparisons_of(pg_db, batch_id) == [("good 1", "bad 1", 2.0), ("good 2", "bad 2", None), ("good 3", "bad 3", 0.5)]
    exported = client.get(f"/v1/feedback-batches/{batch_id}/export?format=trl", headers=keys.labeler)
    assert [json.loads(line) for line in exported.text.splitlines()] == [
        {"prompt": "Q1", "chosen": "good 1", "rejected": "bad 1", "strength": 2.0},
        {"prompt": "Q2", "chosen": "good 2", "rejected": "bad 2"},
        {"prompt": "Q3", "chosen": "good 3", "rejected": "bad 3", "strength": 0.5},
    ]


def test_strength_survives_an_hh_import_and_export(client, keys, pg_db):
    lines = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes {i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: no {i}"}
             for i in range(3)]
    lines[0]["strength"], lines[2]["strength"] = 3.0, 1.0
    r = client.post("/v1/feedback-batches/import?format=hh-rlhf", content="\n".join(map(json.dumps, lines)),
                    headers=keys.labeler)
    assert r.status_code == 201 and r.json()["imported"] == 3, r.text
    exported = client.get(f"/v1/feedback-batches/{r.json()['batch']['id']}/export?format=hh-rlhf", headers=keys.labeler)
    assert [json.loads(line) for line in exported.text.splitlines()] == lines
    # the other format carries it too, and a B answer's strength is its chosen response's
    same = {"prompt": "Q", "response_a": "worse", "response_b": "better", "choice": "b", "rater_id": "r", "strength": 2}
    batch = client.post("/v1/feedback-batches", json={"source": "s", "comparisons": [same]}, headers=keys.labeler).json()
    trl = client.get(f"/v1/feedback-batches/{batch['id']}/export?format=trl", headers=keys.labeler)
    assert json.loads(trl.text) == {"prompt": "Q", "chosen": "better", "rejected": "worse", "strength": 2.0}


def test_a_bad_strength_is_a_skipped_line_with_its_reason(client, keys, pg_db):
    body = _trl_line(1, strength=2) + _trl_line(2, strength=0) + _trl_line(3, strength="much") + _trl_line(4, strength=11)
    r = client.post("/v1/feedback-batches/import?format=trl", content=body, headers=keys.labeler)
    assert r.status_code == 201, r.text
    assert r.json()["imported"] == 1
    assert r.json()["skipped_lines"] == [
        {"line": 2, "reason": "field 'strength': choice 'a' needs a strength above 0 (0 is a tie)"},
        {"line": 3, "reason": "field 'strength' must be a number, got str"},
        {"line": 4, "reason": "field 'strength': strength 11.0 is not a number from 0 to 10"},
    ]
    assert _comparisons_of(pg_db, r.json()["batch"]["id"]) == [("good 1", "bad 1", 2.0)]
    strict = client.post("/v1/feedback-batches/import?format=trl&strict=true", content=_trl_line(5, strength=-1),
                         headers=keys.labeler)
    assert strict.status_code == 422
    assert strict.json()["errors"] == [
        {"index": 1, "field": "line", "message": "field 'strength': strength -1.0 is not a number from 0 to 10"}]
