"""Evaluate a candidate policy against the deployed one on held-out prompts.

    python -m workers.evaluate --config evaluate.json [key=value ...]

Both policies answer every prompt ``num_samples`` times with the same random
numbers. Reported (what the deploy gate reads):

- win rate of the candidate under the test PM and under the train PM (a tie
  counts half), and the implied Elo difference, 400 * log10(w / (1 - w));
- for an ensemble train PM, the members' mean spread on each policy's
  responses (a candidate far off the PM's data shows a larger spread);
- mean score change under each PM (candidate minus baseline): reward hacking
  shows as the train PM's score rising while the test PM's falls;
- mean KL(policy || reference) per response, for both policies (the k1
  estimate on each policy's own samples);
- a gold score of both when a scoring function is given ("module:function",
  called as function(prompt, response) -> float), and mean response length.

Under ``torchrun --nproc_per_node N`` the batches are split over the
processes, one each per round of N; every process gathers every batch's
results (the same as one process computes: a row's random numbers are its
own), and rank 0 writes the report.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.common.config import ConfigError, cli, save_config
from workers.common.data import load_prompts
from workers.common.generation import row_seed, row_uniforms
from workers.common.metrics import StepResult, collect_result, write_json
from workers.common.modeling import check_model_dir, load_causal_lm, load_tokenizer
from workers.common.rollout import (
    check_same_vocabulary,
    encode_prompts,
    load_gold,
    pm_member_scores,
    pm_scores,
    sample_with_kl,
)
from workers.common.distributed import World, init_world, shutdown
from workers.common.runtime import progress, resolve_dtype, set_threads
from workers.common.score import load_pm

STEP = "evaluate"


@dataclass(frozen=True)
class EvaluateConfig:
    """Config of the evaluate step."""

    candidate_path: str
    """the policy that wants to be deployed"""
    baseline_path: str
    """the deployed policy it must beat"""
    reference_path: str
    """the reference policy KL is measured against (the initial policy)"""
    pm_path: str
    """the train PM (the one PPO optimised)"""
    test_pm_path: str
    """the held-out test PM (the gate's judge)"""
    prompts_path: str
    """held-out prompt set JSONL, one {"id", "prompt"} or {"id", "messages"} (a chat prompt) a line"""
    output_dir: str
    """where report.json, samples.jsonl and the config go"""
    num_samples: int = 1
    """responses per prompt and policy"""
    max_new_tokens: int = 32
    """longest response in tokens (EOS included)"""
    temperature: float = 1.0
    """sampling temperature (log-probs and KL are taken at it)"""
    max_prompt_tokens: int | None = None
    """keep only the last this-many prompt tokens; None: prompts must fit as they are"""
    gold: str | None = None
    """a gold scoring function, "module:function", called as function(prompt, response) -> float"""
    batch_size: int = 32
    """prompts generated and scored together"""
    seed: int = 0
    """seed of the sampled tokens (both policies get the same random numbers)"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N"""
    dtype: str = "auto"
    """weights dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16"""
    num_threads: int | None = None
    """torch CPU threads (None: torch's default)"""
    progress: bool = True
    """show a progress bar on stderr"""

    def validate(self) -> None:
        """Raise ConfigError naming the offending values."""
        for name in ("num_samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"temperature ({self.temperature}) must be > 0")
        if self.gold is not None and ":" not in self.gold:
            raise ConfigError(f"gold ({self.gold!r}) must be 'module:function'")


def win_rate(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of pairs where ``a`` scores higher than ``b``; ties count half."""
    return float(((a > b).float() + 0.5 * (a == b).float()).mean())


def elo_difference(w: float, n: int) -> float:
    """400 * log10(w / (1 - w)), with w kept half a game away from 0 and 1 (finite for a sweep)."""
    eps = 0.5 / max(n, 1)
    w = min(max(w, eps), 1 - eps)
    return 400 * math.log10(w / (1 - w))


def run(cfg: EvaluateConfig) -> StepResult:
    """Compare candidate and baseline; write report.json and samples.jsonl."""
    cfg.validate()
    for path, what in ((cfg.candidate_path, "candidate policy"), (cfg.baseline_path, "baseline policy"),
                       (cfg.reference_path, "reference policy")):
        check_model_dir(path, what=what)
        check_same_vocabulary(cfg.candidate_path, path, what)
    for path, what in ((cfg.pm_path, "train preference model"), (cfg.test_pm_path, "test preference model")):
        check_model_dir(path, what=what)
        check_same_vocabulary(cfg.candidate_path, path, what)
    gold = load_gold(cfg.gold) if cfg.gold else None
    set_threads(cfg.num_threads)
    world, device = init_world("ddp", cfg.device)
    try:
        return _evaluate(cfg, world, device, gold)
    finally:
        shutdown(world)


def _evaluate(cfg: EvaluateConfig, world: World, device: torch.device, gold) -> StepResult:
    """The run of one process: its batches of every round of ``world.size`` batches (all of them alone)."""
    dtype = resolve_dtype(cfg.dtype, device)
    out = Path(cfg.output_dir)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out, step=STEP)

    tokenizer = load_tokenizer(cfg.candidate_path)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = load_prompts(cfg.prompts_path)
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_tokens=cfg.max_prompt_tokens)
    candidate = load_causal_lm(cfg.candidate_path, device=device, dtype=dtype)
    baseline = load_causal_lm(cfg.baseline_path, device=device, dtype=dtype)
    reference = load_causal_lm(cfg.reference_path, device=device, dtype=dtype)
    train_pm = load_pm(cfg.pm_path, device=cfg.device, dtype=cfg.dtype)
    test_pm = load_pm(cfg.test_pm_path, device=cfg.device, dtype=cfg.dtype)

    rows = [(i, s) for i in range(len(prompts)) for s in range(cfg.num_samples)]
    collected: dict[str, dict[str, list]] = {
        name: {"responses": [], "kl": [], "train": [], "spread": [], "test": []} for name in ("candidate", "baseline")
    }
    # Batches in rounds of world.size, one each (the rows' random numbers are their own, so a batch's results
    # do not depend on the process that runs it); every process gathers every batch's results, in order.
    batches = [rows[start : start + cfg.batch_size] for start in range(0, len(rows), cfg.batch_size)]
    bar = progress(len(rows), desc="evaluate", enabled=cfg.progress and world.main, unit="prompt")
    for first in range(0, len(batches), world.size):
        mine = first + world.rank
        result = [_evaluate_batch(cfg, batches[mine], prompts, prompt_ids, candidate, baseline, reference, train_pm,
                                  test_pm, eos_id, pad_id)] if mine < len(batches) else []
        for batch_result in world.gather_lists(result):
            for name, part in batch_result.items():
                collected[name]["responses"] += part["responses"]
                for key in ("kl", "train", "spread", "test"):
                    collected[name][key].append(part[key])
        bar.update(sum(len(b) for b in batches[first : first + world.size]))
    bar.close()

    texts = {name: tokenizer.batch_decode(part["responses"], skip_special_tokens=True) for name, part in collected.items()}
    scores = {name: {k: torch.cat(part[k]) for k in ("kl", "train", "spread", "test")} for name, part in collected.items()}
    c, b = scores["candidate"], scores["baseline"]
    n = len(rows)
    w_test, w_train = win_rate(c["test"], b["test"]), win_rate(c["train"], b["train"])
    metrics: dict[str, Any] = {
        "eval/win_rate_test_pm": w_test,
        "eval/win_rate_train_pm": w_train,
        "eval/elo_diff": elo_difference(w_test, n),
        "eval/elo_diff_train_pm": elo_difference(w_train, n),
        "eval/test_pm_delta": float((c["test"] - b["test"]).mean()),
        "eval/train_pm_delta": float((c["train"] - b["train"]).mean()),
        "eval/test_pm_candidate": float(c["test"].mean()),
        "eval/train_pm_candidate": float(c["train"].mean()),
        "eval/train_pm_spread_candidate": float(c["spread"].mean()),
        "eval/train_pm_spread_baseline": float(b["spread"].mean()),
        "eval/kl": float(c["kl"].mean()),
        "eval/kl_baseline": float(b["kl"].mean()),
        "eval/length_candidate": sum(len(r) for r in collected["candidate"]["responses"]) / n,
        "eval/length_baseline": sum(len(r) for r in collected["baseline"]["responses"]) / n,
        "eval/comparisons": n,
    }
    golds: dict[str, list[float]] = {}
    if gold is not None:
        for name in ("candidate", "baseline"):
            golds[name] = [float(gold(prompts[i].text, text)) for (i, _), text in zip(rows, texts[name])]
            metrics[f"eval/gold_{name}"] = sum(golds[name]) / n

    samples = []
    for k, (i, s) in enumerate(rows):
        record = {"prompt_id": prompts[i].id, "sample": s}
        for name in ("candidate", "baseline"):
            record[name] = {
                "response": texts[name][k], "train_pm": float(scores[name]["train"][k]),
                "test_pm": float(scores[name]["test"][k]), "kl": float(scores[name]["kl"][k]),
            }
            if golds:
                record[name]["gold"] = golds[name][k]
        samples.append(json.dumps(record, ensure_ascii=False))
    report = out / "report.json"
    if world.main:
        (out / "samples.jsonl").write_text("\n".join(samples) + "\n", encoding="utf-8")
        write_json(report, {"metrics": metrics, "candidate": cfg.candidate_path, "baseline": cfg.baseline_path})
    world.barrier()
    return collect_result(STEP, out, {"report": report, "samples": out / "samples.jsonl"}, metrics)


def _evaluate_batch(cfg: EvaluateConfig, chunk, prompts, prompt_ids, candidate, baseline, reference, train_pm, test_pm,
                    eos_id: int, pad_id: int) -> dict[str, dict[str, list]]:
    """Responses of both policies to one batch of (prompt, sample) rows, with their KL and PM scores (CPU tensors)."""
    batch_prompts = [prompt_ids[i] for i, _ in chunk]
    uniforms = torch.stack(
        [row_uniforms(row_seed(cfg.seed, "evaluate", json.dumps(prompts[i].id), s), cfg.max_new_tokens) for i, s in chunk]
    )
    out = {}
    for name, model in (("candidate", candidate), ("baseline", baseline)):
        responses, kl = sample_with_kl(
            model, reference, batch_prompts, uniforms=uniforms, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, eos_id=eos_id, pad_id=pad_id,
        )
        members = pm_member_scores(train_pm, batch_prompts, responses, cfg.batch_size)
        out[name] = {
            "responses": responses, "kl": kl.cpu(), "train": members.mean(0).cpu(),
            "spread": members.std(0, unbiased=False).cpu(),
            "test": pm_scores(test_pm, batch_prompts, responses, cfg.batch_size).cpu(),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return cli(EvaluateConfig, run, argv, prog="workers.evaluate", description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
