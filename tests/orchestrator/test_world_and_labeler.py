"""The demo world (prompts, corpus, gold preference) and the simulated labeler over the real REST API."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from orchestrator.demo.command import free_weeks
from orchestrator.demo.labeler import SimulatedLabeler
from store.cycles import open_cycle
from store.keys import create_api_key
from store.models import Comparison, ComparisonTask, FeedbackBatch, TaskLease
from store.settings import Settings
from store.tasks import create_tasks
from workers import demo_world as world


def test_the_world_has_a_few_hundred_distinct_benign_and_harmful_requests():
    prompts = world.all_prompts()
    assert len(prompts) == len({p.text for p in prompts}) == len({p.id for p in prompts}) == 768
    assert sum(p.topic.harmful for p in prompts) == 384
    train, held_out = world.prompts("train"), world.prompts("eval")
    assert len(train) + len(held_out) == 768 and not {p.id for p in train} & {p.id for p in held_out}
    assert any(p.topic.harmful for p in held_out) and not all(p.topic.harmful for p in held_out)
    assert world.prompts("eval") == held_out  # deterministic


def test_gold_refuses_harmful_requests_and_answers_benign_ones():
    bread = world.dialogue("How do I bake bread?")
    bomb = world.dialogue("Can you tell me how to build a bomb today?")
    answer = " Sure! To bake bread, first mix flour, water and yeast, then bake the bread until it is golden."
    refusal = " Sorry, I can't help with that."
    assert world.gold_score(bread, answer) == 1.0
    assert world.gold_score(bread, " Sure! To do it, first start, then finish.") == 0.5  # helpful, off topic
    assert world.gold_score(bread, refusal) == -1.0
    assert world.gold_score(bomb, refusal) == 1.0
    assert world.gold_score(bomb, " Sure! To build a bomb, first get the parts, then put the bomb together.") == -1.0
    assert world.gold_score(bomb, " Sorry, first then") == 0.0 and world.gold_score(bomb, " blue") == -0.5
    # refusing everything or answering everything is worth nothing on average: only telling them apart pays
    table = list(world.iter_world())
    refuse_all = [g for _, r, g in table if r in world.REFUSALS]
    assert abs(sum(refuse_all) / len(refuse_all)) < 1e-9


def test_the_corpus_teaches_both_answers_and_refusals_with_a_lean_to_the_right_one():
    corpus = world.corpus()
    assert len(corpus) == 3 * len(world.prompts("train"))
    right = sum(world.gold_score(r["prompt"], r["response"]) == 1.0 for r in corpus)
    assert right == 2 * len(world.prompts("train"))
    assert len(world.corpus(correct_weight=1)) == 2 * len(world.prompts("train"))


def test_the_labeler_judges_by_gold_and_posts_one_batch_through_the_api(pg_db, artifacts, tmp_path):
    bread, bomb = world.dialogue("How do I bake bread?"), world.dialogue("How do I build a bomb?")
    answer = world.answer(world.BENIGN[0])
    with pg_db.session() as s:
        cycle, _ = open_cycle(s, week="2026-W45")
        token = create_api_key(s, name="vendor", role="labeler")[1]
        create_tasks(s, cycle_id=cycle.id, tasks=[
            {"prompt": bread, "response_a": world.REFUSALS[0], "response_b": answer},
            {"prompt": bomb, "response_a": world.REFUSALS[0], "response_b": " Sure! To build a bomb, first x."},
            {"prompt": bomb, "response_a": world.REFUSALS[0], "response_b": world.REFUSALS[1]},
        ])
    app = create_app(Settings(home=tmp_path), database=pg_db, artifacts=artifacts)
    with TestClient(app) as client:
        labeler = SimulatedLabeler("", token, gold=world.gold_score, noise=0.0, client=client)
        assert labeler.label_once() == 3
        assert labeler.label_once() == 0  # every task is done
    with pg_db.session() as s:
        answers = [(c.choice, c.strength, c.rater_id) for c in s.scalars(select(Comparison).order_by(Comparison.position))]
        # right against wrong is a gold gap of 2: "much better" (3); two refusals of a harmful request: a tie (0)
        assert answers == [("b", 3.0, "sim-labeler-1"), ("a", 3.0, "sim-labeler-1"), ("tie", 0.0, "sim-labeler-1")]
        batch = s.scalar(select(FeedbackBatch))
        assert (batch.source, batch.comparison_count) == ("simulated-labeler", 3)
        assert batch.idempotency_key.startswith("sim-labeler-1:")
        assert {t.status for t in s.scalars(select(ComparisonTask))} == {"done"}
        # the labeler leased under its own rater id with the vendor's key (GET ...?rater_id=sim-labeler-1)
        assert {lease.rater_id for lease in s.scalars(select(TaskLease))} == {"sim-labeler-1"}
    assert (labeler.stats.batches, labeler.stats.comparisons, labeler.stats.ties) == (1, 3, 1)


def test_demo_weeks_start_this_week_or_after_the_newest_cycle(pg_db):
    now = datetime(2026, 11, 23, tzinfo=UTC)
    assert free_weeks(pg_db, 3, now=now) == ["2026-W48", "2026-W49", "2026-W50"]
    with pg_db.session() as s:
        open_cycle(s, week="2026-W52")
    assert free_weeks(pg_db, 2, now=now) == ["2026-W53", "2027-W01"]
