"""Best-of-N (rejection sampling): sample N responses, keep the one the PM likes best.

    python -m workers.best_of_n --config best_of_n.json [key=value ...]

The cheap baseline RLHF is compared against: no training, only N times the
sampling. The KL of the best-of-N policy to the sampling policy is
log N - (N - 1) / N (Stiennon et al. 2020, appendix G), bounded by log N;
both are reported, so best-of-N lands on the same reward vs sqrt(KL) chart
as PPO. The selection, ``pick_best``, is shared with
``workers.rejection_sampling``, which fine-tunes the policy on the winners.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from workers.common.config import ConfigError, cli, save_config
from workers.common.data import load_prompts
from workers.common.generation import generate, row_seed, row_uniforms
from workers.common.metrics import StepResult, collect_result, write_json
from workers.common.modeling import check_model_dir, load_causal_lm, load_tokenizer
from workers.common.rollout import check_same_vocabulary, encode_prompts, load_gold, pm_scores
from workers.common.runtime import progress, resolve_device, resolve_dtype, set_threads
from workers.common.score import load_pm
from workers.rl.kl import sqrt_kl

STEP = "best_of_n"


@dataclass(frozen=True)
class BestOfNConfig:
    """Config of the best-of-N step."""

    policy_path: str
    """the policy to sample from"""
    pm_path: str
    """the PM that picks the best response"""
    prompts_path: str
    """prompt set JSONL, one {"id", "prompt"} or {"id", "messages"} (a chat prompt) a line"""
    output_dir: str
    """where best.jsonl, summary.json and the config go"""
    n: int = 4
    """responses sampled per prompt (N)"""
    max_new_tokens: int = 32
    """longest response in tokens (EOS included)"""
    temperature: float = 1.0
    """sampling temperature"""
    max_prompt_tokens: int | None = None
    """keep only the last this-many prompt tokens; None: prompts must fit as they are"""
    gold: str | None = None
    """a gold scoring function, "module:function", for the best and the average response"""
    batch_size: int = 32
    """sequences generated together"""
    seed: int = 0
    """seed of the sampled tokens"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N"""
    dtype: str = "auto"
    """weights dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16"""
    progress: bool = True
    """show a progress bar on stderr"""

    def validate(self) -> None:
        """Raise ConfigError naming the offending values."""
        for name in ("n", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"temperature ({self.temperature}) must be > 0")


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || policy) = log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


class Best(NamedTuple):
    """The best of n responses to each of P prompts."""

    index: torch.Tensor
    """which of the prompt's n samples won (the first of equal scores), shape [P]"""
    score: torch.Tensor
    """the winner's score, shape [P]"""
    mean: torch.Tensor
    """the mean score of the prompt's n samples, shape [P]"""


def pick_best(scores: torch.Tensor) -> Best:
    """The best of each row of ``scores`` [P, n] (row i: prompt i's n samples)."""
    index = scores.argmax(dim=1)
    return Best(index=index, score=scores.gather(1, index[:, None]).squeeze(1), mean=scores.mean(dim=1))


def run(cfg: BestOfNConfig) -> StepResult:
    """Sample N per prompt, keep the PM's best; write best.jsonl and summary.json."""
    cfg.validate()
    check_model_dir(cfg.policy_path, what="policy")
    check_model_dir(cfg.pm_path, what="preference model")
    check_same_vocabulary(cfg.policy_path, cfg.pm_path, "preference model")
    gold = load_gold(cfg.gold) if cfg.gold else None
    set_threads(None)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, step=STEP)
    tokenizer = load_tokenizer(cfg.policy_path)
    prompts = load_prompts(cfg.prompts_path)
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_tokens=cfg.max_prompt_tokens)
    policy = load_causal_lm(cfg.policy_path, device=device, dtype=dtype)
    pm = load_pm(cfg.pm_path, device=cfg.device, dtype=cfg.dtype)

    rows = [(i, s) for i in range(len(prompts)) for s in range(cfg.n)]
    responses: list[list[int]] = []
    scores = []
    bar = progress(len(rows), desc="best-of-n", enabled=cfg.progress, unit="response")
    for start in range(0, len(rows), cfg.batch_size):
        chunk = rows[start : start + cfg.batch_size]
        batch_prompts = [prompt_ids[i] for i, _ in chunk]
        uniforms = torch.stack(
            [row_uniforms(row_seed(cfg.seed, "best_of_n", json.dumps(prompts[i].id), s), cfg.max_new_tokens) for i, s in chunk]
        )
        with torch.no_grad():
            gens = generate(
                policy, batch_prompts, uniforms=uniforms, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, top_p=1.0, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
            )
        batch_responses = [g.tokens for g in gens]
        responses += batch_responses
        scores.append(pm_scores(pm, batch_prompts, batch_responses, cfg.batch_size))
        bar.update(len(chunk))
    bar.close()
    all_scores = torch.cat(scores).view(len(prompts), cfg.n)
    best = pick_best(all_scores).index
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    lines, best_gold, mean_gold = [], [], []
    for i, prompt in enumerate(prompts):
        k = i * cfg.n + int(best[i])
        record = {"prompt_id": prompt.id, "response": texts[k], "score": float(all_scores[i, best[i]])}
        if gold is not None:
            record["gold"] = float(gold(prompt.text, texts[k]))
            best_gold.append(record["gold"])
            mean_gold.append(sum(float(gold(prompt.text, texts[i * cfg.n + s])) for s in range(cfg.n)) / cfg.n)
        lines.append(json.dumps(record, ensure_ascii=False))
    (out / "best.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    metrics = {
        "bon/n": cfg.n,
        "bon/score_best": float(all_scores.max(dim=1).values.mean()),
        "bon/score_mean": float(all_scores.mean()),
        "bon/kl": best_of_n_kl(cfg.n),
        "bon/kl_bound": math.log(cfg.n),
        "bon/sqrt_kl": sqrt_kl(best_of_n_kl(cfg.n)),
    }
    if gold is not None:
        metrics["bon/gold_best"] = sum(best_gold) / len(best_gold)
        metrics["bon/gold_mean"] = sum(mean_gold) / len(mean_gold)
    write_json(out / "summary.json", metrics)
    return collect_result(STEP, out, {"best": out / "best.jsonl"}, metrics)


def main(argv: Sequence[str] | None = None) -> int:
    return cli(BestOfNConfig, run, argv, prog="workers.best_of_n", description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
