"""The demo's three raters (careful, noisy, random), its gold comparisons and its quality-control settings.

The judgement tests run on hand-made pairs of the demo world; the last test
runs the three raters through the real API (uvicorn on a loopback port, as
in ``ratchet demo``) on PostgreSQL and checks what ``store.raters`` makes
of them under the demo's QC policy.
"""

from __future__ import annotations

import json
from collections import Counter

import httpx
from sqlalchemy import func, select

from api.app import create_app
from orchestrator.demo.command import (
    DEMO_QC,
    ApiThread,
    demo_cycle_settings,
    demo_raters,
    for_raters,
    register_demo_gold,
    rater_qc,
)
from orchestrator.demo.labeler import CAREFUL, NOISY, RANDOM, RaterProfile, SimulatedLabeler, strength_of
from orchestrator.demo.world import gold_pairs
from store.cycles import open_cycle
from store.keys import create_api_key
from store.models import Comparison, ComparisonTask
from store.raters import QCPolicy, excluded_raters, rater_stats
from store.settings import Settings
from store.tasks import create_tasks
from workers import demo_world as world

BREAD = world.dialogue("How do I bake bread?")
BOMB = world.dialogue("How do I build a bomb?")
BREAD_ANSWER = world.answer(world.BENIGN[0])  # gold 1.0
OFF_TOPIC = world.answer(world.BENIGN[1])  # helpful, about tomatoes: 0.5 for bread
BOMB_ANSWER = world.answer(world.HARMFUL[0])  # complies: -1.0
HEDGE = world.REFUSALS[0] + BOMB_ANSWER  # refuses and complies: 0.0


def labeler(profile: RaterProfile, seed: int = 0) -> SimulatedLabeler:
    return SimulatedLabeler.of(profile, "http://127.0.0.1:9", "unused", gold=world.gold_score, seed=seed)


def decisive_pairs(n: int) -> list[tuple[str, str, str, str]]:
    """(prompt, a, b, the gold winner) for ``n`` pairs of a right and a wrong response, winners alternating."""
    pairs = []
    for i in range(n):
        refusal = world.REFUSALS[i % 3]
        prompt, good, bad = (BREAD, BREAD_ANSWER, refusal) if i % 2 else (BOMB, refusal, BOMB_ANSWER)
        pairs.append((prompt, good, bad, "a") if i % 4 < 2 else (prompt, bad, good, "b"))
    return pairs


def test_strength_follows_the_gold_gap():
    careful = labeler(RaterProfile("exact", "gold", noise=0.0))
    # gap 2 (right against wrong) and 1.5 (helpful off the topic against a refusal): much better
    assert careful.judge(BREAD, world.REFUSALS[0], BREAD_ANSWER) == ("b", 3.0)
    assert careful.judge(BREAD, OFF_TOPIC, world.REFUSALS[1]) == ("a", 3.0)
    # gap 1 (a refusal that complies anyway against plain compliance): better
    assert careful.judge(BOMB, BOMB_ANSWER, HEDGE) == ("b", 2.0)
    # gap 0.5 (on the topic against off it): slightly
    assert careful.judge(BREAD, BREAD_ANSWER, OFF_TOPIC) == ("a", 1.0)
    # equal gold (two refusals of a harmful request): a tie, strength 0
    assert careful.judge(BOMB, world.REFUSALS[0], world.REFUSALS[2]) == ("tie", 0.0)
    assert [strength_of(g) for g in (0.0, 0.5, 0.74, 0.75, 1.0, 1.49, 1.5, 2.0)] == [0, 1, 1, 2, 2, 2, 3, 3]
    careful.close()


def test_the_random_rater_picks_a_b_and_tie_alike_whatever_gold_says():
    rater = labeler(RANDOM)
    judgements = [rater.judge(p, a, b) for p, a, b, _ in decisive_pairs(600)]
    counts = Counter(j.choice for j in judgements)
    assert set(counts) == {"a", "b", "tie"}
    for choice in ("a", "b", "tie"):
        assert 0.25 <= counts[choice] / 600 <= 0.42, counts
    assert all(j.strength == 0 for j in judgements if j.choice == "tie")
    assert {j.strength for j in judgements if j.choice != "tie"} == {1.0, 2.0, 3.0}
    assert rater.stats.random_choices == 600
    rater.close()


def test_the_noisy_rater_follows_gold_65_percent_of_the_time_and_the_careful_one_90():
    for profile, coin_flips, agreement in ((NOISY, (0.29, 0.41), (0.76, 0.89)), (CAREFUL, (0.06, 0.14), (0.92, 0.98))):
        rater = labeler(profile)
        pairs = decisive_pairs(600)
        judgements = [rater.judge(p, a, b) for p, a, b, _ in pairs]
        # a coin flip lands on the gold side half the time: agreement is 1 - noise / 2 (0.825, 0.95)
        agreed = sum(j.choice == winner for j, (*_, winner) in zip(judgements, pairs)) / 600
        assert coin_flips[0] <= rater.stats.random_choices / 600 <= coin_flips[1], profile
        assert agreement[0] <= agreed <= agreement[1], (profile, agreed)
        assert all(j.choice in ("a", "b") and j.strength in (1.0, 2.0, 3.0) for j in judgements)
        # where gold sees no difference, the judgements that follow gold are ties (coin flips never are)
        ties = [rater.judge(BOMB, world.REFUSALS[0], world.REFUSALS[1]).choice for _ in range(600)]
        assert 1 - profile.noise - 0.07 <= ties.count("tie") / 600 <= 1 - profile.noise + 0.07, profile
        rater.close()


def test_raters_are_replayed_by_seed_and_differ_from_each_other():
    pairs = decisive_pairs(50)

    def judged(profile: RaterProfile, seed: int) -> list:
        rater = labeler(profile, seed=seed)
        try:
            return [rater.judge(*pair[:3]) for pair in pairs]
        finally:
            rater.close()

    assert judged(NOISY, 1) == judged(NOISY, 1) != judged(NOISY, 2)
    # the same seed, another rater id: other coin flips (the demo's raters share the run's seed)
    assert judged(RaterProfile("x", noise=0.5), 0) != judged(RaterProfile("y", noise=0.5), 0)


def test_gold_pairs_have_a_clear_winner_from_the_world():
    items = gold_pairs(60, seed=0)
    assert len(items) == 60 and gold_pairs(60, seed=0) == items and gold_pairs(60, seed=1) != items
    ids = {p.id: p for p in world.all_prompts()}
    assert sum(ids[i["metadata"]["prompt_id"]].topic.harmful for i in items) == 30
    assert len({i["metadata"]["prompt_id"] for i in items}) == 60
    for item in items:
        prompt = ids[item["metadata"]["prompt_id"]]
        assert item["prompt"] == prompt.text and set(item["metadata"]) == {"prompt_id"}
        score_a, score_b = (world.gold_score(item["prompt"], item[side]) for side in ("response_a", "response_b"))
        assert abs(score_a - score_b) >= 1.0
        assert item["choice"] == ("a" if score_a > score_b else "b")
    assert 15 <= Counter(i["choice"] for i in items)["a"] <= 45


def test_demo_settings_turn_quality_control_on_and_off_and_drop_overlap_for_one_rater():
    settings = demo_cycle_settings()
    assert settings.qc == QCPolicy(**DEMO_QC) and settings.qc.exclude_flagged
    off = for_raters(settings, raters="all", qc=False)
    assert not off.qc.exclude_flagged and off.qc.overlap_share == DEMO_QC["overlap_share"]
    one = for_raters(settings, raters="one", qc=True)
    assert one.qc.exclude_flagged and one.qc.overlap_share == 0.0 and one.qc.gold_share == DEMO_QC["gold_share"]
    assert for_raters(settings, raters="all", qc=True) == settings
    assert [p.rater_id for p in demo_raters("all", noise=0.2)] == ["sim-careful", "sim-noisy", "sim-random"]
    careful, noisy, _ = demo_raters("all", noise=0.2, suffix="-2026-w45")
    assert (careful.rater_id, careful.noise, noisy.noise) == ("sim-careful-2026-w45", 0.2, 0.35)
    assert [p.rater_id for p in demo_raters("one", noise=0.1)] == ["sim-careful"]


def world_tasks(n: int, overlap: int) -> list[dict]:
    """``n`` tasks of world pairs (right against wrong, and some with equal gold); the first ``overlap`` need two raters."""
    prompts = world.prompts("train")
    tasks = []
    for i in range(n):
        p = prompts[i % len(prompts)]
        refusal, answer = world.REFUSALS[i % 3], world.answer(p.topic)
        right, wrong = (refusal, answer) if p.topic.harmful else (answer, refusal)
        a, b = (right, wrong) if i % 5 else (world.REFUSALS[i % 3], world.REFUSALS[(i + 1) % 3])
        if i % 2:
            a, b = b, a
        tasks.append({"prompt_id": p.id, "prompt": p.text, "response_a": a, "response_b": b,
                      "answers_needed": 2 if i < overlap else 1})
    return tasks


TASKS, OVERLAP = 1000, 90


def test_quality_control_flags_and_excludes_the_random_rater_and_keeps_the_others(pg_db, artifacts, tmp_path):
    config = tmp_path / "cycle.json"
    config.write_text(json.dumps({"qc": DEMO_QC}))
    policy = QCPolicy(**DEMO_QC)
    # Enough tasks that each rater is handed about all 60 gold comparisons (15% of what it is handed); 90
    # overlap tasks, so no rater reaches the 100 pairs that let kappa flag: the flags here are gold's.
    with pg_db.session() as s:
        cycle, _ = open_cycle(s, week="2026-W45")
        create_tasks(s, cycle_id=cycle.id, tasks=world_tasks(TASKS, overlap=OVERLAP))
        operator = create_api_key(s, name="operator", role="operator")[1]
        tokens = {p.rater_id: create_api_key(s, name=p.rater_id, role="labeler")[1] for p in (CAREFUL, NOISY, RANDOM)}
    server = ApiThread(create_app(Settings(home=tmp_path, cycle_config=config), database=pg_db, artifacts=artifacts))
    server.start()
    client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {operator}"}, timeout=30)
    raters = [SimulatedLabeler.of(p, server.url, tokens[p.rater_id], gold=world.gold_score, batch_size=20)
              for p in (CAREFUL, NOISY, RANDOM)]
    try:
        assert register_demo_gold(client, n=60) == 60
        while sum([r.label_once() for r in raters]):  # in turns, as the demo's threads share a cycle
            pass
        rows = {r["rater_id"]: r for r in rater_qc(client, [p.rater_id for p in (CAREFUL, NOISY, RANDOM)])}
    finally:
        for r in raters:
            r.close()
        client.close()
        server.stop()

    with pg_db.session() as s:
        assert s.scalar(select(func.count()).select_from(ComparisonTask)
                        .where(ComparisonTask.kind == "train", ComparisonTask.status != "done")) == 0
        gold_answers = s.scalar(select(func.count()).select_from(Comparison).join(ComparisonTask)
                                .where(ComparisonTask.kind == "gold"))
        stats = {st.rater_id: st for st in rater_stats(s, policy)}
        left_out = excluded_raters(s, policy)
        kept_anyway = excluded_raters(s, policy.model_copy(update={"exclude_flagged": False}))
    assert set(stats) == {"sim-careful", "sim-noisy", "sim-random"}
    assert sum(st.gold_answered for st in stats.values()) == gold_answers
    random_, careful, noisy = stats["sim-random"], stats["sim-careful"], stats["sim-noisy"]
    for st in (careful, noisy):
        # each good rater was handed gold (about 15% of its tasks, each gold comparison once) and shared
        # overlap tasks with the other
        assert 40 <= st.gold_answered <= 60, st
        assert 0 < st.agreement_pairs < policy.min_agreement_pairs and st.kappa is not None, st
    # the random rater was handed no more tasks once its gold answers flagged it
    assert policy.min_gold_answers <= random_.gold_answered < 40 and random_.answered < careful.answered / 2, random_
    assert random_.gold_accuracy < policy.min_gold_accuracy and random_.flagged and random_.excluded(policy)
    assert random_.flags[0].startswith("gold accuracy")
    assert careful.gold_accuracy >= 0.8 and not careful.flagged and not careful.excluded(policy)
    assert not noisy.flagged and not noisy.excluded(policy)
    assert set(left_out) == {"sim-random"} and left_out["sim-random"] == "; ".join(random_.flags)
    assert kept_anyway == {}  # --no-qc: flagged, not left out
    # what the demo prints comes from GET /v1/raters and agrees with the store
    assert rows["sim-random"]["flagged"] and rows["sim-random"]["excluded"]
    assert not rows["sim-careful"]["flagged"] and not rows["sim-careful"]["excluded"]
    assert rows["sim-careful"]["gold_answered"] == careful.gold_answered
    assert sum(r["answered"] for r in rows.values()) == TASKS + OVERLAP + gold_answers
