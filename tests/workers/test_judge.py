"""Judges: the PM judge on the tiny trained PM; the LM judge's answer log-odds, position debiasing, principles."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import statistics
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.workers.builders import synthetic_preferences
from workers.common.config import ConfigError, WorkerError
from workers.common.modeling import load_tokenizer
from workers.common.score import load_pm, score
from workers.common.testing import DEFAULT_CORPUS, build_tiny_model, build_tokenizer
from workers.judge import (
    DEFAULT_PRINCIPLES,
    LMJudge,
    Pair,
    PMJudge,
    draw_principle,
    load_judge,
    pair_key,
    parse_principles,
    principles_sha256,
    read_principles,
    sigmoid,
    strength_of,
    verdict_of,
)

# The tiny BPE learns " A" and " B" after "The answer is:" as single tokens only if its corpus says them.
ANSWER_CORPUS = ("Options: (A) one (B) two. The answer is: A", "Options: (A) one (B) two. The answer is: B") * 8


@pytest.fixture(scope="module")
def judge_lm(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 whose tokenizer has " A" and " B" as tokens (random weights: a judge with a position bias)."""
    tokenizer = build_tokenizer(DEFAULT_CORPUS + ANSWER_CORPUS, vocab_size=512)
    return build_tiny_model(tmp_path_factory.mktemp("judge") / "lm", tokenizer=tokenizer, seed=3)


def pairs(n: int, seed: int = 5) -> list[Pair]:
    """Pairs of the synthetic preference (the response ending in " please" wins), of varied lengths."""
    return [Pair(r["prompt"], r["response_a"], r["response_b"]) for r in synthetic_preferences(n, seed=seed)]


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# -- verdicts --------------------------------------------------------------------------------


def test_strength_cut_points_and_verdicts_by_hand():
    # |log-odds| >= 2 (P >= 0.881) much better, >= 1 (P >= 0.731) better, else slightly
    assert [strength_of(d) for d in (0.0, 0.3, 0.999, 1.0, -1.5, 1.999, 2.0, -7.0)] == [1, 1, 1, 2, 2, 2, 3, 3]
    assert verdict_of(0.5, tie=False) == ("a", 1.0, pytest.approx(0.6224593312))
    assert verdict_of(-1.0, tie=False) == ("b", 2.0, pytest.approx(0.2689414214))
    assert verdict_of(2.0, tie=False) == ("a", 3.0, pytest.approx(0.8807970780))
    assert verdict_of(0.05, tie=True) == ("tie", 0.0, pytest.approx(0.5124973964))
    assert verdict_of(0.0, tie=False) == ("tie", 0.0, 0.5)  # no preference either way, whatever the margin
    assert sigmoid(-800.0) == 0.0 and sigmoid(800.0) == 1.0  # no overflow


# -- the PM judge ----------------------------------------------------------------------------


def test_the_pm_judge_picks_the_response_the_pm_scores_higher(trained_pm):
    pm_dir = trained_pm[1].outputs["pm"]
    judge = PMJudge(pm_dir, tie_margin=0.0, device="cpu")
    items = pairs(16)
    pm = load_pm(pm_dir, device="cpu")
    r_a = score(pm, [(p.prompt, p.response_a) for p in items])
    r_b = score(pm, [(p.prompt, p.response_b) for p in items])
    verdicts = judge.judge_many(items)
    for v, a, b in zip(verdicts, r_a, r_b):
        assert v.choice == ("a" if a > b else "b")
        assert v.p_a == pytest.approx(1 / (1 + math.exp(-(a - b))), abs=1e-6)  # Bradley-Terry
        gap = abs(a - b)
        assert v.strength == (3.0 if gap >= 2 else 2.0 if gap >= 1 else 1.0)
    # the PM learnt the preference, so the judge follows it
    assert sum(v.choice == ("a" if p.response_a.endswith(" please") else "b") for v, p in zip(verdicts, items)) >= 15
    assert {v.strength for v in verdicts} - {1.0}
    alone = judge.judge(*items[0][:3])  # scored in a batch of its own: other padding, the same verdict
    assert alone == (verdicts[0].choice, verdicts[0].strength, pytest.approx(verdicts[0].p_a, abs=1e-6))
    assert judge.kind == "pm" and judge.principles_sha256 is None
    assert judge.describe() == {"kind": "pm", "name": "pm", "path": str(pm_dir), "members": 1, "tie_margin": 0.0,
                                "ensemble_penalty": 0.0}


def test_the_pm_judge_ties_inside_the_margin(trained_pm):
    pm_dir = trained_pm[1].outputs["pm"]
    item = pairs(1, seed=9)[0]
    d = logit(PMJudge(pm_dir, tie_margin=0.0, device="cpu").judge(*item[:3]).p_a)
    inside = PMJudge(pm_dir, tie_margin=abs(d) + 1e-3, device="cpu").judge(*item[:3])
    outside = PMJudge(pm_dir, tie_margin=abs(d) - 1e-3, device="cpu").judge(*item[:3])
    assert (inside.choice, inside.strength) == ("tie", 0.0) and inside.p_a == pytest.approx(sigmoid(d))
    assert outside.choice == ("a" if d > 0 else "b") and outside.strength == strength_of(d)
    with pytest.raises(ConfigError, match=r"tie_margin \(-1\)"):
        PMJudge(pm_dir, tie_margin=-1)


def test_an_ensemble_judge_is_conservative_as_ppo(ensemble_pm):
    items = pairs(4, seed=3)
    pm = load_pm(ensemble_pm, device="cpu")
    members = [dataclasses.replace(pm, models=[m]) for m in pm.models]  # each member as a PM of its own

    def conservative(pair_texts):
        per_member = [score(m, pair_texts) for m in members]
        return [statistics.fmean(s) - 0.5 * statistics.pstdev(s) for s in zip(*per_member)]

    r_a = conservative([(p.prompt, p.response_a) for p in items])
    r_b = conservative([(p.prompt, p.response_b) for p in items])
    judge = PMJudge(ensemble_pm, tie_margin=0.0, ensemble_penalty=0.5, device="cpu")
    assert [logit(v.p_a) for v in judge.judge_many(items)] == pytest.approx([a - b for a, b in zip(r_a, r_b)], abs=1e-5)
    assert judge.describe()["members"] == 2


# -- the LM judge ----------------------------------------------------------------------------


def test_the_lm_judge_prompt_reads_as_constitutional_ai_asks(judge_lm):
    judge = LMJudge(judge_lm, device="cpu")
    text = judge.render("\n\nHuman: hi\n\nAssistant:", " hello please", " go away", "Which is kinder?")
    assert text == (
        "Consider the following conversation between a human and an assistant:\n"
        "Human: hi\n\nAssistant:\n"
        "Which is kinder?\n"
        "Options:\n"
        "(A) hello please\n"
        "(B) go away\n"
        "The answer is:"
    )
    assert judge.principles == list(DEFAULT_PRINCIPLES)
    assert judge.principles_sha256 == principles_sha256(DEFAULT_PRINCIPLES)


def test_the_lm_judge_reads_the_answer_log_odds_from_the_logits_and_averages_both_orders(judge_lm):
    judge = LMJudge(judge_lm, tie_band=0.0, batch_size=3, device="cpu")  # 3: batches of prompts of several lengths
    items = pairs(5)
    model = AutoModelForCausalLM.from_pretrained(judge_lm).eval()
    tokenizer = load_tokenizer(judge_lm)
    a_id, b_id = tokenizer.convert_tokens_to_ids(["ĠA", "ĠB"])
    assert judge.answer_ids == (a_id, b_id)

    def by_hand(text: str) -> float:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            last = model(torch.tensor([ids])).logits[0, -1]  # one prompt, no padding
        return (last[a_id] - last[b_id]).item()  # log P(" A") - log P(" B"): the softmax's normaliser cancels

    texts = []
    for it in items:
        principle = judge.principle_for(it)
        texts += [judge.render(it.prompt, it.response_a, it.response_b, principle),
                  judge.render(it.prompt, it.response_b, it.response_a, principle)]
    hand = [by_hand(t) for t in texts]
    raw = judge.answer_log_odds(texts)
    assert raw == pytest.approx(hand, abs=1e-5)
    # the random model favours a position: asked in the other order it does not simply say the opposite
    assert max(abs(hand[2 * i] + hand[2 * i + 1]) for i in range(len(items))) > 1e-3
    verdicts = judge.judge_many(items)
    for i, v in enumerate(verdicts):
        d = (raw[2 * i] - raw[2 * i + 1]) / 2
        assert logit(v.p_a) == pytest.approx(d, abs=1e-9)
        assert v.choice == ("a" if d > 0 else "b") and v.strength == strength_of(d)


def test_swapping_a_and_b_flips_p_a(judge_lm):
    judge = LMJudge(judge_lm, tie_band=0.0, device="cpu")
    items = pairs(6, seed=7)
    forward = judge.judge_many(items)
    swapped = judge.judge_many([Pair(p.prompt, p.response_b, p.response_a) for p in items])
    for v, w in zip(forward, swapped):
        assert w.p_a == pytest.approx(1 - v.p_a, abs=1e-6)
        assert {v.choice, w.choice} == {"a", "b"} and v.strength == w.strength
    # inside the tie band: a tie, strength 0
    band = abs(forward[0].p_a - 0.5) + 1e-6
    tie = LMJudge(judge_lm, tie_band=band, device="cpu").judge(*items[0][:3])
    assert (tie.choice, tie.strength) == ("tie", 0.0) and tie.p_a == pytest.approx(forward[0].p_a)


def test_principles_files_are_one_principle_a_line(tmp_path, judge_lm):
    text = "# kindness first\n\nWhich response is kinder?\n   \n  Which response is more honest?  \n# the end\n"
    assert parse_principles(text) == ["Which response is kinder?", "Which response is more honest?"]
    path = tmp_path / "principles.txt"
    path.write_text(text)
    judge = LMJudge(judge_lm, path, device="cpu")
    assert judge.principles == read_principles(path)
    # the address is of the principles, not of the comments around them
    expected = hashlib.sha256(b"Which response is kinder?\nWhich response is more honest?\n").hexdigest()
    assert judge.principles_sha256 == expected
    assert judge.describe()["principles_file"] == str(path) and judge.describe()["principles"] == 2
    (tmp_path / "empty.txt").write_text("# nothing here\n\n")
    with pytest.raises(WorkerError, match="holds no principle"):
        read_principles(tmp_path / "empty.txt")
    with pytest.raises(WorkerError, match="does not exist"):
        LMJudge(judge_lm, tmp_path / "missing.txt")


def test_one_principle_is_drawn_per_comparison_by_a_seeded_hash(judge_lm):
    # the draw, by hand: the first 8 bytes of sha256("seed:key"), big-endian, modulo the number of principles
    digest = hashlib.sha256(b"0:task:7").digest()
    assert draw_principle(3, "task:7", 0) == int.from_bytes(digest[:8], "big") % 3
    draws = [draw_principle(3, f"task:{i}", 0) for i in range(600)]
    assert draws == [draw_principle(3, f"task:{i}", 0) for i in range(600)]  # the same on every call
    assert draws != [draw_principle(3, f"task:{i}", 1) for i in range(600)]  # another seed, other draws
    assert all(160 <= n <= 240 for n in Counter(draws).values())
    # a pair without a key is drawn by its texts, either order alike (so swapping A and B keeps the principle)
    pair = pairs(1)[0]
    assert pair_key(pair) == pair_key(Pair(pair.prompt, pair.response_b, pair.response_a))
    assert pair_key(pair._replace(key="task:7")) == "task:7"
    sampled = LMJudge(judge_lm, device="cpu", seed=0)
    drawn = sampled.principle_for(pair._replace(key="task:7"))
    assert drawn == DEFAULT_PRINCIPLES[draw_principle(len(DEFAULT_PRINCIPLES), "task:7", 0)]
    every = LMJudge(judge_lm, device="cpu", principle_mode="all").principle_for(pair)
    assert every.startswith("Principles:\n1. ")
    assert all(f"{i}. {p}" in every for i, p in enumerate(DEFAULT_PRINCIPLES, start=1))


def test_the_lm_judge_refuses_what_it_cannot_read(judge_lm, tiny_gpt2, trained_pm):
    with pytest.raises(WorkerError, match=r"answer ' B' after 'The answer is:' as 2 tokens"):
        LMJudge(tiny_gpt2, device="cpu")  # its tokenizer splits " B" into " " and "B"
    with pytest.raises(WorkerError, match="is a preference model"):
        LMJudge(trained_pm[1].outputs["pm"], device="cpu")
    with pytest.raises(ConfigError, match=r"principle_mode \('every'\)"):
        LMJudge(judge_lm, principle_mode="every")
    with pytest.raises(ConfigError, match=r"max_length \(4096\) exceeds the model's 512"):
        LMJudge(judge_lm, max_length=4096, device="cpu")


def test_judges_from_a_command_line_spec(judge_lm, trained_pm, tmp_path):
    assert isinstance(load_judge(f"pm:{trained_pm[1].outputs['pm']}", device="cpu"), PMJudge)
    lm = load_judge(f"lm:{judge_lm}", principle_mode="all", device="cpu")
    assert isinstance(lm, LMJudge) and lm.principle_mode == "all" and lm.name == "lm"
    for spec in ("judge.bin", "rm:/x", "pm:"):
        with pytest.raises(ConfigError, match="must be pm:PATH"):
            load_judge(spec)
    with pytest.raises(ConfigError, match="principles are for an LM judge"):
        load_judge(f"pm:{trained_pm[1].outputs['pm']}", principles=tmp_path / "p.txt")
