"""The evaluate and best-of-N steps on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from workers.best_of_n import BestOfNConfig, best_of_n_kl
from workers.best_of_n import run as best_of_n
from workers.common.config import ConfigError, WorkerError
from workers.evaluate import EvaluateConfig, elo_difference, win_rate
from workers.evaluate import run as evaluate


def response_length_gold(prompt: str, response: str) -> float:
    """A gold score for tests: shorter is better."""
    return -float(len(response))


def test_win_rate_and_elo_by_hand():
    import torch

    a, b = torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])
    assert win_rate(a, b) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert elo_difference(0.5, 10) == 0.0
    assert elo_difference(0.75, 100) == pytest.approx(400 * math.log10(3))
    assert math.isfinite(elo_difference(1.0, 10))
    assert best_of_n_kl(1) == 0.0 and best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)


def test_a_policy_against_itself_ties_with_zero_kl(tmp_path, tiny_gpt2, trained_pm, prompts_path):
    pm_dir = trained_pm[1].outputs["pm"]
    cfg = EvaluateConfig(
        candidate_path=str(tiny_gpt2), baseline_path=str(tiny_gpt2), reference_path=str(tiny_gpt2),
        pm_path=pm_dir, test_pm_path=pm_dir, prompts_path=str(prompts_path), output_dir=str(tmp_path / "eval"),
        num_samples=2, max_new_tokens=8, gold=f"{__name__}:response_length_gold", progress=False,
    )
    result = evaluate(cfg)
    m = result.metrics
    # Same weights, same random numbers: identical responses, every comparison a tie.
    assert m["eval/win_rate_test_pm"] == 0.5 and m["eval/elo_diff"] == 0.0
    assert m["eval/kl"] == pytest.approx(0.0, abs=1e-5) and m["eval/test_pm_delta"] == 0.0
    assert m["eval/gold_candidate"] == m["eval/gold_baseline"] and m["eval/comparisons"] == 16
    report = json.loads(Path(result.outputs["report"]).read_text())
    assert report["metrics"]["eval/win_rate_train_pm"] == 0.5
    assert len(Path(result.outputs["samples"]).read_text().splitlines()) == 16


def test_best_of_n_keeps_the_best_score(tmp_path, tiny_gpt2, trained_pm, prompts_path):
    cfg = BestOfNConfig(
        policy_path=str(tiny_gpt2), pm_path=trained_pm[1].outputs["pm"], prompts_path=str(prompts_path),
        output_dir=str(tmp_path / "bon"), n=4, max_new_tokens=8, gold=f"{__name__}:response_length_gold", progress=False,
    )
    m = best_of_n(cfg).metrics
    assert m["bon/score_best"] >= m["bon/score_mean"]
    assert m["bon/kl"] == pytest.approx(math.log(4) - 0.75) and m["bon/kl_bound"] == pytest.approx(math.log(4))
    assert len((tmp_path / "bon" / "best.jsonl").read_text().splitlines()) == 8


def test_bad_gold_and_config_are_refused(tmp_path, tiny_gpt2, trained_pm, prompts_path):
    pm_dir = trained_pm[1].outputs["pm"]
    base = dict(candidate_path=str(tiny_gpt2), baseline_path=str(tiny_gpt2), reference_path=str(tiny_gpt2),
                pm_path=pm_dir, test_pm_path=pm_dir, prompts_path=str(prompts_path), output_dir=str(tmp_path / "e"), progress=False)
    with pytest.raises(ConfigError, match="module:function"):
        evaluate(EvaluateConfig(**base, gold="nocolon"))
    with pytest.raises(WorkerError, match="cannot be loaded"):
        evaluate(EvaluateConfig(**base, gold="no_such_module:f"))
    with pytest.raises(WorkerError, match="test preference model"):
        evaluate(EvaluateConfig(**{**base, "test_pm_path": str(tmp_path / "none")}))
