"""RLOO: TRL 1.16's RLOOTrainer vs Ratchet's rloo step (estimator "rloo"), same models and settings.

    python bench/rloo_vs_trl.py [--sizes small,tiny] [--reps 2] [--threads 1]

Needs the ``[bench]`` extra (``pip install -e '.[bench]'``, trl 1.16) in the
interpreter that runs it: both trainers run in child processes of that one
interpreter, ours importing ``workers.*`` from this repository.

The peer is ``RLOOTrainer``: TRL 1.16 has it, and it is the same algorithm as
our step with ``estimator="rloo"``, ``kl_in_reward=True``: k samples per
prompt, reward = score - beta * (summed k1 log-ratio to the reference), the
leave-one-out baseline (Ahmadian et al. 2024), a clipped ratio and no value
model. ``GRPOTrainer`` would be the peer of ``estimator="grpo"`` with the KL
in the loss instead.

1. Per size, a GPT-2 policy built locally (dropout 0; "small" 6 layers x 320,
   ~10M parameters, "tiny" 2 layers x 64) with a byte-level BPE tokenizer
   (8192 tokens) trained on the HH-RLHF harmless-base sample, and a reward
   model with the same trunk shape (``GPT2ForSequenceClassification``,
   num_labels=1, its own random weights), written both as a Hugging Face
   directory (TRL's reward model) and as a Ratchet PM directory with the
   same weights (ours). The starting policy is the reference on both sides.
2. Prompts: the last 48 tokens of HH prompts (ending "\\n\\nAssistant:"),
   kept only where the text re-encodes to the same 48 tokens, so both sides
   start from the same token ids and no prompt is padded.
3. Same k (4), prompts per rollout (4, so 16 responses per rollout and per
   optimizer step), response length (32 tokens, EOS included), temperature
   1.0, no top-k / top-p, KL coefficient 0.05 (k1, summed over the response,
   in the reward), clip 0.2, one update per rollout (TRL: num_iterations=1,
   gradient_accumulation_steps=1; ours: epochs=1, one mini-batch), AdamW
   (eps 1e-5, no weight decay) at a constant learning rate (1e-5), gradient
   clipping 1.0, rollouts (8 small, 24 tiny), seed, float32 on the CPU,
   dropout off (TRL's default keeps it on: ``disable_dropout=True`` here).
   TRL: ``bf16=False``, **``gradient_checkpointing=False``** (TRL's default
   is True).
4. What differs and cannot be configured away: TRL's surrogate takes the
   ratio of whole-sequence probabilities and averages over responses; ours
   takes per-token ratios and averages each response's tokens, then the
   responses (with one update per rollout both ratios are 1; the gradient
   of ours is that of TRL divided by each response's length). TRL's reward
   model reads the decoded text (special tokens skipped, so no EOS),
   re-encoded; our PM reads the sampled tokens (with their EOS when one was
   sampled). So the two rewards are the same function of the text, not of
   the same token ids, and the last-step rewards are reported, not compared.
   TRL samples with ``generate``; ours with its own batched sampler. The
   prompt order is each side's own seeded shuffle.

Every run is its own child process, alternating which trainer goes first
(ours, TRL; TRL, ours; ...). Episodes/s is responses generated and trained
on (rollouts x 16, the same count on both sides) per second of training:
TRL from its ``on_train_begin`` to ``on_train_end`` callbacks, ours the sum
of its rollouts' own times (sampling, scoring, update), so model loading,
our checkpoint and the final save are excluded on both sides. Tokens/s
counts generated tokens (EOS included) the same way. Peak memory is the
child's peak RSS (``getrusage``), which includes what each stack imports.

Target (issue 4): >= 3x TRL's episodes/s at the tiny size, >= 1.5x at ~10M
parameters, no more memory.

Last lines: one JSON line per size, the small size first and the tiny size
last, with ``size``, ``ours``, ``peer``, ``ratio`` (medians; episodes/s),
``ours_accuracy``/``peer_accuracy`` (null: no held-out accuracy in RL),
``ours_peak_mb``, ``peer_peak_mb`` (maxima), ``ours_reward``,
``peer_reward`` (mean PM score of the last rollout, median over runs), the
spread of each side, the settings and every run's numbers.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import time
from pathlib import Path

from peers import (ASSISTANT, HH, ROOT, SIZES, TRL_CPU, child_parser, max_peak, median, peak_rss_mb, quiet_trl,
                   run_child, run_order, save_reward_model, serve_child, spread, train_timer)

WORK = ROOT / "bench" / "results" / "rloo_vs_trl"
DEFAULT_ROLLOUTS = {"small": 8, "tiny": 24}
SETTINGS = {
    "k": 4, "prompts_per_rollout": 4, "response_length": 32, "prompt_tokens": 48, "temperature": 1.0,
    "kl_coef": 0.05, "clip": 0.2, "learning_rate": 1e-5, "adam_eps": 1e-5, "max_grad_norm": 1.0, "seed": 0,
}


# -- setup (parent) ------------------------------------------------------------------


def hh_prompts(tokenizer, *, tokens: int, count: int) -> list[str]:
    """``count`` distinct HH prompts cut to their last ``tokens`` tokens, each re-encoding to those same tokens."""
    out, seen = [], set()
    with gzip.open(HH, "rt", encoding="utf-8") as fh:
        for line in fh:
            text = json.loads(line)["chosen"]
            prompt = text[: text.rindex(ASSISTANT) + len(ASSISTANT)]
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if len(ids) < tokens:
                continue
            cut = tokenizer.decode(ids[-tokens:])
            if tokenizer(cut, add_special_tokens=False)["input_ids"] == ids[-tokens:] and cut not in seen:
                seen.add(cut)
                out.append(cut)
            if len(out) == count:
                return out
    raise SystemExit(f"only {len(out)} HH prompts re-encode to {tokens} tokens; {count} are needed")


def prepare(work: Path, *, vocab_size: int, prompts_needed: int) -> dict:
    """Tokenizer, prompts, and per size a policy, a reward model and the same reward model as a PM."""
    from transformers import AutoModelForCausalLM

    from workers.common.testing import build_tiny_model, build_tokenizer, count_parameters

    texts = []
    with gzip.open(HH, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            texts += [rec["chosen"], rec["rejected"]]
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size, model_max_length=10**6)
    prompts = hh_prompts(tokenizer, tokens=SETTINGS["prompt_tokens"], count=prompts_needed)
    lines = [json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)]
    (work / "prompts.jsonl").write_text("".join(lines))
    info = {"prompts": len(prompts), "models": {}}
    for size, shape in SIZES.items():
        root = work / size
        policy = build_tiny_model(root / "policy", tokenizer=tokenizer, dropout=0.0, seed=0, **shape)
        save_reward_model(root, policy, tokenizer)
        n = count_parameters(AutoModelForCausalLM.from_pretrained(policy, use_safetensors=True))
        info["models"][size] = {"root": str(root), "parameters": n}
    return info


# -- children ------------------------------------------------------------------------


def child_ours(args) -> dict:
    from workers.common.metrics import read_metrics
    from workers.rloo import RLOOConfig, run

    s = SETTINGS
    root = Path(args.root)
    out = root / f"out-ours-{args.rep}"
    shutil.rmtree(out, ignore_errors=True)  # a finished run in place would be returned as is
    batch = s["prompts_per_rollout"] * s["k"]
    cfg = RLOOConfig(
        policy_path=str(root / "policy"), reference_path=str(root / "policy"), pm_path=str(root / "pm"),
        prompts_path=str(Path(args.work) / "prompts.jsonl"), output_dir=str(out), estimator="rloo",
        total_episodes=args.rollouts * batch, prompts_per_rollout=s["prompts_per_rollout"], k=s["k"],
        mini_batch_size=batch, gradient_accumulation_steps=1, epochs=1, response_length=s["response_length"],
        temperature=s["temperature"], kl_coef=s["kl_coef"], kl_in_reward=True, clip_coef=s["clip"],
        learning_rate=s["learning_rate"], weight_decay=0.0, max_grad_norm=s["max_grad_norm"], pm_batch_size=32,
        checkpoint_every=10**6, seed=s["seed"], device="cpu", dtype="float32", num_threads=args.threads,
        progress=False,
    )
    start = time.perf_counter()
    result = run(cfg)
    wall = time.perf_counter() - start
    rows = read_metrics(out / "metrics.jsonl")
    train_s = sum(batch / r["charts/episodes_per_s"] for r in rows)
    tokens = sum(batch * r["rloo/response_length"] for r in rows)
    return {"episodes_per_s": args.rollouts * batch / train_s, "tokens_per_s": tokens / train_s, "train_s": train_s,
            "wall_s": wall, "peak_mb": peak_rss_mb(), "reward": result.metrics["rloo/reward"],
            "mean_response_length": tokens / (args.rollouts * batch)}


def child_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    quiet_trl(args.threads)
    s = SETTINGS
    root = Path(args.root)
    batch = s["prompts_per_rollout"] * s["k"]
    prompts = [json.loads(line)["prompt"] for line in (Path(args.work) / "prompts.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(root / "policy")
    policy = AutoModelForCausalLM.from_pretrained(root / "policy", use_safetensors=True, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(root / "reward", num_labels=1, use_safetensors=True,
                                                                dtype=torch.float32)
    config = RLOOConfig(
        output_dir=str(root / f"out-trl-{args.rep}"),
        per_device_train_batch_size=batch,  # completions per optimizer step: prompts_per_rollout * k
        gradient_accumulation_steps=1,
        num_generations=s["k"],
        num_iterations=1,
        max_completion_length=s["response_length"],
        temperature=s["temperature"],
        top_p=1.0,
        top_k=0,
        beta=s["kl_coef"],
        epsilon=s["clip"],
        normalize_advantages=False,
        learning_rate=s["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_epsilon=s["adam_eps"],
        weight_decay=0.0,
        max_grad_norm=s["max_grad_norm"],
        max_steps=args.rollouts,
        seed=s["seed"],
        logging_steps=1,  # the last step's reward and response length are read from the log
        **TRL_CPU,
    )
    timer = train_timer()
    trainer = RLOOTrainer(model=policy, reward_funcs=reward, args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                          reward_processing_classes=tokenizer, callbacks=[timer])
    trainer.train()
    train_s = timer.seconds
    logs = [h for h in trainer.state.log_history if "reward" in h]
    tokens = sum(batch * h["completions/mean_length"] for h in logs)
    return {"episodes_per_s": args.rollouts * batch / train_s, "tokens_per_s": tokens / train_s, "train_s": train_s,
            "peak_mb": peak_rss_mb(), "reward": logs[-1]["reward"],
            "mean_response_length": tokens / (args.rollouts * batch), "logged_steps": len(logs)}


# -- the driver ---------------------------------------------------------------------------


def run_one(impl: str, size: str, rep: int, root: str, rollouts: int, args) -> dict:
    """One training run of ``impl`` in a child process."""
    return run_child(__file__, [impl, "--size", size, "--rep", str(rep), "--root", root, "--work", str(args.work),
                                "--rollouts", str(rollouts), "--threads", str(args.threads)],
                     failure=f"{impl} run failed ({size}, repeat {rep})")


def main() -> None:
    parser = child_parser(__doc__)
    parser.add_argument("--root")
    parser.add_argument("--work", default=str(WORK))
    parser.add_argument("--sizes", default="small,tiny")
    parser.add_argument("--reps", type=int, default=2,
                        help="runs of each trainer per size, alternating which goes first")
    parser.add_argument("--rollouts", type=int, default=None,
                        help=f"rollouts (= optimizer steps) per run (default: {DEFAULT_ROLLOUTS['small']} small, "
                             f"{DEFAULT_ROLLOUTS['tiny']} tiny)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1: steadier timings on a shared machine)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()

    if serve_child(args, child_ours, child_trl):
        return

    sys.path.insert(0, str(ROOT))
    import trl

    sizes = [name for name in ("small", "tiny") if name in args.sizes.split(",")]
    rollouts = {size: args.rollouts or DEFAULT_ROLLOUTS[size] for size in sizes}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    s = SETTINGS
    info = prepare(work, vocab_size=args.vocab_size, prompts_needed=max(rollouts.values()) * s["prompts_per_rollout"])
    batch = s["prompts_per_rollout"] * s["k"]
    print(f"# trl {trl.__version__}; {info['prompts']} HH prompts of {s['prompt_tokens']} tokens; "
          f"{s['prompts_per_rollout']} prompts x k={s['k']} per rollout, {s['response_length']} tokens, "
          f"kl {s['kl_coef']} (k1 in the reward), lr {s['learning_rate']}, fp32 CPU, {args.threads} thread(s); "
          "TRL: bf16=False, gradient_checkpointing=False",
          flush=True)
    lines = []
    for size in sizes:
        root = info["models"][size]["root"]
        runs = {"ours": [], "trl": []}
        for rep in range(args.reps):
            for impl in run_order(rep):
                r = run_one(impl, size, rep, root, rollouts[size], args)
                runs[impl].append(r)
                print(f"{size} rep {rep} {impl:4s}: {r['episodes_per_s']:7.2f} episodes/s  "
                      f"{r['tokens_per_s']:8.1f} tokens/s  peak {r['peak_mb']:7.1f} MiB  reward {r['reward']:+.4f}  "
                      f"({r['train_s']:.1f} s)", flush=True)
        ours = median(runs["ours"], "episodes_per_s")
        peer = median(runs["trl"], "episodes_per_s")
        lines.append({
            "size": size,
            "parameters": info["models"][size]["parameters"],
            "ours": round(ours, 3),
            "peer": round(peer, 3),
            "ratio": round(ours / peer, 3),
            "ours_accuracy": None,
            "peer_accuracy": None,
            "ours_peak_mb": max_peak(runs["ours"]),
            "peer_peak_mb": max_peak(runs["trl"]),
            "ours_reward": round(median(runs["ours"], "reward"), 4),
            "peer_reward": round(median(runs["trl"], "reward"), 4),
            "ours_spread": spread([r["episodes_per_s"] for r in runs["ours"]]),
            "peer_spread": spread([r["episodes_per_s"] for r in runs["trl"]]),
            "ours_tokens_per_s": round(median(runs["ours"], "tokens_per_s"), 1),
            "peer_tokens_per_s": round(median(runs["trl"], "tokens_per_s"), 1),
            "rollouts": rollouts[size],
            "episodes": rollouts[size] * batch,
            **{key: s[key] for key in ("k", "prompts_per_rollout", "response_length", "prompt_tokens", "kl_coef",
                                       "learning_rate")},
            "threads": args.threads,
            "peer_version": f"trl {trl.__version__}",
            "ours_runs": runs["ours"],
            "peer_runs": runs["trl"],
        })
    for line in lines:
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
