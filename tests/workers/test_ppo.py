"""The PPO step on tiny models: it runs, it resumes exactly, it refuses bad inputs."""

from __future__ import annotations

import dataclasses
import math

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workers.common.config import ConfigError, WorkerError
from workers.common.testing import build_tiny_model
from workers.ppo import PPOConfig, run


def ppo_config(tmp_path: Path, policy: Path, pm_dir: str, prompts: Path, **changes) -> PPOConfig:
    base = dict(
        policy_path=str(policy), reference_path=str(policy), pm_path=pm_dir, prompts_path=str(prompts),
        output_dir=str(tmp_path / "ppo"), total_episodes=16, rollout_batch_size=8, mini_batch_size=4,
        ppo_epochs=2, response_length=8, learning_rate=1e-3, kl_coef=0.05, progress=False, seed=3,
    )
    base.update(changes)
    return PPOConfig(**base)


def test_ppo_runs_changes_weights_and_saves_an_hf_policy(tmp_path, tiny_gpt2, trained_pm, prompts_path):
    _, pm_result = trained_pm
    cfg = ppo_config(tmp_path, tiny_gpt2, pm_result.outputs["pm"], prompts_path, test_pm_path=pm_result.outputs["pm"])
    result = run(cfg)
    assert result.complete and result.step == "ppo"
    policy = Path(result.outputs["policy"])
    before, after = load_file(str(tiny_gpt2 / "model.safetensors")), load_file(str(policy / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    lines = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    for key in ("ppo/reward", "ppo/reward_test_pm", "ppo/kl", "ppo/sqrt_kl", "ppo/entropy", "ppo/approx_kl",
                "ppo/clipfrac", "losses/value", "ppo/explained_variance", "ppo/response_length", "charts/episodes_per_s"):
        assert key in result.metrics
    assert not (Path(cfg.output_dir) / "checkpoints").exists()
    # A finished run is not run again.
    assert run(cfg).metrics == result.metrics


def test_a_killed_run_resumes_to_the_same_losses_and_weights(tmp_path, tiny_gpt2, trained_pm, prompts_path):
    pm_dir = trained_pm[1].outputs["pm"]
    whole = run(ppo_config(tmp_path / "a", tiny_gpt2, pm_dir, prompts_path, total_episodes=24))
    partial_cfg = ppo_config(tmp_path / "b", tiny_gpt2, pm_dir, prompts_path, total_episodes=24, max_rollouts_this_run=2)
    partial = run(partial_cfg)
    assert not partial.complete
    resumed = run(ppo_config(tmp_path / "b", tiny_gpt2, pm_dir, prompts_path, total_episodes=24))
    a = [json.loads(x) for x in (tmp_path / "a" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for key in ("losses/policy", "losses/value", "ppo/reward", "ppo/kl"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-4), key
    wa = load_file(str(Path(whole.outputs["policy"]) / "model.safetensors"))
    wb = load_file(str(Path(resumed.outputs["policy"]) / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_an_ensemble_pm_gives_a_conservative_reward_mean_minus_lambda_spread(tmp_path, tiny_gpt2, ensemble_pm, trained_pm,
                                                                            prompts_path):
    from workers.common.modeling import load_tokenizer
    from workers.common.rollout import pm_member_scores, pm_scores
    from workers.common.score import load_pm

    pm = load_pm(ensemble_pm, device="cpu")
    ids = load_tokenizer(ensemble_pm)([" hello", " hi there"], add_special_tokens=False)["input_ids"]
    members = pm_member_scores(pm, ids, ids, batch_size=1)
    assert members.shape == (2, 2) and torch.allclose(pm_scores(pm, ids, ids, batch_size=2), members.mean(0))
    runs = {}
    for lam in (0.0, 1.0, 5.0):
        cfg = ppo_config(tmp_path / str(lam), tiny_gpt2, str(ensemble_pm), prompts_path, total_episodes=8,
                         ensemble_penalty=lam)
        runs[lam] = run(cfg)
        m = runs[lam].metrics
        assert m["ppo/reward_spread"] > 0
        assert m["ppo/reward_conservative"] == pytest.approx(m["ppo/reward"] - lam * m["ppo/reward_spread"], abs=1e-5)
    # the same samples (same seed), but the penalty changes the rewards PPO learns from, so the weights differ
    assert runs[0.0].metrics["ppo/reward"] == pytest.approx(runs[5.0].metrics["ppo/reward"])
    w0 = load_file(str(Path(runs[0.0].outputs["policy"]) / "model.safetensors"))
    w5 = load_file(str(Path(runs[5.0].outputs["policy"]) / "model.safetensors"))
    assert any(not torch.equal(w0[k], w5[k]) for k in w0)
    single = run(ppo_config(tmp_path / "single", tiny_gpt2, trained_pm[1].outputs["pm"], prompts_path, total_episodes=8,
                            ensemble_penalty=1.0))
    assert single.metrics["ppo/reward_spread"] == 0.0
    with pytest.raises(ConfigError, match=r"ensemble_penalty \(-1.0\) must be >= 0"):
        ppo_config(tmp_path, tiny_gpt2, str(ensemble_pm), prompts_path, ensemble_penalty=-1.0).validate()


@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
def test_bfloat16_compute_keeps_float32_weights_so_small_updates_land(tmp_path, tiny_gpt2, trained_pm, prompts_path, lora_r):
    # At PPO's learning rates an update is far below bfloat16's resolution: weights held in
    # bfloat16 would round most of it away. Compute is bfloat16; weights and the saved policy stay float32.
    cfg = ppo_config(tmp_path, tiny_gpt2, trained_pm[1].outputs["pm"], prompts_path, dtype="bfloat16",
                     learning_rate=1e-5, lora_r=lora_r, total_episodes=8)
    result = run(cfg)
    before = load_file(str(tiny_gpt2 / "model.safetensors"))
    after = load_file(str(Path(result.outputs["policy"]) / "model.safetensors"))
    assert {t.dtype for t in after.values()} == {torch.float32}
    trained = [k for k in before if k.startswith("transformer.h.") and k.endswith(".weight") and after[k].dim() == 2]
    if lora_r:
        trained = [k for k in trained if "attn.c_attn" in k]  # peft's default GPT-2 target
    changed = sum(int((before[k] != after[k]).sum()) for k in trained) / sum(before[k].numel() for k in trained)
    assert changed > 0.5, f"only {changed:.1%} of the trained weights moved"


def test_float16_is_refused_for_training(tmp_path, tiny_gpt2, trained_pm, prompts_path):
    with pytest.raises(ConfigError, match="float16"):
        run(ppo_config(tmp_path, tiny_gpt2, trained_pm[1].outputs["pm"], prompts_path, dtype="float16"))


def test_lora_trains_adapters_and_saves_a_merged_policy(tmp_path, tiny_gpt2, trained_pm, prompts_path):
    cfg = ppo_config(tmp_path, tiny_gpt2, trained_pm[1].outputs["pm"], prompts_path, lora_r=4, learning_rate=1e-2)
    result = run(cfg)
    after = load_file(str(Path(result.outputs["policy"]) / "model.safetensors"))
    before = load_file(str(tiny_gpt2 / "model.safetensors"))
    assert set(after) == set(before)  # merged: plain GPT-2 weights, no adapter tensors
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert math.isfinite(result.metrics["ppo/kl"])
    # the adapters start from the seed, not from whatever the process drew before: a second run in this
    # process (an in-process runner runs every cycle's steps in one) ends with the same weights
    again = run(dataclasses.replace(cfg, output_dir=str(tmp_path / "again")))
    again_weights = load_file(str(Path(again.outputs["policy"]) / "model.safetensors"))
    assert all(torch.equal(after[k], again_weights[k]) for k in after)


def test_bad_inputs_are_refused(tmp_path, tiny_gpt2, tiny_llama, trained_pm, prompts_path):
    pm_dir = trained_pm[1].outputs["pm"]
    with pytest.raises(WorkerError, match="preference model"):
        run(ppo_config(tmp_path, tiny_gpt2, str(tmp_path / "missing"), prompts_path))
    with pytest.raises(WorkerError, match="different tokenizer"):
        run(ppo_config(tmp_path, tiny_gpt2, pm_dir, prompts_path, reference_path=str(tiny_llama)))
    other_vocab = build_tiny_model(tmp_path / "other", vocab_size=400, seed=5)
    with pytest.raises(WorkerError, match=r"vocabulary \d+ vs \d+ tokens"):
        run(ppo_config(tmp_path, tiny_gpt2, pm_dir, prompts_path, reference_path=str(other_vocab)))
    with pytest.raises(ConfigError, match=r"rollout_batch_size \(8\) must be divisible by mini_batch_size \(3\)"):
        ppo_config(tmp_path, tiny_gpt2, pm_dir, prompts_path, mini_batch_size=3).validate()
    with pytest.raises(ConfigError, match="reference_path"):
        ppo_config(tmp_path, tiny_gpt2, pm_dir, prompts_path, lora_r=4, reference_path=str(tiny_llama)).validate()


def test_a_finished_output_dir_refuses_another_config(tmp_path, tiny_gpt2, trained_pm, prompts_path):
    pm_dir = trained_pm[1].outputs["pm"]
    run(ppo_config(tmp_path, tiny_gpt2, pm_dir, prompts_path))
    with pytest.raises(WorkerError, match="different config"):
        run(ppo_config(tmp_path, tiny_gpt2, pm_dir, prompts_path, kl_coef=0.5))
