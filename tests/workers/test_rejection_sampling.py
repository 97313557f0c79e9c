"""The rejection_sampling step: its selection and loss by hand, whole runs on tiny models, an exact resume,
LoRA, refusals, and the PM score of the policy's samples rising round by round."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.workers.builders import write_jsonl
from workers.best_of_n import pick_best
from workers.common.config import ConfigError, WorkerError, to_dict
from workers.common.modeling import load_causal_lm, load_tokenizer
from workers.rejection_sampling import RejectionSamplingConfig, anchored_sft_loss, main, run
from workers.sft import SFTConfig
from workers.sft import run as sft

ROUND_KEYS = ("rs/winner_score", "rs/mean_score", "rs/winners", "losses/sft", "losses/kl", "rs/kl", "rs/episodes",
              "charts/episodes_per_s", "policy/reward", "policy/reward_spread", "policy/kl", "policy/episodes")


def rs_config(out: Path, policy: Path, pm_dir: str, prompts: Path, **changes) -> RejectionSamplingConfig:
    base = dict(
        policy_path=str(policy), reference_path=str(policy), pm_path=str(pm_dir), prompts_path=str(prompts),
        output_dir=str(out / "rs"), rounds=2, prompts_per_round=8, n=4, response_length=8, sft_steps_per_round=4,
        batch_size=8, learning_rate=1e-3, progress=False, seed=3,
    )
    base.update(changes)
    return RejectionSamplingConfig(**base)


def metric_lines(cfg: RejectionSamplingConfig) -> list[dict]:
    return [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


@pytest.fixture(scope="module")
def speaking_policy(tmp_path_factory, tiny_gpt2, synthetic_path) -> Path:
    """tiny_gpt2 fine-tuned briefly on both responses of the synthetic comparisons: it answers in the
    comparisons' words and ends about half its answers with " please", which the trained_pm fixture prefers."""
    root = tmp_path_factory.mktemp("speaking")
    rows = [json.loads(x) for x in synthetic_path.read_text().splitlines()]
    data = write_jsonl(root / "responses.jsonl",
                       [{"prompt": r["prompt"], "response": r[k]} for r in rows for k in ("response_a", "response_b")])
    return Path(sft(SFTConfig(
        model_path=str(tiny_gpt2), dataset_path=str(data), output_dir=str(root / "sft"), max_steps=60, batch_size=32,
        learning_rate=1e-2, max_length=64, disable_dropout=True, progress=False,
    )).outputs["policy"])


# -- the math by hand -------------------------------------------------------------------


def test_pick_best_takes_each_prompts_highest_score_and_its_mean():
    best = pick_best(torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, -3.0]]))
    assert best.index.tolist() == [1, 0]  # equal scores: the first sample
    assert best.score.tolist() == [3.0, 0.0]
    assert best.mean.tolist() == pytest.approx([2.0, -1.0])


def test_anchored_sft_loss_by_hand():
    # One loss token (position 2, predicted at position 1), vocabulary of 2: pi = (1/2, 1/2), pi_ref = (3/4, 1/4).
    # NLL of token 0 = log 2; KL = 1/2 log(1/2 / 3/4) + 1/2 log(1/2 / 1/4) = 1/2 log(4/3).
    logits = torch.tensor([[[9.0, -9.0], [0.0, 0.0], [5.0, 1.0]]])
    ref_logits = torch.tensor([[[-9.0, 9.0], [math.log(3.0), 0.0], [0.0, 7.0]]])
    labels = torch.tensor([[-100, -100, 0]])
    loss, stats = anchored_sft_loss(logits, ref_logits, labels, kl_coef=0.5)
    assert float(stats.nll) == pytest.approx(math.log(2))
    assert float(stats.kl) == pytest.approx(0.5 * math.log(4 / 3))
    assert float(loss) == pytest.approx(math.log(2) + 0.25 * math.log(4 / 3))
    assert int(stats.tokens) == 1
    # the policy as its own reference: KL exactly 0, the loss is the NLL
    loss, stats = anchored_sft_loss(logits, logits, labels, kl_coef=3.0)
    assert float(stats.kl) == 0.0 and float(loss) == pytest.approx(math.log(2))
    # two loss tokens: both terms are means over them
    labels = torch.tensor([[-100, 1, 0]])
    _, stats = anchored_sft_loss(logits, ref_logits, labels, kl_coef=0.5)
    nll_first = -torch.log_softmax(logits[0, 0], -1)[1]
    assert float(stats.nll) == pytest.approx(float(nll_first + math.log(2)) / 2)


# -- whole runs -------------------------------------------------------------------------


def test_a_run_writes_a_loadable_policy_winners_and_every_rounds_metrics(tmp_path, speaking_policy, ensemble_pm,
                                                                       trained_pm, prompts_path):
    cfg = rs_config(tmp_path, speaking_policy, ensemble_pm, prompts_path, test_pm_path=trained_pm[1].outputs["pm"],
                    ensemble_penalty=1.0, missing_eos_penalty=10.0)
    result = run(cfg)
    assert result.complete and result.step == "rejection_sampling"
    policy = Path(result.outputs["policy"])
    lm, tokenizer = load_causal_lm(policy, device=torch.device("cpu"), dtype=torch.float32), load_tokenizer(policy)
    assert lm.config.vocab_size == len(tokenizer)
    before, after = weights(speaking_policy), weights(policy)
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)
    lines = metric_lines(cfg)
    assert [r["step"] for r in lines] == [1, 2]
    for line in lines:
        assert all(key in line for key in ROUND_KEYS + ("policy/reward_test_pm", "rs/reward_test_pm"))
        # the selection score: members' mean - 1.0 * their spread, less 10 for each response without EOS
        assert line["rs/mean_score"] == pytest.approx(
            line["policy/reward"] - line["policy/reward_spread"] - 10.0 * (1 - line["rs/eos_fraction"]), abs=1e-5)
        assert line["rs/winner_score"] >= line["rs/mean_score"]
        assert line["policy/kl"] == line["rs/kl"]
    assert lines[0]["policy/reward_spread"] > 0
    assert abs(lines[0]["policy/kl"]) < 1e-5  # the first samples come from the reference itself
    assert [r["policy/episodes"] for r in lines] == [32, 64]
    winners = [json.loads(x) for x in (Path(cfg.output_dir) / "winners.jsonl").read_text().splitlines()]
    assert len(winners) == 16 and [w["round"] for w in winners] == [1] * 8 + [2] * 8
    assert all(w["score"] >= w["mean_score"] and 0 <= w["sample"] < 4 for w in winners)
    assert {w["prompt_id"] for w in winners} <= {f"p{i}" for i in range(8)}
    assert not (Path(cfg.output_dir) / "checkpoints").exists()
    # A finished run is not run again; another config in its output_dir is refused.
    log = (Path(cfg.output_dir) / "metrics.jsonl").read_text()
    assert run(cfg).metrics == result.metrics
    assert (Path(cfg.output_dir) / "metrics.jsonl").read_text() == log
    with pytest.raises(WorkerError, match="different config"):
        run(rs_config(tmp_path, speaking_policy, ensemble_pm, prompts_path, n=3))


def test_a_run_stopped_after_each_round_resumes_to_bitwise_equal_weights(tmp_path, speaking_policy, trained_pm,
                                                                       prompts_path):
    pm_dir = trained_pm[1].outputs["pm"]
    changes = dict(rounds=3, keep_winners=True, kl_coef=0.1, min_margin=0.01)
    whole = run(rs_config(tmp_path / "a", speaking_policy, pm_dir, prompts_path, **changes))
    b = tmp_path / "b"
    for done in (1, 2):
        partial = run(rs_config(b, speaking_policy, pm_dir, prompts_path, max_rounds_this_run=1, **changes))
        assert not partial.complete and partial.metrics["rs/rounds_done"] == done
        assert (b / "rs" / "checkpoints" / f"step-{done:08d}").is_dir()
    resumed = run(rs_config(b, speaking_policy, pm_dir, prompts_path, **changes))
    wa, wb = weights(whole.outputs["policy"]), weights(resumed.outputs["policy"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = metric_lines(whole), metric_lines(resumed)
    assert len(la) == len(lb) == 3
    for ra, rb in zip(la, lb):
        ra.pop("charts/episodes_per_s"), rb.pop("charts/episodes_per_s")
        assert ra == rb
    # keep_winners: each round trains on every winner so far
    assert [r["rs/train_examples"] for r in la] == [sum(x["rs/winners"] for x in la[: i + 1]) for i in range(3)]
    assert (tmp_path / "a" / "rs" / "winners.jsonl").read_text() == (b / "rs" / "winners.jsonl").read_text()


def test_lora_trains_adapters_and_saves_a_merged_policy(tmp_path, speaking_policy, trained_pm, prompts_path):
    cfg = rs_config(tmp_path, speaking_policy, trained_pm[1].outputs["pm"], prompts_path, lora_r=4, learning_rate=1e-2,
                    kl_coef=0.5)
    result = run(cfg)
    before, after = weights(speaking_policy), weights(result.outputs["policy"])
    assert set(after) == set(before)  # merged: plain GPT-2 weights, no adapter tensors
    assert {t.dtype for t in after.values()} == {torch.float32}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    lines = metric_lines(cfg)
    assert abs(lines[0]["policy/kl"]) < 1e-5  # adapters start at zero: the policy is the reference
    assert lines[-1]["losses/kl"] > 0


def test_a_margin_no_best_reaches_keeps_no_winner_and_leaves_the_policy(tmp_path, speaking_policy, trained_pm,
                                                                       prompts_path, capsys):
    cfg = rs_config(tmp_path, speaking_policy, trained_pm[1].outputs["pm"], prompts_path)
    config_file = tmp_path / "rs.json"
    config_file.write_text(json.dumps(to_dict(cfg)))
    assert main(["--config", str(config_file), "min_margin=100"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["complete"] and result["metrics"]["rs/winners_total"] == 0
    assert all(r["rs/winners"] == 0 and r["losses/sft"] is None for r in metric_lines(cfg))
    before, after = weights(speaking_policy), weights(result["outputs"]["policy"])
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_configs_and_inputs_are_refused_naming_the_field(tmp_path, speaking_policy, tiny_llama, trained_pm,
                                                             prompts_path):
    pm_dir = trained_pm[1].outputs["pm"]
    for changes, message in (
        (dict(n=1), r"n \(1\) must be >= 2"),
        (dict(rounds=0), r"rounds \(0\) must be >= 1"),
        (dict(sft_steps_per_round=0), r"sft_steps_per_round \(0\) must be >= 1"),
        (dict(max_rounds_this_run=0), r"max_rounds_this_run \(0\) must be >= 1 or null"),
        (dict(min_margin=-0.5), r"min_margin \(-0.5\) must be >= 0 or null"),
        (dict(kl_coef=-0.1), r"kl_coef \(-0.1\) must be >= 0"),
        (dict(ensemble_penalty=-1.0), r"ensemble_penalty \(-1.0\) must be >= 0"),
        (dict(temperature=0.0), r"temperature \(0.0\) must be > 0"),
        (dict(learning_rate=0.0), r"learning_rate \(0.0\) must be > 0"),
        (dict(lora_r=4, reference_path=str(tiny_llama)), r"reference_path .* must be policy_path"),
        (dict(dtype="float16"), "float16"),
    ):
        with pytest.raises(ConfigError, match=message):
            run(rs_config(tmp_path, speaking_policy, pm_dir, prompts_path, **changes))
    with pytest.raises(WorkerError, match="preference model"):
        run(rs_config(tmp_path, speaking_policy, tmp_path / "missing", prompts_path))
    with pytest.raises(WorkerError, match="different tokenizer"):
        run(rs_config(tmp_path, speaking_policy, pm_dir, prompts_path, reference_path=str(tiny_llama)))
    # a checkpoint written with another config is not resumed
    run(rs_config(tmp_path, speaking_policy, pm_dir, prompts_path, max_rounds_this_run=1))
    with pytest.raises(WorkerError, match=r"different config \(learning_rate"):
        run(rs_config(tmp_path, speaking_policy, pm_dir, prompts_path, learning_rate=3e-3))


# -- learning ---------------------------------------------------------------------------


def test_the_pm_score_of_the_policys_samples_rises_and_the_kl_anchor_holds_it_near_the_reference(
        tmp_path, speaking_policy, trained_pm, prompts_path):
    pm_dir = trained_pm[1].outputs["pm"]
    gains, kls = [], []
    for seed in range(3):
        cfg = rs_config(tmp_path / str(seed), speaking_policy, pm_dir, prompts_path, rounds=4, seed=seed)
        assert run(cfg).complete
        lines = metric_lines(cfg)
        rewards = [r["policy/reward"] for r in lines]  # round k's samples come from the policy after k - 1 rounds
        gains.append(rewards[-1] - rewards[0])
        kls.append(lines[-1]["policy/kl"])
        print(f"seed {seed}: PM score of the samples by round {[round(x, 2) for x in rewards]}, "
              f"KL {[round(r['policy/kl'], 2) for r in lines]}")
    # Measured: the trained PM scores about +2.25 for an answer ending in " please" and -2.3 otherwise;
    # the samples' mean rose by 2.83, 3.12 and 2.78 over three rounds of training (from about -1.1).
    assert min(gains) > 1.5
    anchored = run(rs_config(tmp_path / "anchored", speaking_policy, pm_dir, prompts_path, rounds=4, seed=0,
                             kl_coef=5.0))
    # Measured: a KL of 3.7 nats per response after three rounds unanchored, 0.08 with kl_coef 5.
    assert anchored.metrics["policy/kl"] < kls[0] / 4
