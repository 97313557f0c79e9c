"""online_dpo on tiny models: pair labels by hand, outputs and metrics, exact resume, LoRA, ties, IPO,
an ensemble's conservative score, refusals, and learning against the synthetic PM (which prefers " please")."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.workers.builders import synthetic_preferences, write_jsonl
from workers.common.config import ConfigError, WorkerError
from workers.common.data import load_prompts
from workers.common.generation import row_seed, row_uniforms
from workers.common.metrics import read_metrics, sha256_file
from workers.common.modeling import load_causal_lm, load_tokenizer
from workers.common.policy_step import conservative_reward
from workers.common.rollout import encode_prompts, pm_scores, sample_with_kl
from workers.common.score import load_pm
from workers.online_dpo import OnlineDPOConfig, label_pairs, main, run

ROUND_KEYS = {
    "online_dpo/reward", "online_dpo/reward_spread", "online_dpo/reward_conservative", "online_dpo/score_gap",
    "online_dpo/pairs", "online_dpo/ties", "online_dpo/identical", "online_dpo/kl", "online_dpo/sqrt_kl",
    "online_dpo/eos_fraction", "online_dpo/response_length", "online_dpo/episodes", "losses/dpo", "rewards/accuracy",
    "rewards/margin", "optim/grad_norm", "charts/episodes_per_s",
    "policy/reward", "policy/reward_spread", "policy/kl", "policy/episodes",
}


def _config(policy: Path, pm: str, prompts: Path, out: Path, **kw) -> OnlineDPOConfig:
    base = dict(policy_path=str(policy), reference_path=str(policy), pm_path=pm, prompts_path=str(prompts),
                output_dir=str(out), rounds=2, prompts_per_round=8, response_length=8, batch_size=4, epochs=1,
                learning_rate=1e-3, seed=3, progress=False)
    return OnlineDPOConfig(**{**base, **kw})


def _weights(result) -> dict[str, torch.Tensor]:
    return load_file(Path(result.outputs["policy"]) / "model.safetensors")


def _rounds(result) -> list[dict]:
    return read_metrics(Path(result.output_dir) / "metrics.jsonl")


def mean_pm_score(policy: str | Path, reference: Path, pm: str, prompts: Path, *, samples: int = 8, length: int = 12):
    """(mean PM score, mean KL to ``reference``) of ``samples`` responses to every prompt, drawn with fixed
    random numbers, so two policies are compared on the same draws."""
    tokenizer = load_tokenizer(policy)
    ids = encode_prompts(tokenizer, load_prompts(prompts), max_prompt_tokens=None)
    rows = [p for p in ids for _ in range(samples)]
    uniforms = torch.stack(
        [row_uniforms(row_seed(99, "eval", j, s), length) for j in range(len(ids)) for s in range(samples)]
    )
    cpu = torch.device("cpu")
    responses, kls = sample_with_kl(
        load_causal_lm(policy, device=cpu, dtype=torch.float32).eval(),
        load_causal_lm(reference, device=cpu, dtype=torch.float32).eval(),
        rows, uniforms=uniforms, max_new_tokens=length, temperature=1.0, eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
    )
    return float(pm_scores(load_pm(pm, device="cpu"), rows, responses, 64).mean()), float(kls.mean())


# -- the labelling math -----------------------------------------------------------------


def conservative_scores(members: torch.Tensor, ensemble_penalty: float) -> torch.Tensor:
    """The labelling score of responses that all ended with EOS (so no missing-EOS penalty)."""
    ended = torch.ones(members.shape[1], dtype=torch.bool)
    return conservative_reward(members, ended, ensemble_penalty=ensemble_penalty, missing_eos_penalty=None).reward


def test_conservative_scores_and_pair_labels_by_hand():
    # members [[1, 3, 0], [3, 3, 0]]: means [2, 3, 0], population stds [1, 0, 0]
    members = torch.tensor([[1.0, 3.0, 0.0], [3.0, 3.0, 0.0]])
    assert conservative_scores(members, 0.0).tolist() == [2.0, 3.0, 0.0]
    assert conservative_scores(members, 0.5).tolist() == [1.5, 3.0, 0.0]
    assert conservative_scores(members[:1], 2.0).tolist() == [1.0, 3.0, 0.0]  # one member: no spread
    # gaps A - B: 2, -0.3, 0.05, 0 (distinct), 0 (identical)
    a = torch.tensor([3.0, 1.0, 0.55, 0.2, 0.7])
    b = torch.tensor([1.0, 1.3, 0.5, 0.2, 0.7])
    identical = torch.tensor([False, False, False, False, True])
    keep = label_pairs(a, b, identical, min_gap=0.1, ties="keep")
    assert keep.gap.tolist() == pytest.approx([2.0, -0.3, 0.05, 0.0, 0.0])
    assert keep.target.tolist() == [1.0, 0.0, 0.5, 0.5, 0.5]
    assert keep.tie.tolist() == [False, False, True, True, False]  # the identical pair is dropped, not a tie
    assert keep.keep.tolist() == [True, True, True, True, False]
    drop = label_pairs(a, b, identical, min_gap=0.1, ties="drop")
    assert drop.keep.tolist() == [True, True, False, False, False]
    # min_gap 0: only an exactly equal score ties
    exact = label_pairs(a, b, identical, min_gap=0.0, ties="keep")
    assert exact.target.tolist() == [1.0, 0.0, 1.0, 0.5, 0.5]
    assert exact.tie.tolist() == [False, False, False, True, False]


# -- the step ---------------------------------------------------------------------------


def test_a_run_writes_a_loadable_policy_and_its_round_metrics(tiny_gpt2, trained_pm, prompts_path, tmp_path, capsys):
    pm = trained_pm[1].outputs["pm"]
    # batch_size 16 >= 8 pairs: one optimizer step a round, so round 1's step is taken at the reference
    cfg = _config(tiny_gpt2, pm, prompts_path, tmp_path / "run", test_pm_path=pm, batch_size=16)
    result = run(cfg)
    out = Path(result.output_dir)
    lines = _rounds(result)
    assert result.complete and result.step == "online_dpo" and [r["step"] for r in lines] == [1, 2]
    assert all(ROUND_KEYS | {"online_dpo/reward_test_pm", "policy/reward_test_pm"} <= set(r) for r in lines)
    first = lines[0]
    # the policy is the reference: KL 0, implicit rewards 0, the loss log 2, no pair ranked right yet
    assert first["policy/kl"] == pytest.approx(0.0, abs=1e-6) and first["online_dpo/kl"] == first["policy/kl"]
    assert first["losses/dpo"] == pytest.approx(math.log(2), abs=1e-6) and first["optim/steps"] == 1
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-6) and first["rewards/accuracy"] == 0.0
    assert first["online_dpo/pairs"] + first["online_dpo/identical"] == 8 and first["online_dpo/ties"] == 0
    assert [r["policy/episodes"] for r in lines] == [16, 32] and [r["online_dpo/episodes"] for r in lines] == [16, 32]
    assert first["policy/reward"] == first["online_dpo/reward"] == pytest.approx(first["online_dpo/reward_test_pm"])
    assert lines[1]["policy/kl"] != 0.0  # the policy moved
    assert result.metrics["online_dpo/rounds"] == 2 and result.metrics["policy/reward"] == lines[-1]["policy/reward"]
    assert not (out / "checkpoints").exists()
    for rel, sha in result.files.items():
        assert sha256_file(out / rel) == sha
    policy = Path(result.outputs["policy"])
    assert json.loads((policy / "ratchet_step_config.json").read_text())["config"]["rounds"] == 2
    assert json.loads((out / "summary.json").read_text())["metrics"] == result.metrics
    base, tuned = load_file(tiny_gpt2 / "model.safetensors"), _weights(result)
    assert {t.dtype for t in tuned.values()} == {torch.float32}
    assert any(not torch.equal(base[k], tuned[k]) for k in tuned)
    loaded = AutoModelForCausalLM.from_pretrained(policy).state_dict()
    assert all(torch.equal(loaded[k], tuned[k]) for k in tuned)
    # a finished run is returned as it is, not trained again, from the command line too
    again = run(cfg)
    assert again.files == result.files and again.metrics == result.metrics
    config = tmp_path / "online_dpo.json"
    config.write_text(json.dumps({k: v for k, v in vars(cfg).items()}))
    assert main(["--config", str(config)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["step"] == "online_dpo" and printed["complete"] and printed["files"] == result.files
    with pytest.raises(WorkerError, match="different config"):
        run(_config(tiny_gpt2, pm, prompts_path, tmp_path / "run", test_pm_path=pm, batch_size=16, beta=0.5))


def test_a_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(tiny_gpt2, trained_pm, prompts_path, tmp_path):
    pm = trained_pm[1].outputs["pm"]
    whole = run(_config(tiny_gpt2, pm, prompts_path, tmp_path / "whole", rounds=3, epochs=2))
    # checkpoint_every does not change what a run computes; stopping early writes a checkpoint anyway
    part = run(_config(tiny_gpt2, pm, prompts_path, tmp_path / "split", rounds=3, epochs=2, max_rounds_this_run=1,
                       checkpoint_every=2))
    assert not part.complete and part.metrics == {"rounds_done": 1, "rounds": 3}
    assert (tmp_path / "split" / "checkpoints" / "step-00000001").is_dir()
    with pytest.raises(WorkerError, match=r"different config \(min_gap: 0.0 then, 0.5 now\)"):
        run(_config(tiny_gpt2, pm, prompts_path, tmp_path / "split", rounds=3, epochs=2, min_gap=0.5))
    resumed = run(_config(tiny_gpt2, pm, prompts_path, tmp_path / "split", rounds=3, epochs=2))
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = _rounds(whole), _rounds(resumed)
    assert [r["step"] for r in rb] == [1, 2, 3]
    for x, y in zip(ra, rb):  # everything but the timing
        x.pop("charts/episodes_per_s"), y.pop("charts/episodes_per_s")
        assert x == y


def test_lora_trains_adapters_against_the_adapters_off_reference_and_saves_merged(tiny_gpt2, trained_pm, prompts_path,
                                                                                 tmp_path):
    pm = trained_pm[1].outputs["pm"]
    result = run(_config(tiny_gpt2, pm, prompts_path, tmp_path / "lora", lora_r=4, learning_rate=1e-2, batch_size=16))
    tuned, base = _weights(result), load_file(tiny_gpt2 / "model.safetensors")
    assert tuned.keys() == base.keys() and not any("lora" in k for k in tuned)
    assert any(not torch.equal(base[k], tuned[k]) for k in tuned)
    first, second = _rounds(result)
    # LoRA's B starts at 0: the adapted policy is the reference until the first step
    assert first["policy/kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["losses/dpo"] == pytest.approx(math.log(2), abs=1e-6)
    assert second["policy/kl"] != 0.0
    with pytest.raises(ConfigError, match="reference_path"):
        run(_config(tiny_gpt2, pm, prompts_path, tmp_path / "x", lora_r=4, reference_path=str(tmp_path)))


def test_ties_at_the_reference_move_nothing_and_ipo_starts_at_its_target(tiny_gpt2, trained_pm, prompts_path, tmp_path):
    pm = trained_pm[1].outputs["pm"]
    base = load_file(tiny_gpt2 / "model.safetensors")
    # min_gap above any score gap: every distinct pair is a tie. Kept, its loss at the reference is log 2 with
    # zero gradient (the tie's target is the reference's logits 0), so no weight moves; dropped, nothing trains.
    keep = run(_config(tiny_gpt2, pm, prompts_path, tmp_path / "keep", min_gap=100.0))
    drop = run(_config(tiny_gpt2, pm, prompts_path, tmp_path / "drop", min_gap=100.0, ties="drop"))
    for result in (keep, drop):
        assert all(torch.equal(base[k], v) for k, v in _weights(result).items())
    for r in _rounds(keep):
        assert r["online_dpo/ties"] == r["online_dpo/pairs"] > 0 and r["losses/dpo"] == pytest.approx(math.log(2))
        assert r["rewards/accuracy"] is None and r["policy/kl"] == pytest.approx(0.0, abs=1e-6)
    for r in _rounds(drop):
        assert r["online_dpo/pairs"] == 0 and r["online_dpo/ties"] > 0 and r["losses/dpo"] is None
    # IPO at logits 0 on decisive pairs: (0 - 1 / (2 beta))^2 = 25 for beta 0.1
    ipo = run(_config(tiny_gpt2, pm, prompts_path, tmp_path / "ipo", rounds=1, loss_type="ipo", batch_size=16))
    (line,) = _rounds(ipo)
    assert line["online_dpo/ties"] == 0 and line["losses/dpo"] == pytest.approx(25.0, rel=1e-5)


def test_an_ensemble_pm_labels_by_the_conservative_score(tiny_gpt2, ensemble_pm, prompts_path, tmp_path):
    runs = {
        lam: run(_config(tiny_gpt2, str(ensemble_pm), prompts_path, tmp_path / str(lam), rounds=1,
                         ensemble_penalty=lam))
        for lam in (0.0, 50.0)
    }
    lines = {lam: _rounds(r)[0] for lam, r in runs.items()}
    for lam, m in lines.items():
        assert m["policy/reward_spread"] > 0
        expected = m["online_dpo/reward"] - lam * m["online_dpo/reward_spread"]
        assert m["online_dpo/reward_conservative"] == pytest.approx(expected, abs=1e-4)
    # the same samples; a large penalty ranks them by the members' disagreement, so the labels and the weights differ
    assert lines[0.0]["online_dpo/reward"] == lines[50.0]["online_dpo/reward"]
    w0, w50 = _weights(runs[0.0]), _weights(runs[50.0])
    assert any(not torch.equal(w0[k], w50[k]) for k in w0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("beta", 0.0, r"beta \(0.0\) must be > 0"),
        ("loss_type", "hinge", r"loss_type \('hinge'\) must be one of sigmoid, ipo"),
        ("ties", "maybe", r"ties \('maybe'\) must be keep or drop"),
        ("min_gap", -1.0, r"min_gap \(-1.0\) must be >= 0"),
        ("temperature", 0.0, r"temperature \(0.0\) must be > 0"),
        ("epochs", 0, r"epochs \(0\) must be >= 1"),
        ("prompts_per_round", 0, r"prompts_per_round \(0\) must be >= 1"),
        ("max_rounds_this_run", 0, r"max_rounds_this_run \(0\) must be >= 1 or null"),
        ("ensemble_penalty", -1.0, r"ensemble_penalty \(-1.0\) must be >= 0"),
        ("max_grad_norm", 0.0, r"max_grad_norm \(0.0\) must be > 0 or null"),
        ("dtype", "float16", r"float16"),
    ],
)
def test_bad_config_values_are_refused_by_name(tiny_gpt2, trained_pm, prompts_path, tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message):
        run(_config(tiny_gpt2, trained_pm[1].outputs["pm"], prompts_path, tmp_path / "bad", **{field: value}))
    assert not (tmp_path / "bad").exists()


def test_bad_inputs_are_refused(tiny_gpt2, tiny_llama, trained_pm, prompts_path, tmp_path):
    pm = trained_pm[1].outputs["pm"]
    with pytest.raises(WorkerError, match="preference model"):
        run(_config(tiny_gpt2, str(tmp_path / "missing"), prompts_path, tmp_path / "a"))
    with pytest.raises(WorkerError, match="different tokenizer"):
        run(_config(tiny_gpt2, pm, prompts_path, tmp_path / "b", reference_path=str(tiny_llama)))
    with pytest.raises(WorkerError, match=r"response_length \(600\) exceeds the policy's 512 positions"):
        run(_config(tiny_gpt2, pm, prompts_path, tmp_path / "c", response_length=600))
    assert not any((tmp_path / name).exists() for name in "abc")


# -- learning -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def p0(tiny_gpt2, tmp_path_factory) -> Path:
    """tiny_gpt2 fine-tuned briefly on synthetic answers, a quarter of them ending in " please" (which the
    trained_pm fixture prefers), so the policy's own samples sometimes hold what the PM rewards."""
    from workers.sft import SFTConfig
    from workers.sft import run as sft

    rng = random.Random(0)
    records = []
    for r in synthetic_preferences(200, seed=7):
        good, bad = (r["response_a"], r["response_b"]) if r["choice"] == "a" else (r["response_b"], r["response_a"])
        records.append({"prompt": r["prompt"], "response": good if rng.random() < 0.25 else bad})
    root = tmp_path_factory.mktemp("online_dpo_p0")
    data = write_jsonl(root / "sft.jsonl", records)
    return Path(sft(SFTConfig(
        model_path=str(tiny_gpt2), dataset_path=str(data), output_dir=str(root / "sft"), max_steps=60, batch_size=16,
        learning_rate=1e-2, max_length=48, disable_dropout=True, progress=False,
    )).outputs["policy"])


@pytest.fixture(scope="module")
def contrary_pm(tiny_gpt2, tmp_path_factory) -> str:
    """A PM trained as trained_pm is, on the same comparisons with every label reversed (" please" loses)."""
    from workers.train_pm import TrainPMConfig
    from workers.train_pm import run as train_pm

    root = tmp_path_factory.mktemp("online_dpo_contrary")
    reversed_ = [{**r, "choice": "b" if r["choice"] == "a" else "a"} for r in synthetic_preferences(400)]
    return train_pm(TrainPMConfig(
        model_path=str(tiny_gpt2), dataset_path=str(write_jsonl(root / "reversed.jsonl", reversed_)),
        output_dir=str(root / "pm"), heldout_fraction=0.2, batch_size=16, learning_rate=3e-3, max_steps=24,
        max_length=64, progress=False,
    )).outputs["pm"]


def test_online_dpo_raises_the_pm_score_of_the_policys_samples(p0, trained_pm, contrary_pm, prompts_path, tmp_path):
    # Measured (4 rounds of 32 prompts, 64 fixed draws scored by trained_pm before and after): P0 scores -1.38
    # (about one response in five holds " please"; the PM gives +2.2 with it, -2.3 without); trained against
    # trained_pm it ends at -0.06, 0.42, 1.05 (seeds 0, 1, 2; 0.91 and 0.73 for seeds 3, 4): gains 1.3 to 2.4.
    # Against contrary_pm (the same comparisons, labels reversed) it ends at -2.31 for every seed: the
    # direction comes from the PM's labels, not from DPO on any pairs of its own samples.
    pm = trained_pm[1].outputs["pm"]
    learn = dict(rounds=4, prompts_per_round=32, response_length=12, batch_size=8, epochs=2, learning_rate=1e-3, seed=0)
    before, _ = mean_pm_score(p0, p0, pm, prompts_path)
    result = run(_config(p0, pm, prompts_path, tmp_path / "learn", **learn))
    after, kl = mean_pm_score(result.outputs["policy"], p0, pm, prompts_path)
    lines = _rounds(result)
    per_round = [round(r["policy/reward"], 2) for r in lines]
    print(f"PM score {before:.3f} -> {after:.3f} at KL {kl:.2f}; on-policy reward per round {per_round}")
    assert -2.2 < before < -0.5  # some of P0's samples hold " please", most do not: room to rise
    assert after > before + 0.7
    assert lines[-1]["policy/reward"] > lines[0]["policy/reward"] and lines[-1]["policy/kl"] > 0.5
    contrary = run(_config(p0, contrary_pm, prompts_path, tmp_path / "contrary", **learn))
    after_contrary, _ = mean_pm_score(contrary.outputs["policy"], p0, pm, prompts_path)
    assert after_contrary < before - 0.5
