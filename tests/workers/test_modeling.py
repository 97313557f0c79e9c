"""Model directories (safetensors only), tiny test models, device/dtype, checkpoints and metrics files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from workers.common.checkpoint import latest_checkpoint, load_checkpoint, optimizer_from_flat, optimizer_to_flat, save_checkpoint
from workers.common.config import ConfigError, WorkerError
from workers.common.metrics import MetricsWriter, manifest_sha256, read_metrics, sha256_file
from workers.common.modeling import check_model_dir, load_causal_lm, load_tokenizer, load_trunk, save_model_dir
from workers.common.runtime import resolve_device, resolve_dtype
from workers.common.testing import build_tiny_model, count_parameters

CPU = torch.device("cpu")


def test_tiny_model_directory_loads_like_a_users_model(tiny_gpt2, tiny_llama):
    for path, arch in ((tiny_gpt2, "GPT2LMHeadModel"), (tiny_llama, "LlamaForCausalLM")):
        files = {p.name for p in Path(path).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
        assert not any(f.endswith((".bin", ".pt")) for f in files)
        model = load_causal_lm(path, device=CPU, dtype=torch.float32)
        assert type(model).__name__ == arch and not model.training
        assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
        tokenizer = load_tokenizer(path)
        assert tokenizer.pad_token_id != tokenizer.eos_token_id
        assert tokenizer.decode(tokenizer("Hello, river!")["input_ids"], skip_special_tokens=True) == "Hello, river!"
    llama_tok = load_tokenizer(tiny_llama)
    assert llama_tok("hi")["input_ids"][0] == llama_tok.bos_token_id  # Llama-style: BOS added
    trunk = load_trunk(tiny_gpt2, device=CPU, dtype=torch.float32)
    assert type(trunk).__name__ == "GPT2Model"


def test_tiny_model_is_deterministic_for_a_seed(tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=3, corpus=["one two three", "four five six"], vocab_size=300)
    b = build_tiny_model(tmp_path / "b", seed=3, corpus=["one two three", "four five six"], vocab_size=300)
    c = build_tiny_model(tmp_path / "c", seed=4, corpus=["one two three", "four five six"], vocab_size=300)
    assert sha256_file(a / "model.safetensors") == sha256_file(b / "model.safetensors")
    assert sha256_file(a / "model.safetensors") != sha256_file(c / "model.safetensors")
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    model = load_causal_lm(a, device=CPU, dtype=torch.float32)
    assert count_parameters(model) < 200_000


def test_refuses_pickle_weights_and_non_model_directories(tmp_path, tiny_gpt2):
    with pytest.raises(WorkerError, match="model directory .*absent does not exist"):
        check_model_dir(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkerError, match="is a file, not a Hugging Face model directory"):
        check_model_dir(tmp_path / "file")
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(WorkerError, match="has no config.json"):
        check_model_dir(tmp_path / "noconfig")
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_gpt2, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle would run code here")
    with pytest.raises(WorkerError, match=r"only in a pickle format \(pytorch_model.bin\); Ratchet loads .safetensors"):
        load_causal_lm(pickled, device=CPU, dtype=torch.float32)
    (pickled / "pytorch_model.bin").unlink()
    with pytest.raises(WorkerError, match="has no .safetensors weights"):
        load_trunk(pickled, device=CPU, dtype=torch.float32)


def test_save_model_dir_is_atomic_and_replaces(tmp_path, tiny_gpt2):
    model = load_causal_lm(tiny_gpt2, device=CPU, dtype=torch.float32)
    out = save_model_dir(model, load_tokenizer(tiny_gpt2), tmp_path / "copy")
    assert sha256_file(out / "model.safetensors") == sha256_file(Path(tiny_gpt2) / "model.safetensors")
    first = manifest_sha256(out)
    save_model_dir(model, None, out)  # replaced as a whole: the tokenizer files are gone
    assert not (out / "tokenizer.json").exists() and manifest_sha256(out) != first
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no staging directories left


def test_device_and_dtype():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    with pytest.raises(ConfigError, match=r"device \('tpu'\) must be auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match=r"dtype \('fp8'\) must be auto, float32, bfloat16, float16"):
        resolve_dtype("fp8", CPU)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda:0")


def _tiny_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 1))


def _train_steps(net, opt, n):
    for _ in range(n):
        x = torch.randn(5, 4)
        loss = torch.nn.functional.dropout(net(x), 0.5).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_checkpoint_round_trip_restores_model_optimizer_and_rng(tmp_path):
    net = _tiny_net(0)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, betas=(0.8, 0.9))
    _train_steps(net, opt, 3)
    path = save_checkpoint(tmp_path, 3, model=net, optimizer=opt, state={"data_position": 30})
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}
    _train_steps(net, opt, 2)
    expected = [p.detach().clone() for p in net.parameters()]

    other = _tiny_net(1)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1, betas=(0.8, 0.9))
    torch.manual_seed(123)  # clobbered; the checkpoint restores it
    state = load_checkpoint(latest_checkpoint(tmp_path), model=other, optimizer=other_opt)
    assert state["step"] == 3 and state["data_position"] == 30
    assert other_opt.param_groups[0]["betas"] == (0.8, 0.9)
    _train_steps(other, other_opt, 2)
    for a, b in zip(expected, other.parameters()):
        assert torch.equal(a, b)


def test_checkpoints_keep_the_newest_and_ignore_partial_writes(tmp_path):
    net = _tiny_net(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    _train_steps(net, opt, 1)
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model=net, optimizer=opt, state={}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000006"]
    (tmp_path / ".tmp-abc-step-00000008").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-00000006"
    tensors, meta = optimizer_to_flat(opt)
    assert all(k.startswith("state.") for k in tensors) and json.dumps(meta)
    optimizer_from_flat(opt, tensors, meta)


def test_metrics_writer_rewinds_to_a_checkpoint(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        writer.log({"pm": "pm", "step": step, "loss": 1.0 / step})
    writer.log({"pm": "test_pm", "step": 5})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"pm": "pm", "st')  # torn by a kill
    writer.rewind(after_step=3, where={"pm": "pm"})
    assert [(r["pm"], r["step"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        ("pm", 1), ("pm", 2), ("pm", 3), ("test_pm", 5)
    ]
