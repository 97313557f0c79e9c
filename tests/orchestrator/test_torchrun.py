"""The GPU node's runner: which steps go to torchrun, with what command line, and what a failed launch says.

A real launch through this runner runs in tests/orchestrator/test_production_path.py (train_pm and
ppo on two processes, started by the Prefect worker of the gpu pool); the equivalence of a two-process
step with one process is tests/workers/test_distributed.py's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from orchestrator.runners import InProcessRunner, StepFailed
from orchestrator.torchrun import DISTRIBUTED_STEPS, TorchrunRunner, resolve_nproc, runner_for_node


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from workers.common.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "gpt2", seed=0)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(f'{{"id": {i}, "prompt": "Human: tell me {i}"}}\n' for i in range(3)))
    return path


def test_a_single_node_launch_is_standalone_and_a_multi_node_one_meets_at_its_c10d_endpoint(artifacts, tmp_path):
    one = TorchrunRunner(artifacts, tmp_path, nproc_per_node=4)
    assert one.command("ppo", Path("/w/ppo.json"), rdzv_id="2026-W49-improve", result_path=Path("/w/r.json")) == [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--standalone",
        "-m", "workers.ppo", "--config", "/w/ppo.json", "--result-file", "/w/r.json",
    ]
    many = TorchrunRunner(artifacts, tmp_path, nproc_per_node=8, nnodes=2, rdzv_endpoint="step-0.steps:29400")
    assert many.world_size == 16
    assert many.command("train_pm", Path("/w/pm.json"), rdzv_id="2026-W49-train_pm")[3:8] == [
        "--nproc_per_node=8", "--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=step-0.steps:29400",
        "--rdzv_id=2026-W49-train_pm",
    ]
    with pytest.raises(ValueError, match="rendezvous endpoint"):
        TorchrunRunner(artifacts, tmp_path, nproc_per_node=8, nnodes=2)


def test_steps_without_a_distributed_loop_run_in_this_process(artifacts, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(InProcessRunner, "execute", lambda self, step, cfg, *, key: ran.append(step) or "result")
    runner = TorchrunRunner(artifacts, tmp_path, nproc_per_node=2)
    for step in ("dpo", "rloo", "online_dpo", "rejection_sampling"):
        assert step not in DISTRIBUTED_STEPS
        assert runner.execute(step, object(), key=f"2026-W49:{step}") == "result"
    assert ran == ["dpo", "rloo", "online_dpo", "rejection_sampling"]
    assert DISTRIBUTED_STEPS == {"sample", "sft", "train_pm", "ppo", "evaluate"}


def test_a_launch_that_fails_fails_the_step_with_what_the_processes_said(artifacts, tmp_path, monkeypatch, tiny_model):
    """The processes' stderr tail comes back in the error (the processes themselves are test_distributed's)."""
    import subprocess

    from workers.sft import SFTConfig

    launched = []

    def fake_run(cmd, **kwargs):
        launched.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="[rank1]: error: batch_size (7) must be a multiple\n")

    monkeypatch.setattr("orchestrator.torchrun.subprocess.run", fake_run)
    cfg = SFTConfig(model_path=str(tiny_model), dataset_path=str(tmp_path / "d.jsonl"), output_dir=str(tmp_path / "out"),
                    batch_size=7, max_steps=1, device="cpu", progress=False)
    runner = TorchrunRunner(artifacts, tmp_path, nproc_per_node=2)
    with pytest.raises(StepFailed, match=r"(?s)sft under torchrun \(2 processes\) exited 1; run it again to resume.*"
                                         r"batch_size \(7\) must be a multiple"):
        runner.execute("sft", cfg, key="2026-W49:sft")
    (cmd,) = launched
    assert cmd[cmd.index("--config") + 1] == str(tmp_path / "out.torchrun-config.json")
    assert json.loads((tmp_path / "out.torchrun-config.json").read_text())["batch_size"] == 7


def test_a_launch_hands_back_the_result_rank_0_wrote(artifacts, tmp_path, tiny_model, prompts):
    """evaluate writes no summary a re-run could find: the result comes from rank 0's result file."""
    from workers.sample import SampleConfig

    cfg = SampleConfig(policies={"p0": str(tiny_model)}, prompts_path=str(prompts), output_dir=str(tmp_path / "out"),
                       num_samples=2, max_new_tokens=4, batch_size=2, progress=False, device="cpu", num_threads=1)
    result = TorchrunRunner(artifacts, tmp_path, nproc_per_node=2).execute("sample", cfg, key="2026-W49:sample")
    assert result.complete and result.step == "sample" and Path(result.outputs["samples"]).is_file()
    assert result.metrics["samples/responses"] == 6
    assert (tmp_path / "out.torchrun-result.json").is_file()


def test_the_node_settings_choose_the_runner(artifacts, tmp_path, monkeypatch):
    from store.settings import get_settings

    monkeypatch.setenv("RATCHET_NPROC_PER_NODE", "auto")
    get_settings.cache_clear()
    assert resolve_nproc("auto") >= 1
    runner = runner_for_node(artifacts, tmp_path)
    assert type(runner) is (InProcessRunner if resolve_nproc("auto") == 1 else TorchrunRunner)
    monkeypatch.setenv("RATCHET_NPROC_PER_NODE", "3")
    get_settings.cache_clear()
    runner = runner_for_node(artifacts, tmp_path)
    assert isinstance(runner, TorchrunRunner) and runner.world_size == 3
    monkeypatch.setenv("RATCHET_NPROC_PER_NODE", "0")
    get_settings.cache_clear()
    with pytest.raises(ValueError, match="nproc_per_node"):
        get_settings()
    get_settings.cache_clear()
