"""dpo on a tiny model: log-prob sums, the loss at the reference, learning, resume equivalence, ties, bad configs."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.workers.builders import comparison, synthetic_preferences, write_jsonl
from workers.common.config import ConfigError, WorkerError
from workers.common.metrics import read_metrics, sha256_file
from workers.dpo import DPOConfig, main, run, sequence_logps

METRIC_KEYS = {"losses/dpo", "rewards/a", "rewards/b", "rewards/accuracy", "rewards/margin", "charts/pairs_per_s"}


@pytest.fixture(scope="module")
def with_ties(tmp_path_factory) -> Path:
    """48 synthetic comparisons, every third one relabelled a tie."""
    records = synthetic_preferences(48, seed=3)
    for i, rec in enumerate(records):
        if i % 3 == 0:
            rec["choice"] = "tie"
    return write_jsonl(tmp_path_factory.mktemp("dpo") / "ties.jsonl", records)


def _config(model: Path, data: Path, out: Path, **kw) -> DPOConfig:
    base = dict(model_path=str(model), dataset_path=str(data), output_dir=str(out), batch_size=8,
                learning_rate=1e-3, max_steps=12, max_length=48, heldout_fraction=0.2, log_every=1, progress=False)
    return DPOConfig(**{**base, **kw})


def _weights(result) -> dict[str, torch.Tensor]:
    return load_file(Path(result.outputs["policy"]) / "model.safetensors")


def test_sequence_logps_sum_the_response_tokens_only():
    # uniform logits over 8 tokens: each labelled token costs log 8; row 0 has 2 of them, row 1 has 1
    labels = torch.tensor([[-100, -100, 3, 4], [-100, 5, -100, -100]])
    logps = sequence_logps(torch.zeros(2, 4, 8), labels)
    assert logps.tolist() == pytest.approx([-2 * math.log(8), -math.log(8)])
    # a confident logit on the labelled token of row 1 (predicted at position 0) lifts only that row
    logits = torch.zeros(2, 4, 8)
    logits[1, 0, 5] = 100.0
    assert sequence_logps(logits, labels).tolist() == pytest.approx([-2 * math.log(8), 0.0], abs=1e-6)


def test_a_run_changes_the_weights_and_writes_a_loadable_policy(tiny_gpt2, synthetic_path, tmp_path):
    cfg = _config(tiny_gpt2, synthetic_path, tmp_path / "run", max_steps=4, eval_every=2)
    result = run(cfg)
    out = Path(result.output_dir)
    lines = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert all(METRIC_KEYS <= set(r) for r in lines)
    assert [r["step"] for r in lines if "eval/heldout_accuracy" in r] == [2, 4]
    assert result.complete and not (out / "checkpoints").exists()
    assert result.metrics["train/steps"] == 4 and result.metrics["eval/heldout_accuracy"] == lines[-1]["eval/heldout_accuracy"]
    assert result.metrics["data/train_pairs"] + result.metrics["data/heldout_pairs"] == 400
    for rel, sha in result.files.items():
        assert sha256_file(out / rel) == sha
    policy = Path(result.outputs["policy"])
    saved = json.loads((policy / "ratchet_step_config.json").read_text())
    assert saved["step"] == "dpo" and saved["config"]["beta"] == 0.1
    assert json.loads((out / "summary.json").read_text())["metrics"] == result.metrics
    base, tuned = load_file(tiny_gpt2 / "model.safetensors"), _weights(result)
    assert any(not torch.equal(base[k], tuned[k]) for k in tuned)
    lm = AutoModelForCausalLM.from_pretrained(policy)
    loaded = lm.state_dict()
    assert all(torch.equal(loaded[k], tuned[k]) for k in tuned)
    # a finished run is returned as it is, not trained again
    again = run(cfg)
    assert again.files == result.files and again.metrics == result.metrics


def test_the_first_loss_is_log_2_for_decisive_pairs_and_for_ties(tiny_gpt2, tiny_tokenizer, tmp_path):
    # policy == reference (dropout off): every log-ratio is 0, so the logits are 0 and
    # -log sigmoid(0) = log 2 for a decisive pair; a tie costs -(1/2 log sigmoid(0) + 1/2 log sigmoid(0)) = log 2.
    decisive = write_jsonl(tmp_path / "decisive.jsonl", synthetic_preferences(16, seed=1))
    ties = write_jsonl(tmp_path / "ties.jsonl", [{**r, "choice": "tie"} for r in synthetic_preferences(16, seed=2)])
    for data, name in ((decisive, "d"), (ties, "t")):
        result = run(_config(tiny_gpt2, data, tmp_path / name, max_steps=1, heldout_fraction=0.0))
        first = read_metrics(tmp_path / name / "metrics.jsonl")[0]
        assert first["losses/dpo"] == pytest.approx(math.log(2), abs=1e-6)
        assert first["rewards/a"] == pytest.approx(0.0, abs=1e-6) and first["rewards/b"] == pytest.approx(0.0, abs=1e-6)
        assert result.metrics["eval/heldout_accuracy"] is None  # nothing held out
    # no decisive pair in a batch of ties: no accuracy, no margin
    assert first["rewards/accuracy"] is None and first["rewards/margin"] is None


def test_training_raises_the_heldout_implicit_reward_accuracy(tiny_gpt2, synthetic_path, tmp_path):
    # The response ending in " please" wins. Measured (16 steps of 16 pairs, 74 decisive held-out pairs):
    # accuracy 0 before training (all implicit rewards equal, none higher), 1.0 at every evaluation from
    # step 2 on for seeds 0 and 1 and lr 5e-4..2e-3. The same prompts and responses with random labels
    # stay at 0.45-0.54, so the threshold is reached by the labels, not by the responses' lengths.
    result = run(_config(tiny_gpt2, synthetic_path, tmp_path / "learn", batch_size=16, max_steps=16, eval_every=8))
    lines = read_metrics(tmp_path / "learn" / "metrics.jsonl")
    assert result.metrics["eval/heldout_accuracy"] > 0.9
    assert result.metrics["data/heldout_decisive_pairs"] == 74
    assert lines[-1]["losses/dpo"] < 0.5 * lines[0]["losses/dpo"] and lines[-1]["rewards/margin"] > 0
    rng = random.Random(5)
    noise = write_jsonl(tmp_path / "noise.jsonl", [{**r, "choice": rng.choice("ab")} for r in synthetic_preferences(400)])
    control = run(_config(tiny_gpt2, noise, tmp_path / "noise", batch_size=16, max_steps=16))
    assert control.metrics["eval/heldout_accuracy"] < 0.7


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_gpt2, synthetic_path, tmp_path):
    whole = run(_config(tiny_gpt2, synthetic_path, tmp_path / "whole", max_steps=8))
    part = run(_config(tiny_gpt2, synthetic_path, tmp_path / "split", max_steps=8, max_steps_this_run=3))
    assert not part.complete and (tmp_path / "split" / "checkpoints").is_dir() and part.metrics["steps_done"] == 3
    resumed = run(_config(tiny_gpt2, synthetic_path, tmp_path / "split", max_steps=8))
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")] == list(range(1, 9))
    assert resumed.metrics["eval/heldout_accuracy"] == whole.metrics["eval/heldout_accuracy"]


def test_ties_drop_leaves_them_out_and_keep_trains_on_them(tiny_gpt2, with_ties, tmp_path):
    keep = run(_config(tiny_gpt2, with_ties, tmp_path / "keep", max_steps=2, heldout_fraction=0.0))
    drop = run(_config(tiny_gpt2, with_ties, tmp_path / "drop", max_steps=2, heldout_fraction=0.0, ties="drop"))
    assert keep.metrics["data/train_pairs"] == 48 and keep.metrics["data/train_ties"] == 16
    assert keep.metrics["data/ties_dropped"] == 0
    assert drop.metrics["data/train_pairs"] == 32 and drop.metrics["data/train_ties"] == 0
    assert drop.metrics["data/ties_dropped"] == 16
    # the same data order over different pairs: the two runs end with different weights
    a, b = _weights(keep), _weights(drop)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    only_ties = write_jsonl(tmp_path / "only_ties.jsonl", [comparison("p", " x", " y", "tie")] * 4)
    with pytest.raises(WorkerError, match=r"no training pairs.*ties drop \(4 tie"):
        run(_config(tiny_gpt2, only_ties, tmp_path / "none", heldout_fraction=0.0, ties="drop"))


def test_lora_trains_adapters_and_saves_a_merged_policy(tiny_gpt2, synthetic_path, tmp_path):
    result = run(_config(tiny_gpt2, synthetic_path, tmp_path / "lora", max_steps=3, lora_r=4, learning_rate=1e-2))
    tuned = _weights(result)
    assert not any("lora" in k for k in tuned)
    base = load_file(tiny_gpt2 / "model.safetensors")
    assert tuned.keys() == base.keys() and any(not torch.equal(base[k], tuned[k]) for k in tuned)
    with pytest.raises(ConfigError, match="ref_model_path"):
        run(_config(tiny_gpt2, synthetic_path, tmp_path / "x", lora_r=4, ref_model_path=str(tmp_path)))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("beta", 0.0, r"beta \(0.0\) must be > 0"),
        ("beta", -1.0, r"beta \(-1.0\) must be > 0"),
        ("label_smoothing", 0.5, r"label_smoothing \(0.5\) must be in \[0, 0.5\)"),
        ("loss_type", "hinge", r"loss_type \('hinge'\) must be one of sigmoid, ipo"),
        ("ties", "maybe", r"ties \('maybe'\) must be keep or drop"),
        ("heldout_fraction", 1.0, r"heldout_fraction \(1.0\) must be in \[0, 1\)"),
    ],
)
def test_bad_config_values_are_refused_by_name(tiny_gpt2, synthetic_path, tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message):
        run(_config(tiny_gpt2, synthetic_path, tmp_path / "bad", **{field: value}))
    assert not (tmp_path / "bad").exists()


def test_ipo_and_a_changed_config_on_resume(tiny_gpt2, synthetic_path, tmp_path):
    # IPO at logits 0: (0 - 1 / (2 beta))^2 = 25 for beta 0.1
    run(_config(tiny_gpt2, synthetic_path, tmp_path / "ipo", max_steps=2, max_steps_this_run=1, loss_type="ipo"))
    first = read_metrics(tmp_path / "ipo" / "metrics.jsonl")[0]
    assert first["losses/dpo"] == pytest.approx(25.0, rel=1e-5)
    with pytest.raises(WorkerError, match="different config"):
        run(_config(tiny_gpt2, synthetic_path, tmp_path / "ipo", max_steps=2, loss_type="sigmoid"))


def test_the_command_line_prints_the_result(tiny_gpt2, synthetic_path, tmp_path, capsys):
    config = tmp_path / "dpo.json"
    config.write_text(json.dumps({"model_path": str(tiny_gpt2), "dataset_path": str(synthetic_path),
                                  "output_dir": str(tmp_path / "cli"), "max_steps": 1, "batch_size": 4}))
    assert main(["--config", str(config), "progress=false", "max_length=48"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["step"] == "dpo" and printed["complete"] and printed["outputs"]["policy"].endswith("policy")
    assert main(["--config", str(config), "beta=0"]) == 2
