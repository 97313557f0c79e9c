"""DPO: TRL 1.16's DPOTrainer vs Ratchet's dpo step, on HH-RLHF, same models and settings.

    python bench/dpo_vs_trl.py [--sizes small,tiny] [--reps 2] [--threads 1]

Needs the ``[bench]`` extra (``pip install -e '.[bench]'``, trl 1.16) in the
interpreter that runs it: both trainers run in child processes of that one
interpreter, ours importing ``workers.*`` from this repository.

1. One tokenizer (byte-level BPE, 8192 tokens) trained on the HH-RLHF
   harmless-base sample (``tests/data/hh-rlhf/``) and, per size, one GPT-2
   directory built locally with dropout 0: "small" 6 layers x 320 (~10M
   parameters), "tiny" 2 layers x 64. The starting policy is also the
   reference on both sides.
2. Data: the sample's comparisons whose prompt + longer response + EOS fits
   ``--max-length`` and whose tokens are the same whichever way they are
   encoded (TRL encodes prompt + response as one text, we encode the two
   apart), with different chosen and rejected texts; split by prompt hash
   into train and held-out. So both trainers see token-identical pairs and
   neither truncates anything.
3. Same batch (8 pairs), max length (256), beta (0.1), sigmoid loss, AdamW
   at a constant learning rate (1e-3: the models start from random weights;
   the paper's 1e-6 is for pretrained ones) without warmup or weight decay,
   gradient clipping 1.0, steps (8 small, 20 tiny: few, to keep a run of
   the script near 10 minutes on 2 CPU cores), seed, float32 on the CPU,
   dropout off, reference log-probs computed every step (TRL:
   ``precompute_ref_log_probs=False``, its default), one forward pass of
   chosen and rejected together on each side. TRL: ``bf16=False``,
   **``gradient_checkpointing=False``** (TRL's default is True; it trades
   compute for memory and would only slow TRL down here), its default fused
   AdamW (ours uses it too).
4. What differs and cannot be configured away: the data order (each shuffles
   with its own seeded sampler; same pairs, different order), TRL computes
   its log-probs with a chunked fused LM head and logs extra per-step
   statistics (entropy, mean logits, top-1 accuracy); ours takes a full
   log-softmax over the vocabulary.

Every run is its own child process, alternating which trainer goes first
(ours, TRL; TRL, ours; ...); repeat r seeds both trainers with ``--seed`` +
r (the data order: with so few steps the held-out accuracy of one order is
noisy, so its median over repeats is a median over orders). Throughput is
pairs trained (steps x batch) per second of the training loop: TRL from its
``on_train_begin`` to ``on_train_end`` callbacks, ours the step's own
``perf/train_seconds`` (data encoding and model loading excluded on both
sides). Peak memory is the
child's peak RSS (``getrusage``) when training ends, so it includes what
each stack imports. Held-out accuracy is computed here, the same way for
both, after training: each child saves its trained policy, loads it as a
plain ``AutoModelForCausalLM`` and scores the first ``--heldout-pairs``
held-out pairs against the reference's log-probs of the same pairs (computed
once per size by the parent with the same function: the reference is frozen
and the same for every run): the share of pairs where beta * (log
pi(chosen) - log ref(chosen)) > beta * (log pi(rejected) - log
ref(rejected)) (every HH pair is decisive).

Target (issue 4): >= 2x TRL's pairs/s at equal or better held-out accuracy
and no more memory.

Last lines: one JSON line per size, the small size first and the tiny size
last, with ``size``, ``ours``, ``peer``, ``ratio`` (medians; pairs/s),
``ours_accuracy``, ``peer_accuracy`` (medians), ``ours_peak_mb``,
``peer_peak_mb`` (maxima), the spread of each side, the settings and every
run's numbers.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from peers import (ROOT, TRL_CPU, build_sized_models, child_parser, hh_comparisons, max_peak, median, peak_rss_mb,
                   quiet_trl, run_child, run_order, serve_child, spread, train_timer)

WORK = ROOT / "bench" / "results" / "dpo_vs_trl"
DEFAULT_STEPS = {"small": 8, "tiny": 20}


# -- setup (parent) ------------------------------------------------------------------


def prepare(work: Path, *, max_length: int, vocab_size: int, heldout_fraction: float) -> dict:
    """Tokenizer, models and the train / held-out pairs, written under ``work``."""
    from workers.common.data import Comparison, split_comparisons
    from workers.common.testing import build_tokenizer

    records = hh_comparisons()
    tokenizer = build_tokenizer(
        [p + c for p, c, _ in records] + [r for _, _, r in records], vocab_size=vocab_size, model_max_length=10**6
    )

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    kept, differ = [], 0
    for prompt, chosen, rejected in records:
        if chosen == rejected:
            continue
        p = ids(prompt)
        apart = [p + ids(r) for r in (chosen, rejected)]
        joint = [ids(prompt + r) for r in (chosen, rejected)]
        if apart != joint:
            differ += 1
            continue
        if max(len(x) for x in apart) + 1 <= max_length:  # + EOS
            kept.append(Comparison(prompt=prompt, response_a=chosen, response_b=rejected, choice="a",
                                   source="hh-harmless-base"))
    train, heldout = split_comparisons(kept, fraction=heldout_fraction, split_by="prompt")
    for name, part in (("train", train), ("heldout", heldout)):
        with open(work / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for c in part:
                fh.write(json.dumps({"prompt": c.prompt, "response_a": c.response_a, "response_b": c.response_b,
                                     "choice": "a"}) + "\n")
    return {"records": len(records), "token_mismatch": differ, "kept": len(kept), "train": len(train),
            "heldout": len(heldout), "models": build_sized_models(work, tokenizer, max_length=max_length)}


# -- the shared held-out measurement -----------------------------------------------------


def response_logps(model_dir: Path, heldout: list[dict], *, batch_size: int = 16) -> list[list[float]]:
    """[log p(chosen), log p(rejected)] of each held-out pair under the model in ``model_dir``.

    The model is loaded as a plain ``AutoModelForCausalLM`` in float32; a response's log-probability is the sum
    over its tokens and its EOS, in the context of its prompt.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype=torch.float32).eval()

    def encode(prompt: str, response: str) -> tuple[list[int], int]:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return p + tokenizer(response, add_special_tokens=False)["input_ids"] + [eos], len(p)

    out = []
    with torch.no_grad():
        for start in range(0, len(heldout), batch_size):
            chunk = heldout[start : start + batch_size]
            seqs = [encode(r["prompt"], r[k]) for k in ("response_a", "response_b") for r in chunk]
            n = max(len(s) for s, _ in seqs)
            ids = torch.full((len(seqs), n), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), n), dtype=torch.long)
            scored = torch.zeros((len(seqs), n), dtype=torch.bool)
            for i, (s, first) in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
                scored[i, first : len(s)] = True
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            token_logps = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            summed = (token_logps * scored[:, 1:]).sum(-1).tolist()
            out.extend([a, b] for a, b in zip(summed[: len(chunk)], summed[len(chunk) :]))
    return out


def implicit_reward_accuracy(policy: list[list[float]], reference: list[list[float]], *, beta: float) -> float:
    """Share of pairs where beta * (log pi - log ref) of the chosen response exceeds that of the rejected one."""
    right = sum(beta * (pc - rc) > beta * (pr - rr) for (pc, pr), (rc, rr) in zip(policy, reference, strict=True))
    return right / len(policy)


def heldout_accuracy(policy_dir: Path, args) -> float:
    """The trained policy's held-out accuracy against the reference's log-probs, which the parent computed once
    per size with the same function (the reference is frozen and the same for every run)."""
    reference = json.loads((Path(args.work) / f"reference-logps-{args.size}.json").read_text())
    return implicit_reward_accuracy(response_logps(policy_dir, heldout_rows(args)), reference, beta=args.beta)


def read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def heldout_rows(args) -> list[dict]:
    """The first ``--heldout-pairs`` held-out pairs (the same for both trainers)."""
    return read_rows(Path(args.work) / "heldout.jsonl")[: args.heldout_pairs]


# -- children ------------------------------------------------------------------------


def child_ours(args) -> dict:
    from workers.dpo import DPOConfig, run

    work = Path(args.work)
    out = work / f"out-ours-{args.size}-{args.rep}"
    shutil.rmtree(out, ignore_errors=True)  # a finished run in place would be returned as is
    cfg = DPOConfig(
        model_path=args.model,
        dataset_path=str(work / "train.jsonl"),
        output_dir=str(out),
        beta=args.beta,
        loss_type="sigmoid",
        seed=args.seed,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_schedule="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.steps,
        max_length=args.max_length,
        heldout_fraction=0.0,  # the held-out pairs are scored below, the same way as TRL's
        checkpoint_every=0,
        device="cpu",
        dtype="float32",
        num_threads=args.threads,
        log_every=10,
        progress=False,
    )
    result = run(cfg)
    peak = peak_rss_mb()
    m = result.metrics
    t0 = time.perf_counter()
    accuracy = heldout_accuracy(out / "policy", args)
    return {"pairs_per_s": m["charts/pairs_per_s"], "train_seconds": m["perf/train_seconds"],
            "accuracy": accuracy, "final_loss": m["train/loss_last"], "peak_mb": peak,
            "eval_seconds": time.perf_counter() - t0}


def child_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    quiet_trl(args.threads)
    work = Path(args.work)
    rows = [{"prompt": r["prompt"], "chosen": r["response_a"], "rejected": r["response_b"]}
            for r in read_rows(work / "train.jsonl")]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    policy = AutoModelForCausalLM.from_pretrained(args.model, use_safetensors=True, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(args.model, use_safetensors=True, dtype=torch.float32)
    config = DPOConfig(
        output_dir=str(work / f"out-trl-{args.size}-{args.rep}"),
        beta=args.beta,
        loss_type=["sigmoid"],
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.steps,
        max_length=args.max_length,
        precompute_ref_log_probs=False,
        seed=args.seed,
        eval_strategy="no",
        logging_steps=1,  # the last step's loss is read from the log
        **TRL_CPU,
    )
    timer = train_timer()
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    seconds = timer.seconds
    peak = peak_rss_mb()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    policy_dir = work / f"out-trl-{args.size}-{args.rep}" / "policy"
    trainer.model.save_pretrained(policy_dir, safe_serialization=True)
    tokenizer.save_pretrained(policy_dir)
    t0 = time.perf_counter()
    accuracy = heldout_accuracy(policy_dir, args)
    return {"pairs_per_s": args.steps * args.batch_size / seconds, "train_seconds": seconds, "accuracy": accuracy,
            "final_loss": losses[-1] if losses else None, "peak_mb": peak, "eval_seconds": time.perf_counter() - t0}


# -- the driver ---------------------------------------------------------------------------


def run_one(impl: str, size: str, rep: int, model: str, steps: int, args) -> dict:
    """One training run of ``impl`` in a child process, seeded ``--seed`` + ``rep``."""
    return run_child(__file__, [impl, "--size", size, "--rep", str(rep), "--model", model, "--work", str(args.work),
                                "--steps", str(steps), "--batch-size", str(args.batch_size),
                                "--max-length", str(args.max_length), "--lr", str(args.lr), "--beta", str(args.beta),
                                "--threads", str(args.threads), "--seed", str(args.seed + rep),
                                "--heldout-pairs", str(args.heldout_pairs)],
                     failure=f"{impl} run failed ({size}, repeat {rep})")


def main() -> None:
    parser = child_parser(__doc__)
    parser.add_argument("--model")
    parser.add_argument("--work", default=str(WORK))
    parser.add_argument("--sizes", default="small,tiny")
    parser.add_argument("--reps", type=int, default=2,
                        help="runs of each trainer per size, alternating which goes first")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps per run (default: {DEFAULT_STEPS['small']} small, "
                             f"{DEFAULT_STEPS['tiny']} tiny)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1: steadier timings on a shared machine)")
    parser.add_argument("--seed", type=int, default=0, help="seed of repeat 0; repeat r uses seed + r")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--heldout-fraction", type=float, default=0.25)
    parser.add_argument("--heldout-pairs", type=int, default=128, help="held-out pairs scored (the first of the split)")
    args = parser.parse_args()

    if serve_child(args, child_ours, child_trl):
        return

    sys.path.insert(0, str(ROOT))
    import trl

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info = prepare(work, max_length=args.max_length, vocab_size=args.vocab_size, heldout_fraction=args.heldout_fraction)
    print(f"# HH-RLHF harmless-base: {info['records']} comparisons, {info['kept']} token-identical both ways and "
          f"within {args.max_length} tokens ({info['token_mismatch']} encode differently); "
          f"{info['train']} train / {info['heldout']} held-out (by prompt hash)", flush=True)
    print(f"# trl {trl.__version__}; batch {args.batch_size} pairs, beta {args.beta}, sigmoid, lr {args.lr} constant, "
          f"AdamW, clip 1.0, fp32 CPU, {args.threads} thread(s); TRL: bf16=False, gradient_checkpointing=False",
          flush=True)
    lines = []
    for size in [name for name in ("small", "tiny") if name in args.sizes.split(",")]:
        steps = args.steps or DEFAULT_STEPS[size]
        model = info["models"][size]["path"]
        reference = response_logps(Path(model), heldout_rows(args))
        (work / f"reference-logps-{size}.json").write_text(json.dumps(reference))
        runs = {"ours": [], "trl": []}
        for rep in range(args.reps):
            for impl in run_order(rep):
                r = {"seed": args.seed + rep, **run_one(impl, size, rep, model, steps, args)}
                runs[impl].append(r)
                print(f"{size} rep {rep} {impl:4s} (seed {r['seed']}): {r['pairs_per_s']:8.2f} pairs/s  "
                      f"accuracy {r['accuracy']:.3f}  peak {r['peak_mb']:7.1f} MiB  ({r['train_seconds']:.1f} s)",
                      flush=True)
        ours = median(runs["ours"], "pairs_per_s")
        peer = median(runs["trl"], "pairs_per_s")
        lines.append({
            "size": size,
            "parameters": info["models"][size]["parameters"],
            "ours": round(ours, 3),
            "peer": round(peer, 3),
            "ratio": round(ours / peer, 3),
            "ours_accuracy": round(median(runs["ours"], "accuracy"), 4),
            "peer_accuracy": round(median(runs["trl"], "accuracy"), 4),
            "ours_peak_mb": max_peak(runs["ours"]),
            "peer_peak_mb": max_peak(runs["trl"]),
            "ours_spread": spread([r["pairs_per_s"] for r in runs["ours"]]),
            "peer_spread": spread([r["pairs_per_s"] for r in runs["trl"]]),
            "heldout": min(info["heldout"], args.heldout_pairs),
            "train_pairs": info["train"],
            "steps": steps,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "beta": args.beta,
            "learning_rate": args.lr,
            "threads": args.threads,
            "seeds": [args.seed + rep for rep in range(args.reps)],
            "peer_version": f"trl {trl.__version__}",
            "ours_runs": runs["ours"],
            "peer_runs": runs["trl"],
        })
    for line in lines:
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
