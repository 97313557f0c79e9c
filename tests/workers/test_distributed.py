"""The worker steps under torchrun on the CPU (gloo, 2 processes) against one process with the same global batch.

Tolerance: the final weights within 1e-4 (max absolute difference; the tiny models' weights are of order 1,
and the runs below move them by 1e-2 to 1e-1) and every logged loss within 1e-4 relative, over the few steps
of these runs (measured: 2e-7 to 1e-5). What differs between the runs is float rounding only: a batch's rows
are summed in another order and padded to another width; over many steps of a fast-moving run it compounds
(2e-3 after 30 sft steps at learning rate 1e-2), so resuming is checked bitwise against a run of the same world
size. sample and evaluate write the same bytes as one process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.workers.builders import write_jsonl
from workers.common.config import ConfigError, WorkerError, to_dict

WEIGHT_ATOL = 1e-4
LOSS_RTOL = 1e-4
LAUNCH_TIMEOUT_S = 300

SFT_RECORDS = [
    {"prompt": f"\n\nHuman: tell me about the {w}\n\nAssistant:", "response": f" The {w} is {'very ' * (i % 3)}good."}
    for i, w in enumerate(("cat", "dog", "sun", "sea", "tree", "book", "river", "stone"))
]


def torchrun(module: str, cfg, *, nproc: int = 2, wait: bool = True):
    """``torchrun --standalone --nproc_per_node nproc -m module --config <cfg as JSON>`` (one torch thread each)."""
    out = Path(cfg.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = out.parent / f"{out.name}-config.json"
    config.write_text(json.dumps(to_dict(cfg)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    return proc


def ok(proc) -> dict:
    """The result JSON rank 0 printed (the launch must have succeeded)."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def weights(model_dir: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / name))


def assert_same_weights(a: Path, b: Path, *, names=("model.safetensors",)) -> float:
    worst = 0.0
    for name in names:
        wa, wb = weights(a, name), weights(b, name)
        assert wa.keys() == wb.keys()
        worst = max([worst, *(float((wa[k] - wb[k]).abs().max()) for k in wa)])
    assert worst <= WEIGHT_ATOL, f"weights differ by {worst}"
    return worst


def losses(out: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if key in line]


def assert_same_losses(a: Path, b: Path, key: str) -> None:
    la, lb = losses(a, key), losses(b, key)
    assert len(la) == len(lb) > 0
    assert la == pytest.approx(lb, rel=LOSS_RTOL)


# -- sft -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("sft") / "corpus.jsonl", SFT_RECORDS * 5)


def sft_config(model: Path, data: Path, out: Path, **kw):
    from workers.sft import SFTConfig

    base = dict(model_path=str(model), dataset_path=str(data), output_dir=str(out), batch_size=8, learning_rate=1e-2,
                max_steps=6, max_length=48, log_every=1, progress=False, disable_dropout=True, device="cpu",
                num_threads=1)
    return SFTConfig(**{**base, **kw})


def test_sft_on_two_fsdp_processes_ends_where_one_process_does(tiny_gpt2, sft_data, tmp_path):
    from workers.sft import run

    one = run(sft_config(tiny_gpt2, sft_data, tmp_path / "one"))
    two = ok(torchrun("workers.sft", sft_config(tiny_gpt2, sft_data, tmp_path / "two", parallel="fsdp")))
    assert two["complete"] and two["metrics"]["train/steps"] == 6
    assert_same_weights(Path(one.outputs["policy"]), Path(two["outputs"]["policy"]))
    assert_same_losses(tmp_path / "one", tmp_path / "two", "losses/nll")
    assert not (tmp_path / "two" / "checkpoints").exists()


def test_a_killed_two_process_run_resumes_to_the_weights_of_an_uninterrupted_one(tiny_gpt2, sft_data, tmp_path):
    """DDP, SIGKILL mid-run: the resumed run ends bitwise where an uninterrupted two-process run ends (a
    two-process run drifts from one process by float rounding, compounding over many steps: 2e-3 after 30
    steps at this learning rate, so resume is checked against its own world size)."""
    from workers.sft import run

    whole = sft_config(tiny_gpt2, sft_data, tmp_path / "whole", max_steps=20, checkpoint_every=1)
    ok(torchrun("workers.sft", whole))
    cut = sft_config(tiny_gpt2, sft_data, tmp_path / "cut", max_steps=20, checkpoint_every=1)
    proc = torchrun("workers.sft", cut, wait=False)
    ckpts = tmp_path / "cut" / "checkpoints"
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not (ckpts.is_dir() and any(p.name >= "step-00000003" for p in ckpts.glob("step-*"))):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both processes, mid-run
    proc.wait()
    proc.stderr.close()
    assert not (tmp_path / "cut" / "summary.json").exists()
    killed_at = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    assert 3 <= killed_at < 20

    # A checkpoint of two processes is refused by one, with the number it needs.
    with pytest.raises(WorkerError, match=r"written by 2 process\(es\).*nproc_per_node 2"):
        run(cut)

    ok(torchrun("workers.sft", cut))
    resumed, uninterrupted = weights(tmp_path / "cut" / "policy"), weights(tmp_path / "whole" / "policy")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(tensor, resumed[name]), name
    assert losses(tmp_path / "cut", "losses/nll") == losses(tmp_path / "whole", "losses/nll")


# -- sample and evaluate -------------------------------------------------------------------------------------


def test_sample_and_evaluate_split_their_batches_and_write_what_one_process_writes(
        tiny_gpt2, tiny_llama, trained_pm, prompts_path, tmp_path):
    from workers.evaluate import EvaluateConfig, run as run_evaluate
    from workers.sample import SampleConfig, run as run_sample

    def sample_config(out: Path, **kw) -> SampleConfig:
        return SampleConfig(policies={"p0": str(tiny_gpt2), "p1": str(tiny_llama)}, prompts_path=str(prompts_path),
                            output_dir=str(out), num_samples=3, max_new_tokens=8, batch_size=4, progress=False,
                            device="cpu", num_threads=1, **kw)

    run_sample(sample_config(tmp_path / "one"))
    # Two processes stop after 3 of the 12 batches (a round of two, then one); one process finishes the file.
    partial = ok(torchrun("workers.sample", sample_config(tmp_path / "two", max_batches_this_run=3)))
    assert not partial["complete"] and partial["metrics"]["batches_done"] == 3
    run_sample(sample_config(tmp_path / "two"))
    assert (tmp_path / "two" / "samples.jsonl").read_bytes() == (tmp_path / "one" / "samples.jsonl").read_bytes()

    pm_dir = trained_pm[1].outputs["pm"]

    def evaluate_config(out: Path) -> EvaluateConfig:
        return EvaluateConfig(candidate_path=str(tiny_gpt2), baseline_path=str(tiny_gpt2), reference_path=str(tiny_gpt2),
                              pm_path=pm_dir, test_pm_path=pm_dir, prompts_path=str(prompts_path), output_dir=str(out),
                              num_samples=2, max_new_tokens=8, batch_size=3, progress=False, device="cpu",
                              num_threads=1)

    one = run_evaluate(evaluate_config(tmp_path / "eval-one"))
    two = ok(torchrun("workers.evaluate", evaluate_config(tmp_path / "eval-two")))
    assert two["metrics"] == pytest.approx(one.metrics)
    assert (tmp_path / "eval-two" / "samples.jsonl").read_bytes() == (tmp_path / "eval-one" / "samples.jsonl").read_bytes()


# -- train_pm ------------------------------------------------------------------------------------------------


def test_train_pm_on_two_processes_ends_where_one_process_does(tiny_gpt2, synthetic_path, tmp_path):
    from workers.train_pm import TrainPMConfig, run

    def config(out: Path) -> TrainPMConfig:
        return TrainPMConfig(model_path=str(tiny_gpt2), dataset_path=str(synthetic_path), output_dir=str(out),
                             heldout_fraction=0.2, batch_size=8, micro_batch_size=4, learning_rate=3e-3, max_steps=6,
                             max_length=64, log_every=1, progress=False, device="cpu", num_threads=1)

    one = run(config(tmp_path / "one"))
    two = ok(torchrun("workers.train_pm", config(tmp_path / "two")))
    assert_same_weights(Path(one.outputs["pm"]), Path(two["outputs"]["pm"]),
                        names=("model.safetensors", "pm_head.safetensors"))
    assert_same_losses(tmp_path / "one", tmp_path / "two", "losses/bt")
    assert two["metrics"]["heldout/accuracy"] == pytest.approx(one.metrics["heldout/accuracy"])


# -- ppo -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_ppo_on_two_processes_ends_where_one_process_does(tiny_gpt2, trained_pm, prompts_path, tmp_path, parallel):
    from workers.ppo import PPOConfig, run

    pm_dir = trained_pm[1].outputs["pm"]

    def config(out: Path, **kw) -> PPOConfig:
        return PPOConfig(policy_path=str(tiny_gpt2), reference_path=str(tiny_gpt2), pm_path=pm_dir,
                         prompts_path=str(prompts_path), output_dir=str(out), total_episodes=16, rollout_batch_size=8,
                         mini_batch_size=4, gradient_accumulation_steps=2, ppo_epochs=2, response_length=8,
                         learning_rate=1e-3, kl_coef=0.05, progress=False, seed=3, device="cpu", num_threads=1, **kw)

    one = run(config(tmp_path / "one"))
    two = ok(torchrun("workers.ppo", config(tmp_path / "two", parallel=parallel)))
    assert_same_weights(Path(one.outputs["policy"]), Path(two["outputs"]["policy"]))
    for key in ("losses/policy", "losses/value", "ppo/reward", "ppo/kl"):
        assert_same_losses(tmp_path / "one", tmp_path / "two", key)


# -- what cannot work is refused -----------------------------------------------------------------------------


def test_combinations_that_cannot_work_are_refused_before_any_work(monkeypatch, tiny_gpt2, sft_data, tmp_path):
    from workers.ppo import PPOConfig
    from workers.train_pm import TrainPMConfig
    from workers.rloo import RLOOConfig, run as run_rloo

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node 2 sets
    with pytest.raises(ConfigError, match=r"batch_size \(7\) must be a multiple of the number of processes \(2\)"):
        sft_config(tiny_gpt2, sft_data, tmp_path / "a", batch_size=7).validate()
    with pytest.raises(ConfigError, match="parallel .'zero3'. must be one of ddp, fsdp"):
        sft_config(tiny_gpt2, sft_data, tmp_path / "a", parallel="zero3").validate()
    ppo = dict(policy_path=str(tiny_gpt2), reference_path=str(tiny_gpt2), pm_path="pm", prompts_path="p",
               output_dir=str(tmp_path / "p"), total_episodes=16, mini_batch_size=4)
    with pytest.raises(ConfigError, match="fsdp with LoRA"):
        PPOConfig(**ppo, rollout_batch_size=8, lora_r=4, parallel="fsdp").validate()
    with pytest.raises(ConfigError, match=r"mini_batch_size / gradient_accumulation_steps \(1\)"):
        PPOConfig(**ppo, rollout_batch_size=8, gradient_accumulation_steps=4).validate()
    with pytest.raises(ConfigError, match="parallel_pms"):
        TrainPMConfig(model_path="m", dataset_path="d", output_dir=str(tmp_path / "t"), parallel_pms=2,
                      batch_size=8).validate()
    with pytest.raises(ConfigError, match="rloo runs in one process only, and torchrun started 2"):
        run_rloo(RLOOConfig(**{**ppo, "mini_batch_size": 16}))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    from workers.common.distributed import init_world

    with pytest.raises(ConfigError, match="names one GPU"):
        init_world("ddp", "cuda:1")
