"""The rloo step: its loss and advantages by hand, and whole runs on tiny models (they run, resume
bitwise, refuse bad configs, and raise the reward of a PM that prefers a marker)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workers.common.config import ConfigError, WorkerError
from workers.common.modeling import load_causal_lm
from workers.rl.losses import grpo_loss
from workers.rloo import RLOOConfig, group_advantages, main, run


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def rloo_config(out: Path, policy: Path, pm_dir: str, prompts: Path, **changes) -> RLOOConfig:
    base = dict(
        policy_path=str(policy), reference_path=str(policy), pm_path=pm_dir, prompts_path=str(prompts),
        output_dir=str(out / "rloo"), total_episodes=16, prompts_per_rollout=2, k=4, mini_batch_size=8,
        response_length=6, learning_rate=1e-3, progress=False, seed=3,
    )
    base.update(changes)
    return RLOOConfig(**base)


def read_lines(cfg: RLOOConfig) -> list[dict]:
    return [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(result) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.outputs["policy"]) / "model.safetensors"))


# -- the math ---------------------------------------------------------------------------


def test_grpo_loss_by_hand_clips_and_averages_each_response_then_the_batch():
    # Response 0: 2 tokens, ratio e (log ratio 1), A = +1: -A * ratio = -e, clipped -1.2; the max is -1.2.
    # Response 1: 3 tokens, ratio 1, A = -2: 2 per token.
    old = t([0.0, 0.0, 0.0], [-1.0, -1.0, -1.0])
    logprobs = t([1.0, 1.0, 5.0], [-1.0, -1.0, -1.0])
    mask = t([1, 1, 0], [1, 1, 1])
    advantages = t(1.0, -2.0)
    # The reference: log pi - log pi_ref = ln 2 on response 0, 0 on response 1;
    # k3 = (exp(-ln 2) - 1) + ln 2 = ln 2 - 1/2 per token of response 0, 0 on response 1.
    ref = logprobs - t([math.log(2)] * 3, [0.0] * 3)
    loss, stats = grpo_loss(logprobs=logprobs, old_logprobs=old, ref_logprobs=ref, advantages=advantages, mask=mask,
                            clip_coef=0.2, kl_coef=0.5)
    # Per-response means (-1.2 and 2), then the batch mean: 0.4 (a token mean would give 3.6 / 5 = 0.72).
    assert stats.policy_loss.item() == pytest.approx(0.4)
    assert stats.kl.item() == pytest.approx((math.log(2) - 0.5) / 2)
    assert loss.item() == pytest.approx(0.4 + 0.5 * (math.log(2) - 0.5) / 2)
    # The diagnostics are token means: 2 of 5 tokens clipped; (ratio - 1) - log ratio = e - 2 on those two.
    assert stats.clipfrac.item() == pytest.approx(2 / 5)
    assert stats.approx_kl.item() == pytest.approx(2 * (math.e - 2) / 5)
    assert stats.ratio_mean.item() == pytest.approx((2 * math.e + 3) / 5)


def test_grpo_loss_on_policy_is_reinforce_with_the_advantage_and_the_k3_gradient():
    # At ratio 1 nothing clips: d loss / d logp_t = -A_i / (|o_i| * b) + kl_coef * (1 - exp(ref - logp)) / (|o_i| * b).
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], dtype=torch.float64, requires_grad=True)
    old = logprobs.detach().clone()
    ref = old - torch.tensor([[0.0, 0.0, 0.0], [math.log(2)] * 3], dtype=torch.float64)
    mask = t([1, 1, 1], [1, 0, 0])
    loss, stats = grpo_loss(logprobs=logprobs, old_logprobs=old, ref_logprobs=ref, advantages=t(3.0, -1.0), mask=mask,
                            clip_coef=0.2, kl_coef=0.1)
    loss.backward()
    expected = t([-3 / 6, -3 / 6, -3 / 6], [1 / 2 + 0.1 * (1 - 0.5) / 2, 0.0, 0.0])
    assert torch.allclose(logprobs.grad, expected)
    assert stats.clipfrac.item() == 0 and stats.approx_kl.item() == 0


def test_group_advantages_by_hand():
    rewards = t([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])
    # RLOO: r_i - mean of the other two: 1 - 2.5, 2 - 2, 3 - 1.5.
    assert torch.allclose(group_advantages(rewards, "rloo"), t([-1.5, 0.0, 1.5], [0.0, 0.0, 0.0]))
    # GRPO: (r - 2) / sqrt(2/3), the population std; an all-equal group gives 0.
    s = math.sqrt(2 / 3)
    assert torch.allclose(group_advantages(rewards, "grpo"), t([-1 / s, 0.0, 1 / s], [0.0, 0.0, 0.0]), atol=1e-5)
    # Dr. GRPO: centred only.
    assert torch.allclose(group_advantages(rewards, "dr_grpo"), t([-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]))


# -- whole runs ---------------------------------------------------------------------------


def test_a_run_saves_a_loadable_policy_and_metrics_and_a_finished_run_is_not_repeated(
    tmp_path, tiny_gpt2, trained_pm, prompts_path, capsys
):
    pm_dir = trained_pm[1].outputs["pm"]
    cfg = rloo_config(tmp_path, tiny_gpt2, pm_dir, prompts_path, test_pm_path=pm_dir)
    result = run(cfg)
    assert result.complete and result.step == "rloo"
    assert not (Path(cfg.output_dir) / "checkpoints").exists()
    policy = load_causal_lm(result.outputs["policy"], device=torch.device("cpu"), dtype=torch.float32)
    assert policy.config.model_type == "gpt2"
    before = load_file(str(tiny_gpt2 / "model.safetensors"))
    after = weights(result)
    assert set(after) == set(before) and any(not torch.equal(before[k], after[k]) for k in before)
    lines = read_lines(cfg)
    assert [r["step"] for r in lines] == [1, 2]
    m = result.metrics
    for key in ("rloo/reward", "rloo/reward_spread", "rloo/reward_test_pm", "rloo/kl", "rloo/advantage_std",
                "rloo/zero_std_groups", "losses/policy", "losses/kl", "rloo/clipfrac", "rloo/approx_kl",
                "rloo/entropy", "rloo/eos_fraction", "rloo/episodes", "charts/episodes_per_s",
                "policy/reward", "policy/reward_test_pm", "policy/reward_spread", "policy/kl", "policy/episodes"):
        assert key in m and math.isfinite(m[key]), key
    assert m["policy/episodes"] == m["rloo/episodes"] == 16
    assert m["policy/reward"] == m["rloo/reward"] == m["rloo/reward_test_pm"]  # the same PM twice
    assert m["policy/kl"] == m["rloo/kl"] and m["rloo/reward_spread"] == 0.0  # a single PM has no spread
    assert lines[0]["rloo/kl"] == 0.0  # the first samples come from the reference itself
    # A finished run is returned as it is, without training again.
    stamps = {p: p.stat().st_mtime_ns for p in Path(cfg.output_dir).rglob("*") if p.is_file()}
    assert run(cfg).metrics == result.metrics
    assert {p: p.stat().st_mtime_ns for p in Path(cfg.output_dir).rglob("*") if p.is_file()} == stamps
    with pytest.raises(WorkerError, match="different config"):
        run(rloo_config(tmp_path, tiny_gpt2, pm_dir, prompts_path, test_pm_path=pm_dir, kl_coef=0.5))
    assert main(["--help"]) == 0 and "prompts_per_rollout" in capsys.readouterr().out


def test_each_estimator_runs_and_scales_its_advantages_as_its_paper_says(tmp_path, tiny_gpt2, trained_pm, prompts_path):
    pm_dir = trained_pm[1].outputs["pm"]
    runs = {
        name: run(rloo_config(tmp_path / name, tiny_gpt2, pm_dir, prompts_path, total_episodes=8, estimator=name))
        for name in ("rloo", "grpo", "dr_grpo")
    }
    first = {name: r.metrics for name, r in runs.items()}
    # One rollout of the same samples (same seed) in each: the same rewards, different advantages.
    assert first["rloo"]["rloo/reward"] == first["grpo"]["rloo/reward"] == first["dr_grpo"]["rloo/reward"]
    # RLOO's leave-one-out advantage is k / (k - 1) times the centred one (k = 4).
    centred = first["dr_grpo"]["rloo/advantage_std"]
    assert first["rloo"]["rloo/advantage_std"] == pytest.approx(4 / 3 * centred, rel=1e-5)
    # GRPO's groups each have unit (population) std, so the whole batch does.
    assert first["grpo"]["rloo/zero_std_groups"] == 0.0
    assert first["grpo"]["rloo/advantage_std"] == pytest.approx(1.0, abs=1e-3)
    w = {name: weights(r) for name, r in runs.items()}
    assert any(not torch.equal(w["rloo"][k], w["grpo"][k]) for k in w["rloo"])


def test_a_stopped_run_resumes_to_bitwise_the_same_weights(tmp_path, tiny_gpt2, trained_pm, prompts_path):
    pm_dir = trained_pm[1].outputs["pm"]
    # Two epochs of two mini-batches of two micro-batches: the ratio moves off 1, the clip can bite.
    changes = dict(total_episodes=24, epochs=2, mini_batch_size=4, gradient_accumulation_steps=2, checkpoint_every=2,
                   learning_rate=3e-3)
    whole = run(rloo_config(tmp_path / "a", tiny_gpt2, pm_dir, prompts_path, **changes))
    partial_cfg = rloo_config(tmp_path / "b", tiny_gpt2, pm_dir, prompts_path, max_rollouts_this_run=1, **changes)
    partial = run(partial_cfg)
    assert not partial.complete and "policy" not in partial.outputs
    assert (Path(partial_cfg.output_dir) / "checkpoints" / "step-00000001").is_dir()  # saved on stopping
    resumed = run(rloo_config(tmp_path / "b", tiny_gpt2, pm_dir, prompts_path, **changes))
    wa, wb = weights(whole), weights(resumed)
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    a, b = read_lines(rloo_config(tmp_path / "a", tiny_gpt2, pm_dir, prompts_path)), read_lines(partial_cfg)
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for key in ("losses/policy", "losses/kl", "rloo/reward", "rloo/kl", "rloo/clipfrac"):
            assert ra[key] == rb[key], key
    assert a[-1]["rloo/approx_kl"] > 0  # the second epoch saw a moved policy


def test_lora_trains_adapters_and_saves_a_merged_policy(tmp_path, tiny_gpt2, trained_pm, prompts_path):
    cfg = rloo_config(tmp_path, tiny_gpt2, trained_pm[1].outputs["pm"], prompts_path, lora_r=4, learning_rate=1e-2)
    result = run(cfg)
    before, after = load_file(str(tiny_gpt2 / "model.safetensors")), weights(result)
    assert set(after) == set(before)  # merged: plain GPT-2 weights, no adapter tensors
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("attn.c_attn" in k for k in changed)  # peft's default GPT-2 target
    assert read_lines(cfg)[-1]["rloo/kl"] != 0.0  # the reference (adapters off) and the policy differ


def test_an_ensemble_pm_gives_a_conservative_reward(tmp_path, tiny_gpt2, ensemble_pm, prompts_path):
    cfg = rloo_config(tmp_path, tiny_gpt2, str(ensemble_pm), prompts_path, total_episodes=8, ensemble_penalty=2.0)
    m = run(cfg).metrics
    assert m["rloo/reward_spread"] > 0 and m["policy/reward_spread"] == m["rloo/reward_spread"]
    assert m["rloo/reward_conservative"] == pytest.approx(m["rloo/reward"] - 2.0 * m["rloo/reward_spread"], abs=1e-6)


def test_bad_configs_are_refused_naming_the_field(tmp_path, tiny_gpt2, tiny_llama, trained_pm, prompts_path):
    pm_dir = trained_pm[1].outputs["pm"]
    refusals = [
        (dict(k=1), r"k \(1\) must be >= 2"),
        (dict(total_episodes=20),
         r"total_episodes \(20\) must be a multiple of prompts_per_rollout \* k \(2 \* 4 = 8\)"),
        (dict(mini_batch_size=3), r"prompts_per_rollout \* k \(8\) must be divisible by mini_batch_size \(3\)"),
        (dict(lora_r=4, reference_path=str(tiny_llama)), r"reference_path .* must be policy_path"),
        (dict(estimator="ppo"), r"estimator \('ppo'\)"),
        (dict(kl_coef=-0.1), r"kl_coef \(-0.1\) must be >= 0"),
    ]
    for changes, message in refusals:
        with pytest.raises(ConfigError, match=message):
            run(rloo_config(tmp_path, tiny_gpt2, pm_dir, prompts_path, **changes))
    with pytest.raises(WorkerError, match="different tokenizer"):
        run(rloo_config(tmp_path, tiny_gpt2, pm_dir, prompts_path, reference_path=str(tiny_llama)))


@pytest.mark.parametrize(
    ("estimator", "kl_in_reward"), [("rloo", True), ("grpo", False)], ids=["rloo-kl-in-reward", "grpo-kl-in-loss"]
)
def test_the_pm_reward_rises_as_the_policy_learns_the_marker(tmp_path, tiny_gpt2, trained_pm, prompts_path,
                                                            estimator, kl_in_reward):
    # The PM prefers responses with " please" (four tokens here): it scores about -2.3 without it and
    # +2.2 with it (" plea" about 2.0). The untrained policy samples such a response about once in 500
    # (measured on 2048 samples); with k = 8 a group that holds one gives it a large advantage.
    # Measured over seeds 0, 1, 2 for both settings: the reward stays near -2.3 for 10-15 rollouts, climbs
    # by rollout 23, and the last three of 28 average 1.9 to 2.25 (rises over the first of 4.22 to 4.56).
    cfg = rloo_config(tmp_path, tiny_gpt2, trained_pm[1].outputs["pm"], prompts_path, total_episodes=28 * 32,
                      prompts_per_rollout=4, k=8, mini_batch_size=32, response_length=8, learning_rate=1e-2,
                      kl_coef=0.001, estimator=estimator, kl_in_reward=kl_in_reward, seed=0)
    run(cfg)
    rewards = [r["rloo/reward"] for r in read_lines(cfg)]
    assert len(rewards) == 28
    assert sum(rewards[-3:]) / 3 - rewards[0] > 3.0, rewards
