"""sft on a tiny model: response-only loss, learning, resume equivalence, outputs, bad inputs, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.workers.builders import write_jsonl
from workers.common.config import ConfigError, WorkerError
from workers.common.metrics import read_metrics, sha256_file
from workers.sft import Example, SFTConfig, collate, main, run, token_loss

RECORDS = [
    {"prompt": f"\n\nHuman: tell me about the {w}\n\nAssistant:", "response": f" The {w} is good."}
    for w in ("cat", "dog", "sun", "sea", "tree", "book", "river", "stone")
]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("sft") / "corpus.jsonl", RECORDS * 4)


def _config(model: Path, data: Path, out: Path, **kw) -> SFTConfig:
    base = dict(model_path=str(model), dataset_path=str(data), output_dir=str(out), batch_size=8,
                learning_rate=1e-2, max_steps=12, max_length=48, log_every=1, progress=False)
    return SFTConfig(**{**base, **kw})


def test_labels_cover_the_response_only_and_the_loss_counts_its_tokens():
    ids, mask, labels = collate([Example([5, 6, 7, 8], 2), Example([9, 10, 11], 1)], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert labels.tolist() == [[-100, -100, 7, 8], [-100, 10, 11, -100]]
    # uniform logits over 4 tokens: every predicted loss token costs log 4; 2 + 2 of them
    loss, n = token_loss(torch.zeros(2, 4, 16)[..., :4], torch.tensor([[-100, -100, 1, 2], [-100, 1, 2, -100]]))
    assert int(n) == 4 and loss.item() == pytest.approx(4 * torch.log(torch.tensor(4.0)).item())


def test_fine_tuning_lowers_the_loss_and_writes_a_policy_directory(tiny_gpt2, sft_data, tmp_path):
    cfg = _config(tiny_gpt2, sft_data, tmp_path / "run")
    result = run(cfg)
    out = Path(result.output_dir)
    lines = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in lines] == list(range(1, 13))
    assert lines[-1]["losses/nll"] < 0.5 * lines[0]["losses/nll"]
    assert result.complete and result.metrics["data/examples"] == 32 and result.metrics["train/steps"] == 12
    policy = Path(result.outputs["policy"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "ratchet_step_config.json"} <= {p.name for p in policy.iterdir()}
    assert not any(p.suffix in (".bin", ".pt") for p in policy.rglob("*")) and not (out / "checkpoints").exists()
    for rel, sha in result.files.items():
        assert sha256_file(out / rel) == sha
    saved = json.loads((policy / "ratchet_step_config.json").read_text())
    assert saved["step"] == "sft" and saved["config"]["max_steps"] == 12
    base, tuned = load_file(tiny_gpt2 / "model.safetensors"), load_file(policy / "model.safetensors")
    assert any(not torch.equal(base[k], tuned[k]) for k in tuned)
    # a finished run is returned as it is, not trained again
    again = run(cfg)
    assert again.files == result.files and again.metrics == result.metrics


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_gpt2, sft_data, tmp_path):
    whole = run(_config(tiny_gpt2, sft_data, tmp_path / "whole"))  # dropout on: RNG state must be restored too
    part = run(_config(tiny_gpt2, sft_data, tmp_path / "split", max_steps_this_run=5))
    assert not part.complete and (tmp_path / "split" / "checkpoints").is_dir()
    resumed = run(_config(tiny_gpt2, sft_data, tmp_path / "split"))
    a = load_file(Path(whole.outputs["policy"]) / "model.safetensors")
    b = load_file(Path(resumed.outputs["policy"]) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")] == list(range(1, 13))


def test_bad_inputs_are_named(tiny_gpt2, sft_data, tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(WorkerError, match="is empty"):
        run(_config(tiny_gpt2, empty, tmp_path / "a"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "response": 3}])
    with pytest.raises(WorkerError, match="line 1: field 'response' must be a string"):
        run(_config(tiny_gpt2, bad, tmp_path / "b"))
    with pytest.raises(ConfigError, match=r"batch_size \(0\) must be >= 1"):
        run(_config(tiny_gpt2, sft_data, tmp_path / "c", batch_size=0))
    with pytest.raises(ConfigError, match=r"max_length \(4096\) exceeds the model's 512 position embeddings"):
        run(_config(tiny_gpt2, sft_data, tmp_path / "d", max_length=4096))
    run(_config(tiny_gpt2, sft_data, tmp_path / "e", max_steps=2))
    with pytest.raises(WorkerError, match="different config"):
        run(_config(tiny_gpt2, sft_data, tmp_path / "e", max_steps=3))


def test_the_command_line_prints_the_result(tiny_gpt2, sft_data, tmp_path, capsys):
    config = tmp_path / "sft.json"
    config.write_text(json.dumps({"model_path": str(tiny_gpt2), "dataset_path": str(sft_data),
                                  "output_dir": str(tmp_path / "cli"), "max_steps": 2, "batch_size": 4}))
    assert main(["--config", str(config), "progress=false", "max_length=48"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["step"] == "sft" and printed["complete"] and printed["outputs"]["policy"].endswith("policy")
    assert main(["--help"]) == 0 and "loss_on_prompt" in capsys.readouterr().out
    assert main(["--config", str(config), "learning_rate=-1"]) == 2
