"""Preference-model training: TRL's RewardTrainer vs Ratchet's train_pm, on HH-RLHF.

    python bench/pm_vs_trl.py [--sizes small,tiny] [--repeats 2] [--threads 2]

Needs the ``[bench]`` extra (trl 1.16). Both trainers get the same model
directory (a GPT-2 built locally: "small" ~10M parameters, "tiny" 2 layers,
64 wide), the same tokenizer, the same HH-RLHF comparisons and held-out
split, batch size, sequence limit, learning rate and schedule (linear decay,
no warmup), AdamW, gradient clipping 1.0, dropout off, float32 on CPU
(TRL: bf16=False; gradient checkpointing OFF, which TRL turns on by
default; it would only slow TRL down here), and the same number of steps.

Every run is its own subprocess, alternating which trainer goes first, so
peak memory is the child's peak RSS (``getrusage``) and one run's allocator
state never helps the next. Throughput is training comparisons per second
of the training loop (data tokenization and model loading excluded for
both: TRL's from its on_train_begin to on_train_end callbacks, ours the
step's own ``perf/train_seconds``); the median over repeats is reported.
Held-out accuracy is measured on the same held-out comparisons for both.

Output: a line per run, then one JSON line per size (the small size first,
the tiny size last) with at least ``ours``, ``peer``, ``ratio``,
``ours_accuracy``, ``peer_accuracy``, ``ours_peak_mb``, ``peer_peak_mb``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from peers import (ROOT, TRL_CPU, build_sized_models, child_parser, hh_comparisons, max_peak, median, peak_rss_mb,
                   quiet_trl, run_child, run_order, serve_child, train_timer)


def prepare(work: Path, *, max_length: int, vocab_size: int, heldout_fraction: float) -> dict:
    """Tokenizer, models and the shared data split, written under ``work``."""
    sys.path.insert(0, str(ROOT))
    from workers.common.data import Comparison, split_comparisons
    from workers.common.pm import TokenLayout
    from workers.common.testing import build_tokenizer

    records = hh_comparisons()
    tokenizer = build_tokenizer(
        [p + c for p, c, _ in records] + [r for _, _, r in records], vocab_size=vocab_size, model_max_length=10**6
    )
    # Keep comparisons both trainers take whole: TRL drops longer ones, we would cut them.
    layout = TokenLayout(tokenizer, max_length=max_length, append_eos=True)
    kept = []
    for prompt, chosen, rejected in records:
        whole = [len(tokenizer(prompt + r, add_special_tokens=False)["input_ids"]) + 1 for r in (chosen, rejected)]
        p_ids = layout.prompts([prompt])[0]
        ours = len(p_ids) + max(len(x) for x in layout.responses([chosen, rejected]))
        if max(whole) <= max_length and ours <= max_length:
            kept.append(Comparison(prompt=prompt, response_a=chosen, response_b=rejected, choice="a", source="hh-harmless-base"))
    train, heldout = split_comparisons(kept, fraction=heldout_fraction, split_by="prompt")
    for name, part in (("train", train), ("heldout", heldout)):
        with open(work / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for c in part:
                fh.write(json.dumps({"prompt": c.prompt, "response_a": c.response_a, "response_b": c.response_b,
                                     "choice": "a", "metadata": {"source": c.source}}) + "\n")
    return {"records": len(records), "kept": len(kept), "train": len(train), "heldout": len(heldout),
            "models": build_sized_models(work, tokenizer, max_length=max_length)}


# -- children ---------------------------------------------------------------------------


def child_ours(args) -> dict:
    sys.path.insert(0, str(ROOT))
    from workers.train_pm import TrainPMConfig, run

    work = Path(args.work)
    out = work / f"out-ours-{args.size}-{args.rep}"
    shutil.rmtree(out, ignore_errors=True)  # a finished run in place would be returned as is
    cfg = TrainPMConfig(
        model_path=args.model,
        dataset_path=str(work / "train.jsonl"),
        eval_dataset_path=str(work / "heldout.jsonl"),
        output_dir=str(out),
        batch_size=args.batch_size,
        eval_batch_size=32,
        learning_rate=args.lr,
        lr_schedule="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.steps,
        max_length=args.max_length,
        seed=args.seed,
        num_threads=args.threads,
        checkpoint_every=0,
        device="cpu",
        dtype="float32",
        progress=False,
    )
    m = run(cfg).metrics
    return {
        "impl": "ours",
        "comparisons_per_s": m["perf/comparisons_per_s"],
        "train_seconds": m["perf/train_seconds"],
        "accuracy": m["heldout/accuracy"],
        "heldout": m["heldout/count"],
        "final_loss": m["train/loss_last"],
        "peak_mb": peak_rss_mb(),
    }


def child_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    quiet_trl(args.threads)
    work = Path(args.work)

    def rows(name):
        out = []
        with open(work / f"{name}.jsonl", encoding="utf-8") as fh:
            for line in fh:
                r = json.loads(line)
                out.append({"prompt": r["prompt"], "chosen": r["response_a"], "rejected": r["response_b"]})
        return out

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, use_safetensors=True)
    config = RewardConfig(
        output_dir=str(work / f"out-trl-{args.size}-{args.rep}"),
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.steps,
        max_length=args.max_length,
        seed=args.seed,
        eval_strategy="no",
        logging_steps=10**6,
        **TRL_CPU,
    )
    timer = train_timer()
    trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows("train")),
                            processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    seconds = timer.seconds
    # Held-out accuracy on the same comparisons, tokenized as TRL trains (prompt + response + EOS).
    model = trainer.model.eval()
    heldout = rows("heldout")
    correct = 0
    with torch.no_grad():
        for start in range(0, len(heldout), 32):
            chunk = heldout[start : start + 32]
            texts = [r["prompt"] + r[k] + tokenizer.eos_token for k in ("chosen", "rejected") for r in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            scores = model(**enc).logits.squeeze(-1)
            correct += int((scores[: len(chunk)] > scores[len(chunk) :]).sum())
    return {
        "impl": "trl",
        "comparisons_per_s": args.steps * args.batch_size / seconds,
        "train_seconds": seconds,
        "accuracy": correct / len(heldout),
        "heldout": len(heldout),
        "final_loss": None,
        "peak_mb": peak_rss_mb(),
    }


# -- the driver ---------------------------------------------------------------------------


def run_one(impl: str, size: str, rep: int, model: str, steps: int, args) -> dict:
    """One training run of ``impl`` in a child process."""
    return run_child(__file__, [impl, "--size", size, "--rep", str(rep), "--model", model, "--work", str(args.work),
                                "--steps", str(steps), "--batch-size", str(args.batch_size),
                                "--max-length", str(args.max_length), "--lr", str(args.lr),
                                "--threads", str(args.threads), "--seed", str(args.seed)],
                     failure=f"{impl} run failed ({size}, repeat {rep})")


def main() -> None:
    parser = child_parser(__doc__)
    parser.add_argument("--model")
    parser.add_argument("--work", default=str(ROOT / "bench" / "results" / "pm_vs_trl"))
    parser.add_argument("--sizes", default="small,tiny")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: 40 small, 140 tiny)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: stable timings on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--heldout-fraction", type=float, default=0.25)
    args = parser.parse_args()

    if serve_child(args, child_ours, child_trl):
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info = prepare(work, max_length=args.max_length, vocab_size=args.vocab_size, heldout_fraction=args.heldout_fraction)
    print(f"# HH-RLHF harmless-base: {info['records']} comparisons, {info['kept']} fit {args.max_length} tokens; "
          f"{info['train']} train / {info['heldout']} held-out (by prompt hash)", flush=True)
    print(f"# batch {args.batch_size}, lr {args.lr} linear decay, AdamW, clip 1.0, fp32 CPU, {args.threads} threads; "
          "TRL: bf16=False, gradient_checkpointing=False", flush=True)
    lines = []
    for size in [s for s in ("small", "tiny") if s in args.sizes.split(",")]:
        steps = args.steps or (40 if size == "small" else 140)
        model = info["models"][size]["path"]
        runs = {"ours": [], "trl": []}
        for rep in range(args.repeats):
            for impl in run_order(rep):
                r = run_one(impl, size, rep, model, steps, args)
                runs[impl].append(r)
                print(f"{size} rep {rep} {impl:4s}: {r['comparisons_per_s']:8.2f} comparisons/s  "
                      f"accuracy {r['accuracy']:.3f}  peak {r['peak_mb']:7.1f} MiB  ({r['train_seconds']:.1f} s)", flush=True)
        ours = median(runs["ours"], "comparisons_per_s")
        peer = median(runs["trl"], "comparisons_per_s")
        lines.append({
            "size": size,
            "parameters": info["models"][size]["parameters"],
            "steps": steps,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "ours": round(ours, 3),
            "peer": round(peer, 3),
            "ratio": round(ours / peer, 3),
            "ours_accuracy": round(median(runs["ours"], "accuracy"), 4),
            "peer_accuracy": round(median(runs["trl"], "accuracy"), 4),
            "heldout": runs["ours"][0]["heldout"],
            "ours_peak_mb": max_peak(runs["ours"]),
            "peer_peak_mb": max_peak(runs["trl"]),
        })
    for line in lines:
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
