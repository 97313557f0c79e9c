"""online_dpo: DPO on the policy's own samples, labelled by the preference model, in rounds.

    python -m workers.online_dpo --config online_dpo.json [key=value ...]

Online AI feedback (Guo et al. 2024, "Direct Language Model Alignment from
Online AI Feedback"; Calandriello et al. 2024): offline DPO learns from pairs
some other policy wrote, so the further the policy moves the less its data
says about it. Here every round

1. takes ``prompts_per_round`` prompts (a seeded order over the prompt set),
2. samples two responses to each from the CURRENT policy (each token's random
   number from (seed, round, prompt, sample), as ppo does),
3. scores both with the PM: with an ensemble, conservatively, the members'
   mean minus ``ensemble_penalty`` times their spread (Coste et al. 2023),
4. labels the higher-scored response chosen; a pair whose score gap is below
   ``min_gap`` is a tie (trained with target 1/2, as ``workers.dpo`` trains a
   team's ties, or dropped with ``ties: drop``), and a pair of identical
   responses is dropped (it has no gradient),
5. runs ``epochs`` passes of DPO (or IPO) mini-batch updates on those pairs
   against the frozen reference policy (``reference_path``, the KL anchor of
   the implicit reward; with LoRA the policy with its adapters off).

Each round logs one metrics.jsonl line: the PM's mean score of the round's
samples (``online_dpo/reward``; ``_conservative``, ``_spread``,
``_test_pm``), the mean |score gap| of its distinct pairs, how many pairs
trained, tied and were identical, the DPO loss and implicit-reward accuracy
and margin over the round's steps (``losses/dpo``, ``rewards/*``), the KL,
and the same under the ``policy/*`` keys every policy step reports.

The reported KL is that of the sampled responses to the reference: the k1
estimate (log pi - log pi_ref at ``temperature``) summed over a response's
tokens, averaged over the round's responses, in nats, as ppo reports it.

Outputs under ``output_dir``:

    policy/                     the trained model and tokenizer (Hugging Face, safetensors; LoRA merged)
    metrics.jsonl               one line per round
    summary.json                the last round's metrics and the config
    ratchet_step_config.json    this config
    checkpoints/step-*/         model, optimizer and round while training; removed once policy/ is written

Every random draw is seeded from (seed, round, ...), so a run stopped by
``max_rounds_this_run`` and re-run ends with the weights of an uninterrupted
one, bit for bit.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from workers.common.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from workers.common.config import ConfigError, WorkerError, cli, save_config, to_dict
from workers.common.distributed import refuse_distributed
from workers.common.data import load_prompts
from workers.common.generation import row_seed
from workers.common.metrics import MetricsWriter, StepResult, collect_result
from workers.common.modeling import load_tokenizer, max_positions, model_config
from workers.common.policy_step import (
    ConservativeReward, check_inputs, check_policy_config, check_resume_config, checkpointed, conservative_reward,
    finish, finished_result, last_metrics, load_models, log_progress, policy_metrics, sample_uniforms, save_policy,
    setup_machine, this_run,
)
from workers.common.rollout import encode_prompts, pm_member_scores, pm_scores, sample_with_kl
from workers.common.runtime import autocast, progress, seed_everything
from workers.common.schedule import DataOrder, adamw
from workers.dpo import Pair, pair_logps
from workers.rl.kl import sqrt_kl
from workers.rl.preference import preference_loss
from workers.sft import Example

STEP = "online_dpo"
RUN_ONLY_FIELDS = {"output_dir", "max_rounds_this_run", "progress", "num_threads", "checkpoint_every", "device"}
"""config fields that do not change what a run computes (a resume or a re-run may change them)"""


@dataclass(frozen=True)
class OnlineDPOConfig:
    """Config of the online DPO step."""

    policy_path: str
    """the policy to start from (the deployed policy, or the initial one): a Hugging Face causal LM directory"""
    reference_path: str
    """the frozen reference policy of DPO's implicit reward, the KL anchor (the initial policy)"""
    pm_path: str
    """the preference model that labels the pairs (the train PM)"""
    prompts_path: str
    """prompt set JSONL, one {"id", "prompt"} a line"""
    output_dir: str
    """where the trained policy (policy/), metrics, summary, checkpoints and the config go"""
    test_pm_path: str | None = None
    """a held-out PM scored alongside (metrics only), to see over-optimisation"""
    rounds: int = 8
    """rounds of sample, label, train"""
    prompts_per_round: int = 32
    """prompts sampled per round (two responses each, so at most this many pairs)"""
    response_length: int = 32
    """longest response in tokens (EOS included)"""
    max_prompt_tokens: int | None = None
    """keep only the last this-many prompt tokens; None: prompts must fit as they are"""
    temperature: float = 1.0
    """sampling temperature (the reported KL is taken at it; DPO's log-probs at temperature 1, as the paper)"""
    beta: float = 0.1
    """the implicit reward's scale beta: r = beta * (log pi - log pi_ref); larger keeps closer to the reference"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's loss (Rafailov et al. eq. 7); ipo: IPO's squared loss (Azar et al. eq. 17)"""
    min_gap: float = 0.0
    """a pair whose (conservative) PM scores differ by less than this is a tie; 0: only equal scores tie"""
    ties: Literal["keep", "drop"] = "keep"
    """keep: ties train with target 1/2 (equal implicit rewards); drop: ties are left out of training"""
    ensemble_penalty: float = 0.0
    """lambda of the conservative score for an ensemble PM: the members' mean score minus lambda times their
    standard deviation (Coste et al. 2023, uncertainty-weighted optimisation; 0: the mean)"""
    missing_eos_penalty: float | None = None
    """subtracted from the PM score of a response that ran out of tokens before EOS"""
    epochs: int = 1
    """passes of DPO updates over each round's pairs"""
    batch_size: int = 8
    """pairs per optimizer step (2 x batch_size sequences per forward pass; a round's last batch may be smaller)"""
    learning_rate: float = 1e-6
    """AdamW learning rate (DPO's 1e-6 for full fine-tuning; raise it with LoRA or tiny models)"""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (matrices only)"""
    max_grad_norm: float | None = 1.0
    """clip the gradient's global L2 norm to this (None: no clipping)"""
    lora_r: int = 0
    """LoRA rank (0: train every weight); with LoRA the reference is the policy with its adapters switched off"""
    lora_alpha: int = 16
    """LoRA alpha"""
    pm_batch_size: int = 32
    """responses per PM forward pass"""
    checkpoint_every: int = 1
    """write a checkpoint every this many rounds (and whenever a run stops early)"""
    max_rounds_this_run: int | None = None
    """stop (with a checkpoint) after this many rounds in this invocation; a re-run resumes after them"""
    seed: int = 0
    """seed of the prompt order, the sampled tokens, the mini-batch order and LoRA's initialisation"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N"""
    dtype: str = "auto"
    """compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16 (trained weights stay float32;
    the reference, PMs and a LoRA policy's base weights are held in this dtype)"""
    num_threads: int | None = None
    """torch CPU threads (None: torch's default)"""
    progress: bool = True
    """show a progress bar on stderr"""

    def validate(self) -> None:
        """Raise ConfigError naming the offending values."""
        for name in ("rounds", "prompts_per_round", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 1")
        for name in ("max_prompt_tokens", "max_rounds_this_run", "num_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} ({value}) must be >= 1 or null")
        if not self.beta > 0:
            raise ConfigError(f"beta ({self.beta}) must be > 0")
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ConfigError(f"loss_type ({self.loss_type!r}) must be one of sigmoid, ipo")
        if self.ties not in ("keep", "drop"):
            raise ConfigError(f"ties ({self.ties!r}) must be keep or drop")
        if not self.temperature > 0:
            raise ConfigError(f"temperature ({self.temperature}) must be > 0: two greedy responses would be the same")
        for name in ("min_gap", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 0")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ConfigError(f"missing_eos_penalty ({self.missing_eos_penalty}) must be >= 0 or null")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm ({self.max_grad_norm}) must be > 0 or null")
        check_policy_config(self)


# -- labelling a round's pairs (pure) -------------------------------------------------


class PairLabels(NamedTuple):
    """The PM's verdict on a round's pairs (A, B) of responses to one prompt; every field has shape [n]."""

    target: torch.Tensor
    """labelled P(A preferred): 1 (A scored higher), 0 (B did) or 0.5 (a tie, or identical responses)"""
    gap: torch.Tensor
    """score(A) - score(B)"""
    tie: torch.Tensor
    """|gap| below min_gap (or 0), responses distinct"""
    identical: torch.Tensor
    """A and B are the same tokens: dropped, as the pair has no gradient"""
    keep: torch.Tensor
    """trained on: distinct, and not a tie when ties are dropped"""


def label_pairs(score_a: torch.Tensor, score_b: torch.Tensor, identical: torch.Tensor, *, min_gap: float,
                ties: str) -> PairLabels:
    """Label each pair by its scores [n]: the higher one chosen, a gap below ``min_gap`` (or none) a tie."""
    gap = score_a - score_b
    level = (gap.abs() < min_gap) | (gap == 0) | identical
    target = torch.where(level, 0.5, (gap > 0).float())
    tie = level & ~identical
    keep = ~identical & ~(tie & (ties == "drop"))
    return PairLabels(target=target, gap=gap, tie=tie, identical=identical, keep=keep)


# -- the step -------------------------------------------------------------------------


def _check_prompts(prompt_ids: list[list[int]], cfg: OnlineDPOConfig) -> None:
    """WorkerError for an empty prompt set, or a prompt whose response would not fit the policy's positions."""
    if not prompt_ids:
        raise WorkerError(f"prompt set {cfg.prompts_path} is empty: there is nothing to sample")
    limit = max_positions(model_config(cfg.policy_path))
    longest = max(len(p) for p in prompt_ids)
    if limit is not None and longest + cfg.response_length > limit:
        raise WorkerError(
            f"the longest prompt ({longest} tokens) + response_length ({cfg.response_length}) exceeds the policy's "
            f"{limit} positions; set max_prompt_tokens or lower response_length"
        )


def _train_on_pairs(model: torch.nn.Module, reference: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
                    params: list[torch.nn.Parameter], pairs: list[Pair], k: int, cfg: OnlineDPOConfig, *, pad_id: int,
                    device: torch.device, compute_dtype: torch.dtype) -> dict[str, Any]:
    """``epochs`` passes of DPO (or IPO) mini-batch updates on round ``k``'s pairs against the reference, each
    pass in an order seeded by (seed, round, epoch); the round's loss, implicit-reward accuracy and margin (over
    the decisive pairs) and optimizer metrics."""
    losses_sum, steps, right, margin_sum, decisive, grad_norms = 0.0, 0, 0.0, 0.0, 0, []
    for epoch in range(cfg.epochs):
        perm = torch.randperm(
            len(pairs), generator=torch.Generator().manual_seed(row_seed(cfg.seed, f"{STEP}-minibatch", k, epoch))
        ).tolist()
        for start in range(0, len(pairs), cfg.batch_size):
            batch = [pairs[i] for i in perm[start : start + cfg.batch_size]]
            logps = pair_logps(model, reference, batch, pad_id=pad_id, device=device, compute_dtype=compute_dtype)
            losses, stats = preference_loss(*logps, beta=cfg.beta, loss_type=cfg.loss_type)
            loss = losses.mean()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses_sum += loss.item()
            steps += 1
            grad_norms.append(float(grad_norm))
            n = int(stats.num_decisive)
            if n:
                right += float(stats.accuracy) * n
                margin_sum += float(stats.margin) * n
                decisive += n
    return {
        "losses/dpo": losses_sum / steps if steps else None,
        "rewards/accuracy": right / decisive if decisive else None,
        "rewards/margin": margin_sum / decisive if decisive else None,
        "optim/steps": steps,
        "optim/grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else None,
    }


def _round_metrics(scores: ConservativeReward, labels: PairLabels, pairs: int, kls: torch.Tensor,
                   ended: torch.Tensor, responses: list[list[int]], training: dict[str, Any],
                   test_scores: torch.Tensor | None, *, episodes: int, episodes_per_s: float) -> dict[str, Any]:
    """The metrics line of a round: the online_dpo/* keys, ``training``'s (``_train_on_pairs``) and the common
    policy/* keys. ``online_dpo/reward_conservative`` is the mean labelling score (missing-EOS penalty in)."""
    mean_kl = float(kls.mean())
    distinct = ~labels.identical
    record: dict[str, Any] = {
        "online_dpo/reward": float(scores.mean.mean()),
        "online_dpo/reward_spread": float(scores.spread.mean()),
        "online_dpo/reward_conservative": float(scores.reward.mean()),
        "online_dpo/score_gap": float(labels.gap[distinct].abs().mean()) if distinct.any() else None,
        "online_dpo/pairs": pairs,
        "online_dpo/ties": int(labels.tie.sum()),
        "online_dpo/identical": int(labels.identical.sum()),
        "online_dpo/kl": mean_kl,
        "online_dpo/sqrt_kl": sqrt_kl(mean_kl),
        "online_dpo/eos_fraction": float(ended.float().mean()),
        "online_dpo/response_length": sum(len(r) for r in responses) / len(responses),
        "online_dpo/episodes": episodes,
        **training,
        "charts/episodes_per_s": episodes_per_s,
        **policy_metrics(scores, mean_kl, episodes, test_scores),
    }
    if test_scores is not None:
        record["online_dpo/reward_test_pm"] = record["policy/reward_test_pm"]
    return record


def run(cfg: OnlineDPOConfig) -> StepResult:
    """Train the policy by online DPO against the PM; resumes from the newest checkpoint under output_dir."""
    # 0. Setup: validate, a finished earlier run, inputs, machine.
    refuse_distributed(STEP)  # one process only: see workers.common.distributed
    cfg.validate()
    out = Path(cfg.output_dir)
    final_dir = out / "policy"
    if (done := finished_result(STEP, cfg, RUN_ONLY_FIELDS)) is not None:
        return done
    check_inputs(cfg)
    device, compute_dtype = setup_machine(cfg)

    tokenizer = load_tokenizer(cfg.policy_path)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_ids = encode_prompts(tokenizer, load_prompts(cfg.prompts_path), max_prompt_tokens=cfg.max_prompt_tokens)
    _check_prompts(prompt_ids, cfg)
    # A checkpoint written with another config is refused before anything in output_dir changes.
    checkpoints = out / "checkpoints"
    if (latest := latest_checkpoint(checkpoints)) is not None:
        check_resume_config(latest, cfg, RUN_ONLY_FIELDS)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, step=STEP)
    # Derived sizes, computed once.
    episodes_per_round = 2 * cfg.prompts_per_round
    prompt_order = DataOrder(len(prompt_ids), seed=cfg.seed)

    # 1. Policy (float32 master weights, or float32 LoRA adapters on compute_dtype base weights), the frozen
    #    reference and the PMs. Dropout is off: with it log pi and log pi_ref would differ by noise.
    seed_everything(cfg.seed)  # LoRA's adapter initialisation draws from the global generator
    model, reference, pm, test_pm = load_models(cfg, device, compute_dtype, lora_dropout=0.0)
    optimizer, params = adamw(model, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    # 2. Resume from the newest checkpoint, or start clean.
    start_round = load_checkpoint(latest, model=model, optimizer=optimizer)["round"] if latest is not None else 0
    metrics = MetricsWriter(out / "metrics.jsonl")
    metrics.rewind(after_step=start_round)

    bar = progress(cfg.rounds, desc=STEP, enabled=cfg.progress, initial=start_round, unit="round")
    rounds = this_run(start_round, cfg.rounds, cfg.max_rounds_this_run)
    for k in rounds:
        started = time.perf_counter()
        model.eval()
        # 3. Two responses to each of the round's prompts from the current policy, with their KL to the
        #    reference; row (prompt j, sample s) draws its tokens from (seed, round k, j, s).
        prompts = [prompt_ids[i] for i in prompt_order.batch(k, cfg.prompts_per_round)]
        rows = [p for p in prompts for _ in range(2)]
        uniforms = sample_uniforms(cfg.seed, STEP, k, len(prompts), 2, cfg.response_length)
        with autocast(device, compute_dtype):
            responses, kls = sample_with_kl(
                model, reference, rows, uniforms=uniforms, max_new_tokens=cfg.response_length,
                temperature=cfg.temperature, eos_id=eos_id, pad_id=pad_id,
            )
        ended = torch.tensor([r[-1] == eos_id for r in responses])

        # 4. PM scores, conservative under an ensemble; a response cut off before EOS pays missing_eos_penalty.
        members = pm_member_scores(pm, rows, responses, cfg.pm_batch_size)  # [K, 2n]
        scores = conservative_reward(members, ended, ensemble_penalty=cfg.ensemble_penalty,
                                     missing_eos_penalty=cfg.missing_eos_penalty)
        test_scores = pm_scores(test_pm, rows, responses, cfg.pm_batch_size) if test_pm else None

        # 5. Label each prompt's pair (A = sample 0, B = sample 1) by the higher score.
        identical = torch.tensor([responses[2 * j] == responses[2 * j + 1] for j in range(len(prompts))])
        labels = label_pairs(scores.reward[0::2], scores.reward[1::2], identical, min_gap=cfg.min_gap, ties=cfg.ties)
        pairs = [
            Pair(Example(p + responses[2 * j], len(p)), Example(p + responses[2 * j + 1], len(p)),
                 float(labels.target[j]))
            for j, p in enumerate(prompts) if labels.keep[j]
        ]

        # 6. epochs passes of DPO / IPO mini-batch updates against the reference, in a seeded order per epoch.
        model.train()
        training = _train_on_pairs(model, reference, optimizer, params, pairs, k, cfg, pad_id=pad_id, device=device,
                                   compute_dtype=compute_dtype)

        # 7. Metrics (namespaced, as cleanrl; the policy/* keys are what the orchestrator reads) and a checkpoint.
        elapsed = time.perf_counter() - started
        record = _round_metrics(scores, labels, len(pairs), kls, ended, responses, training, test_scores,
                                episodes=(k + 1) * episodes_per_round, episodes_per_s=episodes_per_round / elapsed)
        log_progress(metrics, bar, k + 1, record)
        last_of_run = k + 1 == rounds.stop  # a run stopped by max_rounds_this_run resumes from here
        if (k + 1) % cfg.checkpoint_every == 0 or k + 1 == cfg.rounds or last_of_run:
            save_checkpoint(checkpoints, k + 1, model=model, optimizer=optimizer,
                            state={"round": k + 1, "config": to_dict(cfg)})
    bar.close()
    rounds_done = checkpointed(checkpoints)
    if rounds_done < cfg.rounds:
        return collect_result(STEP, out, {}, {"rounds_done": rounds_done, "rounds": cfg.rounds}, complete=False)

    # 8. The policy as an ordinary Hugging Face directory, in float32 (LoRA merged into float32 base weights:
    #    merged into bfloat16 ones small updates would round away), then the summary that marks the run finished.
    model.eval()
    save_policy(model, tokenizer, final_dir, lora=bool(cfg.lora_r))
    save_config(cfg, final_dir, step=STEP)
    return finish(STEP, cfg, {**last_metrics(out), "online_dpo/rounds": cfg.rounds})


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workers.online_dpo --config FILE [key=value ...]``."""
    return cli(OnlineDPOConfig, run, argv, prog="workers.online_dpo", description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
