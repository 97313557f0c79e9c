"""What the ``*_vs_trl.py`` benchmarks share: the HH data, the models, and the child-process harness.

Each benchmark runs every training run as ``python bench/X.py --child ours|trl ...`` in a fresh
process: the driver calls ``run_child``, the child ``serve_child``, which prints one JSON line that
``run_child`` reads back. The scripts import this module as ``peers`` (``python bench/X.py`` puts
``bench/`` first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the service's packages and the tests' builders

from tests.workers.builders import ASSISTANT, HH_SAMPLE as HH  # noqa: E402
from tests.workers.builders import hh_comparisons as hh_comparison_records  # noqa: E402

SIZES = {
    "small": {"n_layer": 6, "hidden_size": 320, "n_head": 5},  # ~10M parameters with an 8192 vocabulary
    "tiny": {"n_layer": 2, "hidden_size": 64, "n_head": 2},
}
# The TRL settings every peer run shares: fp32 on the CPU, dropout off, nothing saved, logged or shown.
TRL_CPU = {
    "bf16": False,
    "fp16": False,
    "gradient_checkpointing": False,  # TRL's default is True; off for a like-for-like run
    "disable_dropout": True,
    "use_cpu": True,
    "save_strategy": "no",
    "report_to": [],
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
}


# -- data and models (parent) --------------------------------------------------------------


def hh_comparisons() -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) of each HH sample record whose chosen and rejected texts share their prompt
    (the tests' reading of the sample, ``tests.workers.builders.hh_comparisons``)."""
    return [(c["prompt"], c["response_a"], c["response_b"]) for c in hh_comparison_records()]


def build_sized_models(work: Path, tokenizer, *, max_length: int) -> dict:
    """One GPT-2 directory per entry of ``SIZES`` (dropout 0, seed 0) under ``work``: {size: {path, parameters}}."""
    from transformers import AutoModelForCausalLM

    from workers.common.testing import build_tiny_model, count_parameters

    models = {}
    for size, shape in SIZES.items():
        path = build_tiny_model(work / f"model-{size}", tokenizer=tokenizer, max_positions=max(512, max_length),
                                dropout=0.0, seed=0, **shape)
        n = count_parameters(AutoModelForCausalLM.from_pretrained(path, use_safetensors=True))
        models[size] = {"path": str(path), "parameters": n}
    return models


def save_reward_model(root: Path, policy: Path, tokenizer) -> None:
    """A random-weight reward model with ``policy``'s trunk shape (seed 1), written twice with the same weights:
    as a Hugging Face ``GPT2ForSequenceClassification`` in ``root/reward`` (TRL's) and as a Ratchet PM in
    ``root/pm`` (ours)."""
    import torch
    from transformers import AutoConfig, GPT2ForSequenceClassification

    from workers.common.pm import PreferenceModel
    from workers.common.score import save_pm

    config = AutoConfig.from_pretrained(policy)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        rm = GPT2ForSequenceClassification(config)
    rm.save_pretrained(root / "reward", safe_serialization=True)
    tokenizer.save_pretrained(root / "reward")
    head = torch.nn.Linear(config.hidden_size, 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(rm.score.weight)
    save_pm(PreferenceModel(rm.transformer, head), tokenizer, root / "pm",
            spec={"max_length": 512, "append_eos": False, "base_model": str(policy)})


# -- children --------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quiet_trl(threads: int) -> None:
    """Before a TRL run: no progress bars or transformers warnings, and ``threads`` torch threads."""
    import torch
    import transformers
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)


def train_timer():
    """A ``TrainerCallback`` whose ``seconds`` is the time from ``on_train_begin`` to ``on_train_end``."""
    from transformers import TrainerCallback

    class TrainTimer(TrainerCallback):
        begin = end = None

        def on_train_begin(self, *a, **k):
            self.begin = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.end = time.perf_counter()

        @property
        def seconds(self) -> float:
            return self.end - self.begin

    return TrainTimer()


def child_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first paragraph, with the flags that make a run a child:
    ``--child ours|trl``, ``--size`` and ``--rep``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--child", choices=["ours", "trl"])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--rep", type=int, default=0)
    return parser


def serve_child(args, ours, trl) -> bool:
    """In a child (``--child`` given): run ``ours(args)`` or ``trl(args)`` and print its result as the one JSON
    line ``run_child`` reads. Returns whether this process was a child."""
    if not args.child:
        return False
    print(json.dumps(ours(args) if args.child == "ours" else trl(args)))
    return True


# -- the driver ------------------------------------------------------------------------------


def run_child(script: str, argv: list[str], *, failure: str, python: str | Path = sys.executable) -> dict:
    """Run ``python script --child ...argv`` from the repository root and return the JSON of its last stdout line.

    The child imports ``workers`` from this repository, without tokenizer threads or W&B. If it fails, the tail
    of its stderr is written out and the benchmark stops with the message ``failure``.
    """
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), "WANDB_DISABLED": "true"}
    proc = subprocess.run([str(python), script, "--child", *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(failure)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_order(rep: int) -> tuple[str, str]:
    """Which trainer goes first in repeat ``rep``: ours on even repeats, TRL on odd ones."""
    return ("ours", "trl") if rep % 2 == 0 else ("trl", "ours")


def median(runs: list[dict], key: str) -> float:
    """The median of ``key`` over ``runs``."""
    return statistics.median(r[key] for r in runs)


def max_peak(runs: list[dict]) -> float:
    """The highest ``peak_mb`` of ``runs``, to 0.1 MiB."""
    return round(max(r["peak_mb"] for r in runs), 1)


def spread(values: list[float]) -> list[float]:
    """[min, max] of ``values``, to 3 decimals."""
    return [round(min(values), 3), round(max(values), 3)]
