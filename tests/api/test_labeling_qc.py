"""Labeler quality control through the real app and PostgreSQL: the lease rules, gold tasks, overlap,
rater numbers, and raters left out of comparison snapshots (with lineage)."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from threading import Barrier

import pytest
from sqlalchemy import select, update

from store.cycles import finish_cycle, open_cycle
from store.datasets import snapshot_comparisons
from store.feedback import NewComparison, create_feedback_batch
from store.models import CHOICES, Comparison, ComparisonTask, TaskLease, utcnow
from store.errors import RaterExcluded
from store.raters import QCPolicy, excluded_raters, rater_stats, register_gold
from store.tasks import create_tasks, lease_tasks
from tests import builders
from tests.api.conftest import answer, batch_body, comparison, task_texts

LABELER = "labeler"
"""the labeler key's name, and so the rater it leases for by default"""


@pytest.fixture
def set_lease(pg_db):
    """``set_lease(task_id, rater_id, leased_until)``: move a lease's end (a lease that ran out, or a short one)."""

    def move(task_id: int, rater_id: str, leased_until) -> None:
        with pg_db.session() as s:
            s.execute(update(TaskLease).where(TaskLease.task_id == task_id, TaskLease.rater_id == rater_id)
                      .values(leased_until=leased_until))

    return move


@pytest.fixture
def task_rows(pg_db):
    """``task_rows(ids)``: task id -> (status, answers, kind, gold_id)."""

    def read(ids) -> dict[int, tuple]:
        with pg_db.session() as s:
            rows = s.execute(select(ComparisonTask.id, ComparisonTask.status, ComparisonTask.answers,
                                    ComparisonTask.kind, ComparisonTask.gold_id)
                             .where(ComparisonTask.id.in_(list(ids))))
            return {row[0]: tuple(row[1:]) for row in rows}

    return read


@pytest.fixture
def gold(client, keys):
    """``gold(n)``: register ``n`` gold comparisons through the API (choices a, b, tie in turn); their ids."""

    def register(n: int) -> list[int]:
        items = [{"prompt": f"\n\nHuman: gold {i}?\n\nAssistant:", "response_a": f" right {i}",
                  "response_b": f" wrong {i}", "choice": CHOICES[i % 3]} for i in range(n)]
        r = client.post("/v1/gold-comparisons", json={"comparisons": items}, headers=keys.operator)
        assert r.status_code == 201, r.text
        assert r.json()["count"] == n
        return r.json()["ids"]

    return register


# -- the lease rules --------------------------------------------------------------------------


def test_a_labeler_answers_a_task_it_holds_and_the_task_is_done(labeling, keys, make_tasks, task_rows, pg_db):
    make_tasks(1)
    [task] = labeling.lease(keys.labeler)
    r = labeling.post(keys.labeler, [answer(task, LABELER)])
    assert r.status_code == 201, r.text
    assert task_rows([task["id"]]) == {task["id"]: ("done", 1, "train", None)}
    with pg_db.session() as s:
        assert s.scalar(select(TaskLease.answered_at).where(TaskLease.task_id == task["id"])) is not None
    assert labeling.lease(keys.labeler) == []


def test_answering_a_task_not_leased_to_the_rater_is_409_naming_the_task(labeling, keys, make_tasks, written):
    never, held = make_tasks(2)
    [other] = labeling.lease(keys.labeler, limit=1, rater_id="rater-2")
    assert other["id"] == never
    before = written()
    r = labeling.post(keys.labeler, [answer({"id": held, **task_texts(1)}, LABELER)])
    assert r.status_code == 409
    assert f"comparison task {held} is not leased to rater 'labeler'" in r.json()["detail"]
    r = labeling.post(keys.labeler, [answer(other, LABELER)])  # leased, but to another rater
    assert r.status_code == 409 and f"comparison task {never} is not leased" in r.json()["detail"]
    assert written() == before


def test_answering_after_the_lease_ran_out_is_409(labeling, keys, make_tasks, set_lease, written):
    make_tasks(1)
    [task] = labeling.lease(keys.labeler)
    set_lease(task["id"], LABELER, utcnow() - timedelta(seconds=1))
    before = written()
    r = labeling.post(keys.labeler, [answer(task, LABELER)])
    assert r.status_code == 409
    assert f"the lease of rater 'labeler' on comparison task {task['id']} ran out" in r.json()["detail"]
    assert written() == before


def test_answering_twice_is_409_already_answered(labeling, keys, make_tasks, written):
    make_tasks(1)
    [task] = labeling.lease(keys.labeler)
    assert labeling.post(keys.labeler, [answer(task, LABELER)], idempotency_key="first").status_code == 201
    before = written()
    again = labeling.post(keys.labeler, [answer(task, LABELER, choice="b")], idempotency_key="second")
    assert again.status_code == 409
    assert f"comparison task {task['id']} was already answered by rater 'labeler'" in again.json()["detail"]
    assert written() == before


def test_the_same_batch_replayed_with_its_idempotency_key_is_a_200_replay(labeling, keys, make_tasks, written):
    make_tasks(2)
    tasks = labeling.lease(keys.labeler)
    first = labeling.post(keys.labeler, [answer(t, LABELER) for t in tasks], idempotency_key="page-1")
    assert first.status_code == 201, first.text
    before = written()
    again = labeling.post(keys.labeler, [answer(t, LABELER) for t in tasks], idempotency_key="page-1")
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert written() == before


def test_texts_that_differ_from_the_task_are_422_naming_index_and_field(labeling, keys, make_tasks, written):
    make_tasks(3)
    t0, t1, t2 = labeling.lease(keys.labeler)
    before = written()
    r = labeling.post(keys.labeler, [
        answer(t0, LABELER, prompt=t0["prompt"] + " (edited)"),
        answer(t1, LABELER, response_a="something else"),
        answer(t2, LABELER, response_b=t2["response_a"] + "!"),
    ])
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert [(e["index"], e["field"]) for e in errors] == [(0, "prompt"), (1, "response_a"), (2, "response_b")]
    assert f"comparison task {t1['id']} shows" in errors[1]["message"]
    assert written() == before
    # nothing was taken: the leases still hold, and the right answers go in
    assert labeling.post(keys.labeler, [answer(t, LABELER) for t in (t0, t1, t2)]).status_code == 201


def test_the_same_task_twice_in_one_batch_is_422(labeling, keys, make_tasks, written):
    make_tasks(1)
    [task] = labeling.lease(keys.labeler)
    before = written()
    r = labeling.post(keys.labeler, [answer(task, LABELER), answer(task, LABELER, choice="b")])
    assert r.status_code == 422
    [error] = r.json()["errors"]
    assert (error["index"], error["field"]) == (1, "task_id") and "twice in this batch" in error["message"]
    assert written() == before


def test_renew_extends_the_lease_and_is_409_without_one(client, labeling, keys, make_tasks, set_lease, pg_db):
    make_tasks(2)
    [task] = labeling.lease(keys.labeler, limit=1)
    short = utcnow() + timedelta(seconds=5)
    set_lease(task["id"], LABELER, short)
    r = client.post(f"/v1/comparison-tasks/{task['id']}/renew", headers=keys.labeler)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["task_id"], body["rater_id"], body["released"]) == (task["id"], LABELER, False)
    with pg_db.session() as s:
        until = s.scalar(select(TaskLease.leased_until).where(TaskLease.task_id == task["id"]))
    assert until >= short + timedelta(seconds=590)  # the default lease is 600 s from now
    other = task["id"] + 1
    r = client.post(f"/v1/comparison-tasks/{other}/renew", headers=keys.labeler)
    assert r.status_code == 409 and f"comparison task {other} is not leased" in r.json()["detail"]
    set_lease(task["id"], LABELER, utcnow() - timedelta(seconds=1))
    r = client.post(f"/v1/comparison-tasks/{task['id']}/renew", headers=keys.labeler)
    assert r.status_code == 409 and "ran out" in r.json()["detail"]
    assert client.post("/v1/comparison-tasks/99999/renew", headers=keys.labeler).status_code == 404


def test_a_released_task_goes_to_another_rater_at_once_and_never_back(client, labeling, keys, make_tasks, set_lease):
    make_tasks(1)
    [task] = labeling.lease(keys.labeler)
    r = client.post(f"/v1/comparison-tasks/{task['id']}/release", headers=keys.labeler)
    assert r.status_code == 200 and r.json()["released"] is True
    assert labeling.lease(keys.labeler) == []
    [taken] = labeling.lease(keys.labeler, rater_id="rater-2")
    assert taken["id"] == task["id"]
    # rater-2's lease runs out: the task is free again, but not for the rater that skipped it
    set_lease(task["id"], "rater-2", utcnow() - timedelta(seconds=1))
    assert labeling.lease(keys.labeler) == []
    assert [t["id"] for t in labeling.lease(keys.labeler, rater_id="rater-3")] == [task["id"]]
    r = labeling.post(keys.labeler, [answer(task, LABELER)])
    assert r.status_code == 409 and f"rater 'labeler' released comparison task {task['id']}" in r.json()["detail"]
    r = client.post(f"/v1/comparison-tasks/{task['id']}/release", headers=keys.labeler)
    assert r.status_code == 409


def test_an_expired_lease_returns_the_task_to_the_pool(labeling, keys, make_tasks, set_lease, task_rows):
    make_tasks(1)
    [task] = labeling.lease(keys.labeler)
    assert labeling.lease(keys.labeler, rater_id="rater-2") == []  # held
    set_lease(task["id"], LABELER, utcnow() - timedelta(seconds=1))
    [taken] = labeling.lease(keys.labeler, rater_id="rater-2")
    assert taken["id"] == task["id"]
    assert labeling.post(keys.labeler, [answer(taken, "rater-2")]).status_code == 201
    assert task_rows([task["id"]])[task["id"]][:2] == ("done", 1)


def test_a_finished_cycles_tasks_are_closed_never_leased_and_409_when_answered(
    client, labeling, keys, make_tasks, task_rows, written, pg_db
):
    with pg_db.session() as s:
        cycle_id = open_cycle(s, week="2026-W10")[0].id
    ids = make_tasks(2, cycle_id=cycle_id)
    [task] = labeling.lease(keys.labeler, limit=1)
    with pg_db.session() as s:
        finish_cycle(s, cycle_id=cycle_id, status="succeeded")
    assert {status for status, *_ in task_rows(ids).values()} == {"closed"}
    before = written()
    r = labeling.post(keys.labeler, [answer(task, LABELER)])
    assert r.status_code == 409 and f"comparison task {task['id']} is closed" in r.json()["detail"]
    assert written() == before
    assert labeling.lease(keys.labeler, rater_id="rater-2") == []
    r = client.get(f"/v1/comparison-tasks?cycle_id={cycle_id}&rater_id=rater-2", headers=keys.labeler)
    assert r.status_code == 200 and r.json()["count"] == 0


def test_an_operator_key_cannot_answer_a_task_as_another_rater(labeling, keys, make_tasks, written):
    make_tasks(1)
    [task] = labeling.lease(keys.labeler)
    before = written()
    r = labeling.post(keys.operator, [answer(task, LABELER)])
    assert r.status_code == 409
    assert f"comparison task {task['id']} is not leased to rater 'labeler' under this API key" in r.json()["detail"]
    assert written() == before
    assert labeling.post(keys.labeler, [answer(task, LABELER)]).status_code == 201


def test_a_rater_that_leased_under_one_key_cannot_lease_under_another(client, labeling, keys, make_tasks, labeler_key):
    make_tasks(3)
    [task] = labeling.lease(keys.labeler, limit=1)
    vendor = labeler_key("vendor-2")
    for headers in (keys.operator, vendor):
        r = client.get(f"/v1/comparison-tasks?rater_id={LABELER}", headers=headers)
        assert r.status_code == 409 and "another API key" in r.json()["detail"]
        r = client.post(f"/v1/comparison-tasks/{task['id']}/renew?rater_id={LABELER}", headers=headers)
        assert r.status_code == 409
    assert [t["id"] for t in labeling.lease(vendor, limit=1, rater_id="vendor-rater")] == [task["id"] + 1]


def test_a_refused_batch_writes_nothing_even_where_most_of_it_is_right(
    labeling, keys, make_tasks, set_lease, written
):
    make_tasks(3)
    tasks = labeling.lease(keys.labeler)
    set_lease(tasks[2]["id"], LABELER, utcnow() - timedelta(seconds=1))
    before = written()
    r = labeling.post(keys.labeler, [answer(t, LABELER) for t in tasks] + [comparison(0)])
    assert r.status_code == 409 and f"comparison task {tasks[2]['id']}" in r.json()["detail"]
    assert written() == before
    r = labeling.post(keys.labeler, [answer(t, LABELER) for t in tasks[:2]] + [comparison(0, choice="maybe")])
    assert r.status_code == 422
    assert written() == before
    assert labeling.post(keys.labeler, [answer(t, LABELER) for t in tasks[:2]]).status_code == 201


def test_a_batch_without_task_ids_keeps_the_fast_path(client, labeling, keys, make_tasks, monkeypatch, written):
    import api.routes.feedback_batches as routes

    threaded = []
    real = routes._register

    def spy(*args, **kwargs):
        threaded.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(routes, "_register", spy)
    r = client.post("/v1/feedback-batches", json=batch_body(3), headers=keys.labeler)
    assert r.status_code == 201 and r.json()["comparison_count"] == 3
    assert threaded == [] and written().comparisons == 3
    make_tasks(1)
    [task] = labeling.lease(keys.labeler)
    assert labeling.post(keys.labeler, [answer(task, LABELER)]).status_code == 201
    assert threaded == [1]  # an answer to a task goes the path that checks the lease rules


# -- gold -------------------------------------------------------------------------------------


def known_answers(pg_db, task_ids: list[int]) -> dict[int, str | None]:
    """task id -> its known answer (gold tasks), as the store keeps it."""
    with pg_db.session() as s:
        return dict(s.execute(select(ComparisonTask.id, ComparisonTask.expected_choice)
                              .where(ComparisonTask.id.in_(task_ids))).all())


def test_gold_is_about_a_tenth_of_what_a_rater_is_handed_and_looks_like_any_task(
    labeling, keys, make_tasks, gold, task_rows, pg_db
):
    gold(100)
    make_tasks(200)
    handed: list[dict] = []
    while page := labeling.lease(keys.labeler, limit=10):
        handed += page
        # a good rater: right on gold (quality control would hand a poor one no more tasks)
        expected = known_answers(pg_db, [t["id"] for t in page])
        r = labeling.post(keys.labeler, [answer(t, LABELER, expected.get(t["id"]) or "a") for t in page])
        assert r.status_code == 201, r.text
    rows = task_rows([t["id"] for t in handed])
    golds = [t for t in handed if rows[t["id"]][2] == "gold"]
    trains = [t for t in handed if rows[t["id"]][2] == "train"]
    assert len(trains) == 200 and len(golds) + len(trains) == len(handed)
    assert abs(len(golds) / len(handed) - 0.1) <= 0.04, (len(golds), len(handed))
    gold_ids = [rows[t["id"]][3] for t in golds]
    assert len(set(gold_ids)) == len(gold_ids)  # each gold comparison shown once to this rater
    assert {tuple(sorted(t)) for t in handed} == {tuple(sorted(trains[0]))}  # the same keys on every task
    assert not {"kind", "expected_choice", "gold_id", "candidate_side"} & set(golds[0])


def test_a_gold_comparison_is_never_handed_to_the_same_rater_twice(labeling, keys, make_tasks, gold, task_rows):
    gold(2)
    shown: dict[str, list[int]] = {}
    for start, rater in ((0, "rater-1"), (100, "rater-2")):
        make_tasks(60, start=start)
        while page := labeling.lease(keys.labeler, limit=10, rater_id=rater):
            rows = task_rows([t["id"] for t in page])
            shown.setdefault(rater, []).extend(rows[t["id"]][3] for t in page if rows[t["id"]][2] == "gold")
            assert labeling.post(keys.labeler, [answer(t, rater) for t in page]).status_code == 201
    # the share asked for six, but two are all there are: each shown once, to each rater
    assert sorted(shown["rater-1"]) == sorted(shown["rater-2"]) and len(set(shown["rater-1"])) == 2
    assert len(shown["rater-1"]) == 2


@pytest.mark.parametrize("share", [0.1, 0.5])
def test_every_page_keeps_the_gold_share_within_one_task(pg_db, share):
    # store.tasks: gold is held within one task of the exact share over everything the rater was
    # handed, page after page (a page is not filled with gold in place of the real tasks it was to hold)
    with pg_db.session() as s:
        register_gold(s, items=[{"prompt": f"gold {i}", "response_a": "x", "response_b": "y", "choice": "a"}
                                for i in range(60)])
        create_tasks(s, tasks=[task_texts(i) for i in range(60)])
    rng, handed, golds = random.Random(3), 0, 0
    for _ in range(6):
        with pg_db.session() as s:
            page = lease_tasks(s, rater_id="rater-1", limit=10, lease=timedelta(minutes=10), gold_share=share, rng=rng)
            kinds = [leased.task.kind for leased in page]
        assert len(kinds) == 10 and "train" in kinds
        handed, golds = handed + len(kinds), golds + kinds.count("gold")
        assert abs(golds - share * handed) <= 1, (kinds, golds, handed)


def test_quality_control_is_for_operators_only(client, keys):
    one = {"comparisons": [{"prompt": "p", "response_a": "x", "response_b": "y", "choice": "a"}]}
    assert client.get("/v1/raters", headers=keys.labeler).status_code == 403
    assert client.get("/v1/raters/someone", headers=keys.labeler).status_code == 403
    assert client.post("/v1/gold-comparisons", json=one, headers=keys.labeler).status_code == 403
    assert client.post("/v1/gold-comparisons/retire", json={"ids": [1]}, headers=keys.labeler).status_code == 403
    r = client.put("/v1/raters/someone/decision", json={"decision": "exclude"}, headers=keys.labeler)
    assert r.status_code == 403


# -- overlap ----------------------------------------------------------------------------------


def test_an_overlap_task_goes_to_two_distinct_raters_and_is_done_after_the_second_answer(
    labeling, keys, make_tasks, task_rows
):
    ids = make_tasks(2, answers_needed=2)
    first = labeling.lease(keys.labeler, rater_id="rater-1")
    second = labeling.lease(keys.labeler, rater_id="rater-2")
    assert [t["id"] for t in first] == [t["id"] for t in second] == ids
    assert labeling.lease(keys.labeler, rater_id="rater-3") == []  # both places held
    assert labeling.lease(keys.labeler, rater_id="rater-1") == []  # never twice to one rater
    assert labeling.post(keys.labeler, [answer(t, "rater-1") for t in first]).status_code == 201
    assert {row[:2] for row in task_rows(ids).values()} == {("open", 1)}
    assert labeling.lease(keys.labeler, rater_id="rater-1") == []
    r = labeling.post(keys.labeler, [answer(t, "rater-1", choice="b") for t in first])
    assert r.status_code == 409 and "already answered" in r.json()["detail"]
    assert labeling.post(keys.labeler, [answer(t, "rater-2") for t in second]).status_code == 201
    assert {row[:2] for row in task_rows(ids).values()} == {("done", 2)}
    assert labeling.lease(keys.labeler, rater_id="rater-3") == []


def test_agreement_is_kappa_against_the_other_raters_on_the_same_tasks(client, labeling, keys, make_tasks):
    overlap = make_tasks(4, answers_needed=2)
    make_tasks(3, start=10)  # answered by rater-1 alone: no pair
    choices = {"rater-1": dict(zip(overlap, "aabb")), "rater-2": dict(zip(overlap, "aaba"))}
    for rater, mine in choices.items():
        tasks = labeling.lease(keys.labeler, rater_id=rater)
        assert labeling.post(keys.labeler, [answer(t, rater, mine.get(t["id"], "a")) for t in tasks]).status_code == 201
    r = client.get("/v1/raters", headers=keys.operator)
    assert r.status_code == 200, r.text
    by_rater = {row["rater_id"]: row for row in r.json()["data"]}
    # rater-1's pairs (a,a) (a,a) (b,b) (b,a): p_o = 3/4, p_e = 1/2 * 3/4 + 1/2 * 1/4 = 1/2, kappa = 1/2;
    # rater-2's are the same pairs turned round: the same kappa
    for rater, answered in (("rater-1", 7), ("rater-2", 4)):
        row = by_rater[rater]
        assert (row["answered"], row["agreement_pairs"]) == (answered, 4)
        assert row["kappa"] == pytest.approx(0.5)
        assert not row["flagged"]


# -- rater numbers, flags and exclusion ---------------------------------------------------------

CAREFUL_SECONDS = 10
"""the careful rater took 10 s on its first answered task, 20 s on the second, and so on"""


@pytest.fixture
def qc_raters(pg_db) -> dict[str, list[int]]:
    """Two raters through the store, under no key: ``careful`` answers every gold task right, ``careless``
    answers every gold task wrong and the others at random; each is handed tasks half of them gold until it answered ten gold tasks. Every
    ``careful`` lease took ``CAREFUL_SECONDS`` more than the one before. Returns rater -> its batch ids."""
    rng = random.Random(20)
    batches: dict[str, list[int]] = {}
    with pg_db.session() as s:
        register_gold(s, items=[{"prompt": f"gold {i}", "response_a": f"good {i}", "response_b": f"bad {i}",
                                 "choice": CHOICES[i % 3]} for i in range(20)])
        create_tasks(s, tasks=[task_texts(i) for i in range(100)])
    for rater in ("careful", "careless"):
        gold_answered = 0
        while gold_answered < 10:
            with pg_db.session() as s:
                page = lease_tasks(s, rater_id=rater, limit=10, lease=timedelta(minutes=10), gold_share=0.5, rng=rng)
                answers = []
                for leased in page:
                    t = leased.task
                    if t.kind == "gold":
                        right = rater == "careful"
                        choice = t.expected_choice if right else rng.choice([c for c in CHOICES if c != t.expected_choice])
                    else:
                        choice = rng.choice(CHOICES)
                    gold_answered += t.kind == "gold"
                    answers.append(NewComparison(prompt=t.prompt, response_a=t.response_a, response_b=t.response_b,
                                                 choice=choice, rater_id=rater, task_id=t.id))
                row, _ = create_feedback_batch(s, source=f"vendor-{rater}", comparisons=answers)
                batches.setdefault(rater, []).append(row.id)
    with pg_db.session() as s:
        leases = s.scalars(select(TaskLease).where(TaskLease.rater_id == "careful").order_by(TaskLease.id)).all()
        for i, lease in enumerate(leases):
            lease.leased_at = lease.answered_at - timedelta(seconds=CAREFUL_SECONDS * (i + 1))
    return batches


def comparisons_by(pg_db, rater: str, *, gold: bool | None = None) -> int:
    with pg_db.session() as s:
        query = select(Comparison.id).outerjoin(ComparisonTask, ComparisonTask.id == Comparison.task_id) \
            .where(Comparison.rater_id == rater)
        if gold is not None:
            query = query.where((ComparisonTask.kind == "gold") == gold)
        return len(s.scalars(query).all())


def test_rater_numbers_accuracy_flags_and_median_seconds(client, keys, pg_db, qc_raters):
    with pg_db.session() as s:
        n_careful = len(s.scalars(select(TaskLease.id).where(TaskLease.rater_id == "careful")).all())
        stats = {r.rater_id: r for r in rater_stats(s, QCPolicy())}
    r = client.get("/v1/raters", headers=keys.operator)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["policy"] == QCPolicy().model_dump()
    assert body["gold"] == {"registered": 20, "active": 20, "retired": 0}
    rows = {row["rater_id"]: row for row in body["data"]}
    assert set(rows) == {"careful", "careless"}
    for row in rows.values():
        assert set(row) >= {"answered", "gold_accuracy", "kappa", "median_seconds", "flagged", "excluded"}
    careful, careless = rows["careful"], rows["careless"]
    assert careful["answered"] == comparisons_by(pg_db, "careful") == n_careful
    assert careful["gold_answered"] >= 10 and careful["gold_accuracy"] == 1.0
    assert (careful["flagged"], careful["flags"], careful["excluded"], careful["kappa"]) == (False, [], False, None)
    # median of 10, 20, ..., 10 n seconds
    assert careful["median_seconds"] == pytest.approx(CAREFUL_SECONDS * (n_careful + 1) / 2)
    assert careless["gold_answered"] >= 10 and careless["gold_accuracy"] < 0.6
    assert careless["flagged"] and careless["excluded"]
    assert careless["flags"] == stats["careless"].flags and "gold accuracy" in careless["flags"][0]
    assert careless["median_seconds"] is not None
    one = client.get("/v1/raters/careless", headers=keys.operator)
    assert one.status_code == 200 and one.json() == careless
    assert client.get("/v1/raters/nobody", headers=keys.operator).status_code == 404


def snapshot(pg_db, artifacts, policy: QCPolicy = QCPolicy()) -> tuple:
    """A comparison snapshot leaving out the raters ``policy`` excludes now: (dataset, created, its records)."""
    with pg_db.session() as s:
        dataset, created = snapshot_comparisons(s, artifacts=artifacts, excluded_raters=excluded_raters(s, policy))
        art, meta, version, dataset_id = dataset.artifact, dict(dataset.meta), dataset.version, dataset.id
    records = [json.loads(line) for line in artifacts.read_bytes(art.uri, art.sha256).decode().splitlines()]
    return dataset_id, version, created, meta, records


def test_a_flagged_raters_comparisons_are_left_out_of_a_snapshot(pg_db, artifacts, qc_raters):
    with pg_db.session() as s:
        reasons = excluded_raters(s, QCPolicy())
    assert set(reasons) == {"careless"} and reasons["careless"].startswith("gold accuracy")
    _, version, created, _, records = snapshot(pg_db, artifacts)
    assert created and version == 1
    assert {r["rater_id"] for r in records} == {"careful"}
    assert len(records) == comparisons_by(pg_db, "careful", gold=False)


def test_the_snapshot_and_the_lineage_of_its_pm_name_the_rater_left_out(client, keys, pg_db, artifacts, qc_raters):
    dataset_id, _, _, meta, _ = snapshot(pg_db, artifacts)
    with pg_db.session() as s:
        pm_id = builders.pm(s, dataset_id=dataset_id).id
        reason = excluded_raters(s, QCPolicy())["careless"]
    left_out = {"rater_id": "careless", "reason": reason, "comparisons": comparisons_by(pg_db, "careless")}
    assert meta["excluded_raters"] == [left_out]
    r = client.get(f"/v1/preference-models/{pm_id}/lineage", headers=keys.labeler)
    assert r.status_code == 200, r.text
    assert r.json()["exclusions"] == [{"dataset_id": dataset_id, **left_out}]


def test_operators_include_a_flagged_rater_clear_the_decision_and_exclude_a_good_one(
    client, keys, pg_db, artifacts, qc_raters
):
    first_id, *_ = snapshot(pg_db, artifacts)
    careless = comparisons_by(pg_db, "careless", gold=False)

    r = client.put("/v1/raters/careless/decision", json={"decision": "include", "reason": "retrained"},
                   headers=keys.operator)
    assert r.status_code == 200 and r.json()["decision"] == "include" and r.json()["actor"] == "operator"
    row = client.get("/v1/raters/careless", headers=keys.operator).json()
    assert (row["flagged"], row["excluded"], row["decision"], row["decision_reason"]) == (
        True, False, "include", "retrained")
    included_id, version, created, meta, records = snapshot(pg_db, artifacts)
    assert created and version == 2 and included_id != first_id
    assert sum(r["rater_id"] == "careless" for r in records) == careless and meta["excluded_raters"] == []

    r = client.put("/v1/raters/careless/decision", json={"decision": None}, headers=keys.operator)
    assert r.status_code == 200 and r.json()["decision"] is None
    assert client.get("/v1/raters/careless", headers=keys.operator).json()["excluded"] is True
    again_id, _, created, _, _ = snapshot(pg_db, artifacts)
    assert (again_id, created) == (first_id, False)  # the same comparisons: the same version

    with pg_db.session() as s:
        builders.batch(s, n=2)  # a third rater's, so something is left when both are out
    r = client.put("/v1/raters/careful/decision", json={"decision": "exclude", "reason": "left the vendor"},
                   headers=keys.operator)
    assert r.status_code == 200
    row = client.get("/v1/raters/careful", headers=keys.operator).json()
    assert (row["flagged"], row["excluded"], row["decision"]) == (False, True, "exclude")
    with pg_db.session() as s:
        assert excluded_raters(s, QCPolicy())["careful"] == "excluded by an operator: left the vendor"
    _, version, created, _, records = snapshot(pg_db, artifacts)
    assert created and version == 3 and {r["rater_id"] for r in records} == {"r1"}
    r = client.put("/v1/raters/careful/decision", json={"decision": "maybe"}, headers=keys.operator)
    assert r.status_code == 422


def test_gold_answers_never_enter_a_snapshot(pg_db, artifacts, qc_raters):
    gold_answers = comparisons_by(pg_db, "careful", gold=True) + comparisons_by(pg_db, "careless", gold=True)
    assert gold_answers >= 20
    _, _, _, meta, records = snapshot(pg_db, artifacts, QCPolicy(exclude_flagged=False))
    with pg_db.session() as s:
        gold_tasks = set(s.scalars(select(ComparisonTask.id).where(ComparisonTask.kind == "gold")))
    assert records and not {r.get("task_id") for r in records} & gold_tasks
    assert len(records) == comparisons_by(pg_db, "careful", gold=False) + comparisons_by(pg_db, "careless", gold=False)
    assert meta["excluded_gold_comparisons"] == gold_answers and meta["excluded_raters"] == []


# -- strength -----------------------------------------------------------------------------------


def test_strength_is_stored_and_checked_against_the_choice(labeling, keys, make_tasks, pg_db, written):
    r = labeling.post(keys.labeler, [comparison(0, choice="a", strength=2)])
    assert r.status_code == 201, r.text
    make_tasks(2)
    task, held = labeling.lease(keys.labeler)
    assert labeling.post(keys.labeler, [answer(task, LABELER, choice="tie", strength=0)]).status_code == 201
    with pg_db.session() as s:
        stored = dict(s.execute(select(Comparison.choice, Comparison.strength)).all())
    assert stored == {"a": 2.0, "tie": 0.0}
    before = written()
    for record in (comparison(1, choice="tie", strength=1), comparison(2, choice="b", strength=0),
                   answer(held, LABELER, choice="tie", strength=1), answer(held, LABELER, choice="b", strength=0)):
        r = labeling.post(keys.labeler, [comparison(0), record])  # without a task id, and with one
        assert r.status_code == 422, r.text
        assert [(e["index"], e["field"]) for e in r.json()["errors"]] == [(1, "strength")]
    assert written() == before


def test_a_fast_random_rater_does_not_drag_honest_raters_under_the_agreement_line(pg_db):
    # 60 overlap tasks for three raters; "spam" answers every one at random (and every gold task wrong),
    # "careful" and "honest" each give the right answer 19 times in 20 (kappa between them about 0.8).
    # Pooled over everyone, half of their answer pairs would be with spam, and their kappa about 0.4:
    # under the 0.6 line. Against the trusted raters (gold flags spam) it stays over it.
    rng = random.Random(7)
    with pg_db.session() as s:
        register_gold(s, items=[{"prompt": f"gold {i}", "response_a": f"good {i}", "response_b": f"bad {i}",
                                 "choice": "a"} for i in range(10)])
        create_tasks(s, tasks=[{**task_texts(i), "answers_needed": 3} for i in range(60)])
    truth = {}
    for rater in ("spam", "careful", "honest"):
        with pg_db.session() as s:
            page = lease_tasks(s, rater_id=rater, limit=70, lease=timedelta(minutes=10), gold_share=0.14, rng=rng)
            answers = []
            for leased in page:
                t = leased.task
                if t.kind == "gold":
                    choice = {"a": "b", "b": "a", "tie": "a"}[t.expected_choice] if rater == "spam" else t.expected_choice
                elif rater == "spam":
                    choice = rng.choice(CHOICES)
                else:
                    right = truth.setdefault(t.id, rng.choice(("a", "b")))
                    choice = right if rng.random() < 0.95 else {"a": "b", "b": "a"}[right]
                answers.append(NewComparison(prompt=t.prompt, response_a=t.response_a, response_b=t.response_b,
                                             choice=choice, rater_id=rater, task_id=t.id))
            create_feedback_batch(s, source=rater, comparisons=answers)
    policy = QCPolicy(min_gold_answers=5, min_agreement_pairs=20, min_agreement=0.6)
    with pg_db.session() as s:
        stats = {r.rater_id: r for r in rater_stats(s, policy)}
    assert stats["spam"].gold_accuracy == 0.0 and stats["spam"].excluded(policy)
    for rater in ("careful", "honest"):
        assert stats[rater].agreement_pairs == 60  # with the other trusted rater only
        assert stats[rater].kappa > 0.6 and not stats[rater].flagged, (rater, stats[rater].kappa)


def test_a_rater_left_out_is_handed_no_tasks_until_an_operator_includes_it(client, keys, make_tasks, qc_raters, pg_db):
    make_tasks(3)
    with pg_db.session() as s:
        with pytest.raises(RaterExcluded, match="'careless' is handed no tasks: gold accuracy"):
            lease_tasks(s, rater_id="careless", limit=5, lease=timedelta(minutes=5), qc=QCPolicy())
        assert lease_tasks(s, rater_id="careful", limit=1, lease=timedelta(minutes=5), qc=QCPolicy())
    r = client.put("/v1/raters/careless/decision", json={"decision": "include", "reason": "retrained"},
                   headers=keys.operator)
    assert r.status_code == 200
    with pg_db.session() as s:
        assert lease_tasks(s, rater_id="careless", limit=1, lease=timedelta(minutes=5), qc=QCPolicy())
    # through the API: an operator's exclusion of the key's own rater is a 403 saying why
    r = client.put(f"/v1/raters/{LABELER}/decision", json={"decision": "exclude", "reason": "left the team"},
                   headers=keys.operator)
    assert r.status_code == 200
    r = client.get("/v1/comparison-tasks", headers=keys.labeler)
    assert r.status_code == 403 and "excluded by an operator: left the team" in r.json()["detail"]


def test_raters_leasing_at_once_get_full_pages_of_different_tasks(pg_db, make_tasks):
    # A task another rater leased and committed while this lease's statement ran is locked all the same;
    # it is counted out under the lock and made up from the next tasks, so pages do not come back short.
    make_tasks(400)
    raters = [f"rater-{i}" for i in range(8)]
    start = Barrier(len(raters))

    def lease_pages(rater: str) -> list[list[int]]:
        pages = []
        start.wait()
        for _ in range(4):
            with pg_db.session() as s:
                pages.append([t.task.id for t in lease_tasks(s, rater_id=rater, limit=10, lease=timedelta(minutes=5))])
        return pages

    with ThreadPoolExecutor(len(raters)) as pool:
        pages = [page for result in pool.map(lease_pages, raters) for page in result]
    assert [len(p) for p in pages] == [10] * len(pages)
    ids = [i for p in pages for i in p]
    assert len(set(ids)) == len(ids) == 320
