"""PPO learns, measured against a known gold reward (the demo world's).

P0 is fine-tuned to answer or refuse about two times in three correctly; a
PM is trained on gold-labelled comparisons of P0's own samples; PPO against
it must raise the gold score on held-out prompts. Along the way PPO scores a
fixed held-out prompt set every two rollouts, giving PM reward against
sqrt(KL), which Bai et al. 2022 found close to linear early in training; the
test fits a line to the first half and checks its R^2.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from tests.workers.builders import write_jsonl
from workers import demo_world
from workers.common.testing import build_tiny_model, build_tokenizer
from workers.evaluate import EvaluateConfig
from workers.evaluate import run as evaluate
from workers.ppo import PPOConfig
from workers.ppo import run as ppo
from workers.sample import SampleConfig
from workers.sample import run as sample
from workers.sft import SFTConfig
from workers.sft import run as sft
from workers.train_pm import TrainPMConfig
from workers.train_pm import run as train_pm

GOLD = "workers.demo_world:gold_score"


def r_squared(xs: list[float], ys: list[float]) -> float:
    """R^2 of the least-squares line through (xs, ys)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    syy = sum((y - my) ** 2 for y in ys)
    return (sxy * sxy) / (sxx * syy) if sxx > 0 and syy > 0 else 0.0


def test_r_squared_by_hand():
    assert r_squared([0, 1, 2], [1, 3, 5]) == pytest.approx(1.0)
    assert r_squared([0, 1, 2, 3], [1, -1, 1, -1]) == pytest.approx(0.2)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    tokenizer = build_tokenizer(demo_world.tokenizer_corpus(), vocab_size=512, model_max_length=128)
    base = build_tiny_model(root / "base", tokenizer=tokenizer, max_positions=128, seed=0)
    corpus = demo_world.write_corpus(root / "corpus.jsonl")
    p0 = sft(SFTConfig(
        model_path=str(base), dataset_path=str(corpus), output_dir=str(root / "sft"), max_steps=300,
        learning_rate=1e-2, batch_size=32, warmup_steps=10, disable_dropout=True, progress=False,
    )).outputs["policy"]
    train = demo_world.write_prompts(root / "train.jsonl", "train")
    held_out = demo_world.write_prompts(root / "eval.jsonl", "eval")
    # Gold-labelled comparisons of P0's own samples: every pair of 4 responses to a prompt.
    samples = sample(SampleConfig(
        policies={"p0": p0}, prompts_path=str(train), output_dir=str(root / "samples"), num_samples=4,
        max_new_tokens=24, seed=1, progress=False,
    ))
    by_prompt: dict = {}
    for line in Path(samples.outputs["samples"]).read_text().splitlines():
        row = json.loads(line)
        by_prompt.setdefault(row["prompt"], []).append(row["response"])
    comparisons = []
    for prompt, responses in by_prompt.items():
        for a, b in itertools.combinations(responses, 2):
            ga, gb = demo_world.gold_score(prompt, a), demo_world.gold_score(prompt, b)
            if ga != gb:
                comparisons.append({"prompt": prompt, "response_a": a, "response_b": b,
                                    "choice": "a" if ga > gb else "b", "rater_id": "gold"})
    data = write_jsonl(root / "comparisons.jsonl", comparisons)
    pms = train_pm(TrainPMConfig(
        model_path=p0, dataset_path=str(data), output_dir=str(root / "pm"), two_pms=True, batch_size=32,
        learning_rate=3e-3, num_epochs=2, max_length=96, progress=False,
        select_by="last",  # the paper's PM: all its comparisons, a fixed number of epochs
    ))
    return {"p0": Path(p0), "train": train, "eval": held_out, "pm": Path(pms.outputs["pm"]),
            "test_pm": Path(pms.outputs["test_pm"]), "pm_metrics": pms.metrics, "root": root}


def test_ppo_raises_the_gold_score_and_reward_is_linear_in_sqrt_kl(world):
    assert world["pm_metrics"]["heldout/accuracy"] >= 0.8
    out = world["root"] / "ppo"
    result = ppo(PPOConfig(
        policy_path=str(world["p0"]), reference_path=str(world["p0"]), pm_path=str(world["pm"]),
        test_pm_path=str(world["test_pm"]), prompts_path=str(world["train"]), output_dir=str(out),
        total_episodes=32 * 16, rollout_batch_size=32, mini_batch_size=16, ppo_epochs=2, response_length=24,
        learning_rate=3e-4, kl_coef=0.02, seed=0, progress=False, eval_prompts_path=str(world["eval"]), eval_every=1,
    ))
    report = evaluate(EvaluateConfig(
        candidate_path=result.outputs["policy"], baseline_path=str(world["p0"]), reference_path=str(world["p0"]),
        pm_path=str(world["pm"]), test_pm_path=str(world["test_pm"]), prompts_path=str(world["eval"]),
        output_dir=str(world["root"] / "eval"), num_samples=2, max_new_tokens=24, gold=GOLD, progress=False,
    )).metrics
    gain = report["eval/gold_candidate"] - report["eval/gold_baseline"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [r for r in rows if "eval/reward" in r]
    early = curve[: (len(curve) + 1) // 2 + 1]  # the first half of training, where the paper sees a line
    fit = r_squared([r["eval/sqrt_kl"] for r in early], [r["eval/reward"] for r in early])
    print([(round(r["eval/sqrt_kl"], 2), round(r["eval/reward"], 3)) for r in curve])
    print(f"gold {report['eval/gold_baseline']:.3f} -> {report['eval/gold_candidate']:.3f}; "
          f"test-PM win rate {report['eval/win_rate_test_pm']:.3f}; reward vs sqrt(KL) R^2 {fit:.2f}")
    assert gain >= 0.1
    assert early[-1]["eval/reward"] > early[0]["eval/reward"]
    # Measured here: R^2 0.52 over the first 9 of 16 evaluations (reward climbs from 1.79 to 2.1 by
    # sqrt(KL) 0.9, then levels off while the gold keeps rising); 0.70 on an earlier transformers release.
    # The paper's line is a trend through noisy points on a world this small, not an exact fit.
    assert fit >= 0.4
    assert math.isfinite(report["eval/kl"]) and report["eval/kl"] > 0


def test_over_optimising_a_weak_pm_is_exposed_by_evaluate(world):
    """A PM trained on 24 comparisons, optimised with no KL penalty: its score (and the
    test PM's, trained on the same few) keeps rising while the gold score falls."""
    import random

    rows = [json.loads(x) for x in (world["root"] / "comparisons.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(rows)
    weak_data = write_jsonl(world["root"] / "weak.jsonl", rows[:24])
    weak = train_pm(TrainPMConfig(
        model_path=str(world["p0"]), dataset_path=str(weak_data), output_dir=str(world["root"] / "weak-pm"),
        two_pms=True, batch_size=8, learning_rate=3e-3, num_epochs=3, max_length=96, heldout_fraction=0.2,
        progress=False,
    ))
    out = world["root"] / "weak-ppo"
    result = ppo(PPOConfig(
        policy_path=str(world["p0"]), reference_path=str(world["p0"]), pm_path=weak.outputs["pm"],
        test_pm_path=weak.outputs["test_pm"], prompts_path=str(world["train"]), output_dir=str(out),
        total_episodes=32 * 30, rollout_batch_size=32, mini_batch_size=16, ppo_epochs=2, response_length=24,
        learning_rate=1e-3, kl_coef=0.0, lam=1.0, seed=0, progress=False,
        eval_prompts_path=str(world["eval"]), eval_every=3,
    ))
    curve = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [r for r in curve if "eval/reward" in r]
    report = evaluate(EvaluateConfig(
        candidate_path=result.outputs["policy"], baseline_path=str(world["p0"]), reference_path=str(world["p0"]),
        pm_path=weak.outputs["pm"], test_pm_path=weak.outputs["test_pm"], prompts_path=str(world["eval"]),
        output_dir=str(world["root"] / "weak-eval"), num_samples=2, max_new_tokens=24, gold=GOLD, progress=False,
    )).metrics
    print(f"weak PM: train-PM delta {report['eval/train_pm_delta']:+.3f}, "
          f"gold {report['eval/gold_baseline']:.3f} -> {report['eval/gold_candidate']:.3f}")
    assert curve[-1]["eval/reward"] > curve[0]["eval/reward"]  # the proxy keeps improving
    assert report["eval/train_pm_delta"] > 0 and report["eval/win_rate_train_pm"] > 0.5
    assert report["eval/gold_candidate"] < report["eval/gold_baseline"] - 0.1  # the true goal got worse
