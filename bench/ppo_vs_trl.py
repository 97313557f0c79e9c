"""Our PPO step vs TRL 1.12's PPOTrainer (the last TRL with PPO), on the same models and settings.

    python bench/ppo_vs_trl.py [--reps 2] [--sizes small,tiny]

1. Builds, per size, a causal LM policy (pad != EOS) and a reward model with
   the same trunk shape (``GPT2ForSequenceClassification``, num_labels=1,
   random head); the same weights are written as a Ratchet PM directory, so
   both trainers optimise the same reward function.
2. Creates ``bench/.venv-trl112`` once (torch 2.13.0, trl 1.12.0 and the same
   transformers version as ours) and runs TRL there, ours in this venv, each in
   a fresh child process, alternating (ours, TRL, ours, TRL, ...).
3. Same prompts (16), response length (32), rollout batch (16), mini-batches
   (2 of 8), PPO epochs (4), KL coefficient (0.05, k1), clip 0.2, value clip
   0.2, vf_coef 0.1, gamma 1, lambda 0.95, learning rate, fp32 on the CPU.
   TRL: bf16=False, num_sample_generations=0, stop_token="eos", gradient
   checkpointing off. Its value model is a second SequenceClassification
   model (TRL's design); ours is a value head on the policy (our default).
4. Reports episodes/s (episodes / wall time of the training call, model
   loading excluded on both sides) and peak RSS of each child.

Last lines: one JSON line per size, small first and the tiny size last:
{"size", "ours", "peer", "ratio", "ours_peak_mb", "peer_peak_mb", ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from peers import ROOT, peak_rss_mb, run_child, save_reward_model

TRL_VENV = ROOT / "bench" / ".venv-trl112"
WORK = ROOT / "bench" / "results" / "ppo_vs_trl"
SIZES = {
    "tiny": {"n_layer": 2, "hidden_size": 64, "n_head": 2, "episodes": 128},
    "small": {"n_layer": 6, "hidden_size": 384, "n_head": 6, "episodes": 64},
}
SETTINGS = {
    "rollout_batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 4, "response_length": 32,
    "kl_coef": 0.05, "learning_rate": 1e-5, "clip": 0.2, "value_clip": 0.2, "vf_coef": 0.1,
    "gamma": 1.0, "lam": 0.95, "temperature": 1.0, "seed": 0,
}
PROMPTS = [f"\n\nHuman: question number {i} about {w}?\n\nAssistant:" for i, w in enumerate(
    ["bread", "tomatoes", "bikes", "guitars", "pancakes", "poems", "sleep", "money",
     "rivers", "cats", "trains", "maps", "tea", "stars", "shoes", "clocks"])]


# -- setup (parent) ------------------------------------------------------------------


def build_models(size: str) -> Path:
    from workers.common.testing import build_tiny_model, build_tokenizer

    spec = SIZES[size]
    root = WORK / size
    if (root / "done").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size=512)
    policy = build_tiny_model(root / "policy", tokenizer=tokenizer, n_layer=spec["n_layer"],
                              hidden_size=spec["hidden_size"], n_head=spec["n_head"], dropout=0.0, seed=0)
    save_reward_model(root, policy, tokenizer)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    (root / "done").write_text("ok")
    return root


def ensure_trl_venv() -> Path:
    python = TRL_VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import trl.experimental.ppo"], capture_output=True).returncode == 0:
        return python
    import transformers

    subprocess.run([sys.executable, "-m", "venv", TRL_VENV], check=True)
    pip = [python, "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "trl==1.12.0", f"transformers=={transformers.__version__}", "datasets", "accelerate"], check=True)
    return python


# -- children ------------------------------------------------------------------------


def child_ours(root: Path, episodes: int) -> dict:
    import torch

    from workers.ppo import PPOConfig, run

    torch.set_num_threads(2)
    out = root / "ours-run"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    s = SETTINGS
    cfg = PPOConfig(
        policy_path=str(root / "policy"), reference_path=str(root / "policy"), pm_path=str(root / "pm"),
        prompts_path=str(root / "prompts.jsonl"), output_dir=str(out), total_episodes=episodes,
        rollout_batch_size=s["rollout_batch_size"], mini_batch_size=s["mini_batch_size"], ppo_epochs=s["ppo_epochs"],
        response_length=s["response_length"], kl_coef=s["kl_coef"], learning_rate=s["learning_rate"],
        clip_coef=s["clip"], value_clip=s["value_clip"], vf_coef=s["vf_coef"], gamma=s["gamma"], lam=s["lam"],
        temperature=s["temperature"], seed=s["seed"], device="cpu", dtype="float32", progress=False,
        checkpoint_every=10_000,
    )
    # The clock covers what TRL's train() covers: the rollouts and updates, not loading
    # (our run() loads its models first; rollout times come from its own metrics).
    start = time.perf_counter()
    result = run(cfg)
    wall = time.perf_counter() - start
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_s = sum(s["rollout_batch_size"] / r["charts/episodes_per_s"] for r in rows)
    return {"episodes_per_s": episodes / train_s, "wall_s": wall, "train_s": train_s,
            "peak_mb": peak_rss_mb(), "reward": result.metrics["ppo/reward"]}


def child_trl(root: Path, episodes: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(2)
    s = SETTINGS
    tokenizer = AutoTokenizer.from_pretrained(root / "policy")
    policy = AutoModelForCausalLM.from_pretrained(root / "policy")
    ref = AutoModelForCausalLM.from_pretrained(root / "policy")
    reward = AutoModelForSequenceClassification.from_pretrained(root / "reward", num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(root / "reward", num_labels=1)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    dataset = Dataset.from_dict({"input_ids": ids})
    args = PPOConfig(
        output_dir=str(root / "trl-run"), per_device_train_batch_size=s["rollout_batch_size"],
        gradient_accumulation_steps=1, num_mini_batches=s["rollout_batch_size"] // s["mini_batch_size"],
        num_ppo_epochs=s["ppo_epochs"], total_episodes=episodes, response_length=s["response_length"],
        local_rollout_forward_batch_size=s["rollout_batch_size"], kl_coef=s["kl_coef"], kl_estimator="k1",
        learning_rate=s["learning_rate"], cliprange=s["clip"], cliprange_value=s["value_clip"], vf_coef=s["vf_coef"],
        gamma=s["gamma"], lam=s["lam"], temperature=s["temperature"], seed=s["seed"], stop_token="eos",
        num_sample_generations=0, bf16=False, fp16=False, gradient_checkpointing=False, report_to="none",
        save_strategy="no", logging_steps=1000, use_cpu=True, dataloader_num_workers=0, missing_eos_penalty=None,
    )
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=dataset)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    return {"episodes_per_s": episodes / train_s, "train_s": train_s, "peak_mb": peak_rss_mb()}


# -- parent --------------------------------------------------------------------------


def run_one(python: Path, impl: str, size: str, root: Path) -> dict:
    """One training run of ``impl`` in a child process of ``python``."""
    return run_child(__file__, [impl, "--size", size, "--root", str(root)], python=python,
                     failure=f"{impl} ({size}) failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["ours", "trl"])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--root")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--sizes", default="small,tiny")
    args = parser.parse_args()
    if args.child:
        episodes = SIZES[args.size]["episodes"]
        fn = child_ours if args.child == "ours" else child_trl
        print(json.dumps(fn(Path(args.root), episodes)))
        return

    trl_python = ensure_trl_venv()
    lines = []
    for size in args.sizes.split(","):
        root = build_models(size)
        ours, peer = [], []
        for rep in range(args.reps):
            ours.append(run_one(Path(sys.executable), "ours", size, root))
            peer.append(run_one(trl_python, "trl", size, root))
            print(f"{size} rep {rep + 1}: ours {ours[-1]['episodes_per_s']:.1f} episodes/s "
                  f"({ours[-1]['peak_mb']:.0f} MB), TRL {peer[-1]['episodes_per_s']:.1f} episodes/s "
                  f"({peer[-1]['peak_mb']:.0f} MB)", flush=True)
        o = statistics.median(r["episodes_per_s"] for r in ours)
        p = statistics.median(r["episodes_per_s"] for r in peer)
        lines.append({
            "size": size, "ours": round(o, 2), "peer": round(p, 2), "ratio": round(o / p, 2),
            "ours_peak_mb": round(max(r["peak_mb"] for r in ours)), "peer_peak_mb": round(max(r["peak_mb"] for r in peer)),
            "episodes": SIZES[size]["episodes"], "params": _params(root), **{k: SETTINGS[k] for k in ("rollout_batch_size", "response_length")},
        })
    for line in lines:
        print(json.dumps(line))


def _params(root: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(root / "policy" / "model.safetensors"), "pt") as fh:
        return sum(_prod(fh.get_slice(k).get_shape()) for k in fh.keys())


def _prod(shape) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


if __name__ == "__main__":
    main()
