"""Sampling throughput: Ratchet's sample step vs a plain per-prompt ``model.generate`` loop.

    python bench/sampling.py [--prompts 32] [--samples 4] [--max-new-tokens 64] [--threads 1]

Both sample the same model (a GPT-2 built locally, 4 layers, 256 wide, with
a tokenizer trained on the HH-RLHF sample), the same HH-RLHF prompts (their
last ``--max-prompt-tokens`` tokens), K responses per prompt, the same
temperature, top-p and max new tokens, stopping at EOS. The peer is what a
script would do without a batched sampler: for each prompt,
``model.generate(prompt, do_sample=True, num_return_sequences=K, ...)``.
Ours is ``workers.sample.run`` (left-padded batches of ``--batch-size``
sequences, KV cache, finished rows dropped).

Tokens/s counts generated tokens (up to and including EOS) over generation
time (model loading excluded for both; ours as the step reports it). Runs
alternate, and the median over ``--repeats`` is reported. The last line is
JSON: ``{"ours", "peer", "ratio", ...}`` in tokens/s.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HH = ROOT / "tests" / "data" / "hh-rlhf" / "harmless-base-test.first1000.jsonl.gz"
ASSISTANT = "\n\nAssistant:"


def hh_prompts(n: int) -> list[str]:
    """The first ``n`` distinct HH-RLHF prompts (everything up to the last "\\n\\nAssistant:")."""
    out: list[str] = []
    with gzip.open(HH, "rt", encoding="utf-8") as fh:
        for line in fh:
            text = json.loads(line)["chosen"]
            prompt = text[: text.rindex(ASSISTANT) + len(ASSISTANT)]
            if prompt not in out:
                out.append(prompt)
            if len(out) == n:
                break
    return out


def encode_for_peer(tok, prompts: list[str], max_prompt_tokens: int) -> list[list[int]]:
    """Each prompt's token ids as ``workers.sample`` feeds them: leading special tokens, then the last tokens."""
    from workers.common.pm import special_prefix

    prefix = special_prefix(tok)
    keep = max_prompt_tokens - len(prefix)
    return [prefix + tok(p, add_special_tokens=False)["input_ids"][-keep:] for p in prompts]


def peer_tokens_per_s(model, tok, encoded: list[list[int]], *, samples: int, max_new_tokens: int,
                      temperature: float, top_p: float) -> float:
    """Generated tokens/s of the peer: per prompt, ``model.generate`` with ``samples`` return sequences.

    Runs on the model's device; tokens count up to and including EOS.
    """
    import torch

    from workers.common.runtime import synchronize

    device = next(model.parameters()).device
    tokens, start = 0, time.perf_counter()
    with torch.no_grad():
        for ids in encoded:
            x = torch.tensor([ids], device=device)
            out = model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, temperature=temperature,
                top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, num_return_sequences=samples,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
            for seq in out[:, len(ids):].tolist():
                tokens += seq.index(tok.eos_token_id) + 1 if tok.eos_token_id in seq else len(seq)
    synchronize(device)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "bench" / "results" / "sampling"))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4, help="K responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=32, help="our sequences per generation batch")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from workers.common.modeling import load_causal_lm, load_tokenizer
    from workers.sample import SampleConfig, run
    from workers.common.testing import build_tiny_model, build_tokenizer, count_parameters

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prompts = hh_prompts(args.prompts)
    tokenizer = build_tokenizer(prompts, vocab_size=4096, model_max_length=10**6)
    model_dir = build_tiny_model(work / "model", tokenizer=tokenizer, n_layer=args.layers, hidden_size=args.hidden,
                                 n_head=max(1, args.hidden // 64), max_positions=512, dropout=0.0, seed=0)
    prompts_path = work / "prompts.jsonl"
    prompts_path.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))

    # The peer: per prompt, transformers' generate with K return sequences.
    model = load_causal_lm(model_dir, device=torch.device("cpu"), dtype=torch.float32)
    tok = load_tokenizer(model_dir)
    encoded = encode_for_peer(tok, prompts, args.max_prompt_tokens)
    print(f"# {count_parameters(model) / 1e6:.1f}M-parameter GPT-2, {len(prompts)} HH prompts "
          f"(mean {sum(map(len, encoded)) / len(encoded):.0f} tokens), K={args.samples}, max_new_tokens "
          f"{args.max_new_tokens}, temperature {args.temperature}, top_p {args.top_p}, {args.threads} thread(s)", flush=True)

    def peer() -> float:
        return peer_tokens_per_s(model, tok, encoded, samples=args.samples, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p)

    def ours(rep: int) -> float:
        out = work / f"out-{rep}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = SampleConfig(policies={"bench": str(model_dir)}, prompts_path=str(prompts_path), output_dir=str(out),
                           num_samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, max_prompt_tokens=args.max_prompt_tokens, batch_size=args.batch_size,
                           seed=rep, device="cpu", dtype="float32", num_threads=args.threads, progress=False)
        return run(cfg).metrics["perf/tokens_per_s"]

    results: dict[str, list[float]] = {"ours": [], "peer": []}
    for rep in range(args.repeats):
        for name in (("ours", "peer") if rep % 2 == 0 else ("peer", "ours")):
            torch.manual_seed(rep)
            value = ours(rep) if name == "ours" else peer()
            results[name].append(value)
            print(f"rep {rep} {name:4s}: {value:9.1f} tokens/s", flush=True)
    ours_tps = statistics.median(results["ours"])
    peer_tps = statistics.median(results["peer"])
    print(json.dumps({
        "ours": round(ours_tps, 1),
        "peer": round(peer_tps, 1),
        "ratio": round(ours_tps / peer_tps, 3),
        "prompts": len(prompts),
        "samples_per_prompt": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
