"""rloo: critic-free RL against a preference model, RLOO or GRPO, with a KL anchor to a reference policy.

    python -m workers.rloo --config rloo.json [key=value ...]

One rollout is: take ``prompts_per_rollout`` prompts, sample ``k`` responses to
each with the policy, score every response with the PM (an ensemble's
conservative reward: members' mean minus ``ensemble_penalty`` times their
spread, Coste et al. 2023), and turn each prompt's k rewards into advantages
against a baseline drawn from the group itself, so no value function is
trained:

* ``estimator="rloo"``: the leave-one-out baseline, the mean reward of the
  other k - 1 samples (Kool et al. 2019; Ahmadian et al. 2024, eq. 3);
* ``"grpo"``: the group-normalised reward (r - mean) / std (Shao et al. 2024);
* ``"dr_grpo"``: centring only, r - mean (Liu et al. 2025, Dr. GRPO).

The KL to the reference policy enters one of two ways. ``kl_in_reward=True``
(RLOO's way): the reward of a response is score - kl_coef * KL, KL the k1
estimate summed over its tokens, before the group baseline. ``False`` (GRPO's
way): the advantages come from the scores alone and the loss adds
kl_coef * k3(policy, reference) per token (DeepSeekMath eq. 3).

Then ``epochs`` passes of mini-batch updates with the clipped ratio surrogate
(``workers.rl.losses.grpo_loss``); with one epoch and one mini-batch (the
defaults) the ratio is 1 at the step and this is REINFORCE with the group
baseline. The loss averages each response's tokens, then the responses
(GRPO's 1/G sum_i 1/|o_i| sum_t): every response counts the same whatever its
length. Dr. GRPO also drops that 1/|o_i| (a length bias the paper points
out); here ``dr_grpo`` changes the advantage only.

With ``lora_r > 0`` only LoRA adapters train and the reference is the same
network with its adapters switched off; the saved policy has them merged.

Outputs under ``output_dir``:

    policy/                     the trained policy and tokenizer (Hugging Face, safetensors, float32; LoRA merged)
    metrics.jsonl               one line per rollout
    summary.json                the last rollout's metrics and the config
    ratchet_step_config.json    this config
    checkpoints/step-*/         while training (policy, optimizer, rollout count); removed once policy/ is written

Every random draw is seeded from (seed, rollout, prompt slot, sample), so a
killed and resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from workers.common.checkpoint import save_checkpoint
from workers.common.config import ConfigError, cli, save_config, to_dict
from workers.common.distributed import refuse_distributed
from workers.common.data import load_prompts
from workers.common.generation import generate, row_seed
from workers.common.metrics import MetricsWriter, StepResult, collect_result
from workers.common.modeling import causal_mask_4d, disable_dropout, load_tokenizer
from workers.common.policy_step import (
    ConservativeReward, PolicyModels, ScoredRollout, check_inputs, check_policy_config, checkpointed,
    conservative_reward, finish, finished_result, last_metrics, load_models, log_progress, policy_metrics,
    prompt_order, resume_state, sample_uniforms, save_policy, setup_machine, this_run,
)
from workers.common.rollout import (
    Rollout,
    encode_prompts,
    entropy_of,
    pm_member_scores,
    pm_scores,
    reference_logprobs,
    response_logprobs,
)
from workers.common.runtime import autocast, progress, seed_everything
from workers.rl.advantages import masked_mean
from workers.rl.group import grpo_advantages, rloo_advantages
from workers.rl.losses import GRPOStats, grpo_loss

STEP = "rloo"
RUN_ONLY_FIELDS = {"output_dir", "max_rollouts_this_run", "progress", "num_threads", "checkpoint_every", "device"}
"""config fields that do not change what a run computes (a resume or a re-run may change them)"""

Estimator = Literal["rloo", "grpo", "dr_grpo"]
ZERO_SPREAD = 1e-6
"""a group whose rewards span less than this gives (next to) no signal: counted in rloo/zero_std_groups"""


@dataclass(frozen=True)
class RLOOConfig:
    """Config of the rloo step."""

    policy_path: str
    """the policy to start from (the deployed policy, or the initial one): a Hugging Face causal LM directory"""
    reference_path: str
    """the frozen reference policy of the KL term (the initial policy)"""
    pm_path: str
    """the preference model that scores responses (the train PM)"""
    prompts_path: str
    """prompt set JSONL, one {"id", "prompt"} a line"""
    output_dir: str
    """where the trained policy (policy/), metrics, summary, checkpoints and the config go"""
    test_pm_path: str | None = None
    """a held-out PM scored alongside (metrics only), to see over-optimisation"""
    estimator: Estimator = "rloo"
    """the group baseline: rloo (leave-one-out), grpo (group mean and std) or dr_grpo (group mean only)"""
    total_episodes: int = 256
    """responses to train on in all (a multiple of prompts_per_rollout * k)"""
    prompts_per_rollout: int = 4
    """prompts per rollout; each gets k responses"""
    k: int = 4
    """responses sampled per prompt (>= 2: each one's baseline is the others of its group)"""
    mini_batch_size: int = 16
    """responses per optimiser step (prompts_per_rollout * k must be a multiple)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per mini-batch (mini_batch_size must be a multiple)"""
    epochs: int = 1
    """passes over each rollout (1 with one mini-batch: on-policy REINFORCE with the group baseline)"""
    response_length: int = 32
    """longest response in tokens (EOS included)"""
    max_prompt_tokens: int | None = None
    """keep only the last this-many prompt tokens; None: prompts must fit as they are"""
    temperature: float = 1.0
    """sampling temperature of rollouts (log-probs are taken at this temperature)"""
    kl_coef: float = 0.05
    """beta, the weight of KL(policy || reference): in the reward or in the loss (see kl_in_reward)"""
    kl_in_reward: bool = True
    """True: reward = score - beta * summed k1 KL, before the baseline (RLOO); False: advantages from the
    scores alone and beta * per-token k3 KL in the loss (GRPO)"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient (epsilon)"""
    missing_eos_penalty: float | None = None
    """subtracted from the PM score of a response that ran out of tokens before EOS"""
    ensemble_penalty: float = 0.0
    """lambda of the conservative reward for an ensemble PM: the members' mean score minus lambda times their
    standard deviation (Coste et al. 2023, uncertainty-weighted optimisation; 0: the mean)"""
    learning_rate: float = 1e-5
    """AdamW learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    lora_r: int = 0
    """LoRA rank (0: train every weight); with LoRA the reference is the adapter switched off"""
    lora_alpha: int = 16
    """LoRA alpha"""
    lora_dropout: float = 0.0
    """LoRA dropout"""
    pm_batch_size: int = 32
    """responses per PM forward pass"""
    checkpoint_every: int = 1
    """write a checkpoint every this many rollouts (and when a run stops early)"""
    max_rollouts_this_run: int | None = None
    """stop after this many rollouts in this invocation; a re-run resumes after them"""
    seed: int = 0
    """seed of prompt order, sampling, mini-batch order and LoRA's initialisation"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N"""
    dtype: str = "auto"
    """compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16. Trained weights (the policy,
    or its LoRA adapters) stay float32 and are saved so; the frozen reference, PMs and a LoRA policy's base
    weights are held in this dtype"""
    num_threads: int | None = None
    """torch CPU threads (None: torch's default)"""
    progress: bool = True
    """show a progress bar on stderr"""

    @property
    def rollout_batch_size(self) -> int:
        """Responses per rollout."""
        return self.prompts_per_rollout * self.k

    def validate(self) -> None:
        """Raise ConfigError naming the offending values."""
        for name in ("total_episodes", "prompts_per_rollout", "mini_batch_size", "gradient_accumulation_steps",
                     "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.k < 2:
            raise ConfigError(f"k ({self.k}) must be >= 2: a response's baseline is the other responses to its prompt")
        if self.estimator not in ("rloo", "grpo", "dr_grpo"):
            raise ConfigError(f"estimator ({self.estimator!r}) must be one of rloo, grpo, dr_grpo")
        if self.total_episodes % self.rollout_batch_size:
            raise ConfigError(
                f"total_episodes ({self.total_episodes}) must be a multiple of prompts_per_rollout * k "
                f"({self.prompts_per_rollout} * {self.k} = {self.rollout_batch_size})"
            )
        if self.rollout_batch_size % self.mini_batch_size:
            raise ConfigError(
                f"prompts_per_rollout * k ({self.rollout_batch_size}) must be divisible by "
                f"mini_batch_size ({self.mini_batch_size})"
            )
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ConfigError(
                f"mini_batch_size ({self.mini_batch_size}) must be divisible by "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps})"
            )
        if not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm ({self.max_grad_norm}) must be > 0")
        if not self.clip_coef > 0:
            raise ConfigError(f"clip_coef ({self.clip_coef}) must be > 0")
        for name in ("kl_coef", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 0")
        for name in ("max_rollouts_this_run", "max_prompt_tokens", "num_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} ({value}) must be >= 1 or null")
        check_policy_config(self)


def _logits(lm: torch.nn.Module, rollout: Rollout, idx: torch.Tensor | None = None) -> torch.Tensor:
    """The policy's logits [b, p + r, vocab] over the rollout's rows ``idx`` (all when None)."""
    ids, attention, positions = rollout.query_responses, rollout.attention_mask, rollout.position_ids
    if idx is not None:
        ids, attention, positions = ids[idx], attention[idx], positions[idx]
    out = lm(input_ids=ids, attention_mask=causal_mask_4d(attention, lm), position_ids=positions, use_cache=False)
    return out.logits


def _score_rollout(models: PolicyModels, rollout: Rollout, prompts: Sequence[Sequence[int]],
                   responses: Sequence[Sequence[int]], cfg: RLOOConfig) -> ScoredRollout:
    """The policy's log-probs and entropy, the reference's log-probs and the PMs' scores of a rollout (called
    under no_grad and autocast)."""
    ctx, mask = rollout.context_length, rollout.response_mask
    logits = _logits(models.policy, rollout)
    logprobs = response_logprobs(logits, rollout.query_responses, ctx, cfg.temperature)
    entropy = masked_mean(entropy_of(logits, ctx, cfg.response_length, cfg.temperature), mask)
    del logits
    ref_logprobs = reference_logprobs(models.policy, models.reference, rollout, cfg.temperature)
    members = pm_member_scores(models.pm, prompts, responses, cfg.pm_batch_size)
    test_scores = pm_scores(models.test_pm, prompts, responses, cfg.pm_batch_size) if models.test_pm else None
    return ScoredRollout(logprobs, ref_logprobs, entropy, members, test_scores)


class GroupAdvantages(NamedTuple):
    """The advantages of a rollout's b = prompts_per_rollout * k responses against their groups' baselines."""

    kl: torch.Tensor
    """each response's KL to the reference, the k1 log ratio summed over its tokens, shape [b]"""
    advantages: torch.Tensor
    """one per response, shared by its tokens, shape [b]"""
    zero_spread: torch.Tensor
    """the groups whose rewards span less than ZERO_SPREAD, shape [prompts_per_rollout] (bool)"""


def group_advantages(rewards: torch.Tensor, estimator: Estimator) -> torch.Tensor:
    """Advantages [b, k] of rewards [b, k] (k responses to each of b prompts) against their group's baseline."""
    if estimator == "rloo":
        return rloo_advantages(rewards)
    return grpo_advantages(rewards, scale=estimator == "grpo")


def rollout_advantages(reward: torch.Tensor, scored: ScoredRollout, mask: torch.Tensor,
                       cfg: RLOOConfig) -> GroupAdvantages:
    """Sequence rewards [b] (``kl_coef`` times the summed k1 KL subtracted with ``kl_in_reward``) and their
    advantages against each prompt's group; ``mask`` [b, r] marks the response tokens."""
    # The KL of a response is its summed k1 log ratio (Schulman 2020); RLOO subtracts beta times it from the
    # reward (Ahmadian et al. 2024).
    kl = ((scored.logprobs - scored.ref_logprobs) * mask).sum(1)
    rewards = reward - cfg.kl_coef * kl if cfg.kl_in_reward else reward
    groups = rewards.view(cfg.prompts_per_rollout, cfg.k)
    advantages = group_advantages(groups, cfg.estimator).reshape(cfg.rollout_batch_size)
    zero_spread = (groups.max(1).values - groups.min(1).values) < ZERO_SPREAD
    return GroupAdvantages(kl, advantages, zero_spread)


def _update(policy: torch.nn.Module, optimizer: torch.optim.Optimizer, trainable: list[torch.nn.Parameter],
            rollout: Rollout, scored: ScoredRollout, advantages: torch.Tensor, *, rollout_idx: int, cfg: RLOOConfig,
            device: torch.device, compute_dtype: torch.dtype) -> list[GRPOStats]:
    """``epochs`` passes of clipped mini-batch updates on a rollout, each pass in an order seeded by
    (seed, rollout, epoch) so a resumed run takes the same steps; the stats of every micro-batch."""
    num_mini_batches = cfg.rollout_batch_size // cfg.mini_batch_size
    micro_batch_size = cfg.mini_batch_size // cfg.gradient_accumulation_steps
    loss_kl_coef = 0.0 if cfg.kl_in_reward else cfg.kl_coef
    ctx, mask = rollout.context_length, rollout.response_mask
    stats: list[GRPOStats] = []
    for epoch in range(cfg.epochs):
        generator = torch.Generator().manual_seed(row_seed(cfg.seed, "rloo-minibatch", rollout_idx, epoch))
        perm = torch.randperm(cfg.rollout_batch_size, generator=generator)
        for m in range(num_mini_batches):
            mini = perm[m * cfg.mini_batch_size : (m + 1) * cfg.mini_batch_size]
            optimizer.zero_grad(set_to_none=True)
            for a in range(cfg.gradient_accumulation_steps):
                idx = mini[a * micro_batch_size : (a + 1) * micro_batch_size].to(device)
                with autocast(device, compute_dtype):  # forward and loss; backward outside, as autocast asks
                    new_logits = _logits(policy, rollout, idx)
                    new_logprobs = response_logprobs(new_logits, rollout.query_responses[idx], ctx, cfg.temperature)
                    loss, loss_stats = grpo_loss(
                        logprobs=new_logprobs, old_logprobs=scored.logprobs[idx], ref_logprobs=scored.ref_logprobs[idx],
                        advantages=advantages[idx], mask=mask[idx], clip_coef=cfg.clip_coef, kl_coef=loss_kl_coef,
                    )
                (loss / cfg.gradient_accumulation_steps).backward()
                stats.append(loss_stats)
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
    return stats


def _rollout_metrics(scored: ScoredRollout, scores: ConservativeReward, advantages: GroupAdvantages,
                     ended: torch.Tensor, mask: torch.Tensor, stats: list[GRPOStats], *, episodes: int,
                     episodes_per_s: float) -> dict[str, Any]:
    """The metrics line of a rollout: the rloo/* keys, the losses and the common policy/* keys."""
    mean_kl = float(advantages.kl.mean())
    record = {
        "rloo/reward": float(scores.mean.mean()),
        "rloo/reward_spread": float(scores.spread.mean()),
        "rloo/reward_conservative": float(scores.conservative.mean()),
        "rloo/kl": mean_kl,
        "rloo/advantage_std": float(advantages.advantages.std(unbiased=False)),
        "rloo/zero_std_groups": float(advantages.zero_spread.float().mean()),
        "rloo/entropy": float(scored.entropy),
        "rloo/eos_fraction": float(ended.float().mean()),
        "rloo/response_length": float(mask.sum(1).mean()),
        "losses/policy": float(torch.stack([s.policy_loss for s in stats]).mean()),
        # the per-token k3 KL to the reference; in the loss (times kl_coef) only when kl_in_reward is False
        "losses/kl": float(torch.stack([s.kl for s in stats]).mean()),
        "rloo/approx_kl": float(torch.stack([s.approx_kl for s in stats]).mean()),
        "rloo/clipfrac": float(torch.stack([s.clipfrac for s in stats]).mean()),
        "rloo/episodes": episodes,
        "charts/episodes_per_s": episodes_per_s,
        **policy_metrics(scores, mean_kl, episodes, scored.test_scores),
    }
    if scored.test_scores is not None:
        record["rloo/reward_test_pm"] = record["policy/reward_test_pm"]
    return record


def run(cfg: RLOOConfig) -> StepResult:
    """Train the policy with RLOO or GRPO; resumes from the newest checkpoint under output_dir."""
    refuse_distributed(STEP)  # one process only: see workers.common.distributed
    cfg.validate()
    # 0. Setup: derived sizes, device, models, data.
    batch_size = cfg.rollout_batch_size
    num_rollouts = cfg.total_episodes // batch_size
    out = Path(cfg.output_dir)
    final_dir = out / "policy"
    if (done := finished_result(STEP, cfg, RUN_ONLY_FIELDS)) is not None:
        return done
    check_inputs(cfg)
    device, compute_dtype = setup_machine(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, step=STEP)

    tokenizer = load_tokenizer(cfg.policy_path)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_ids = encode_prompts(tokenizer, load_prompts(cfg.prompts_path), max_prompt_tokens=cfg.max_prompt_tokens)
    seed_everything(cfg.seed)  # LoRA's adapter initialisation draws from the global generator
    models = load_models(cfg, device, compute_dtype, lora_dropout=cfg.lora_dropout)
    policy = models.policy
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, eps=1e-5)

    checkpoints = out / "checkpoints"
    start_rollout = resume_state(checkpoints, cfg, RUN_ONLY_FIELDS, model=policy, optimizer=optimizer).get("rollout", 0)
    metrics = MetricsWriter(out / "metrics.jsonl")
    metrics.rewind(after_step=start_rollout)

    bar = progress(num_rollouts, desc=STEP, enabled=cfg.progress, initial=start_rollout, unit="rollout")
    last: dict[str, Any] = {}
    rollouts = this_run(start_rollout, num_rollouts, cfg.max_rollouts_this_run)
    for rollout_idx in rollouts:
        started = time.perf_counter()
        policy.eval()
        # 1. k responses to each prompt, grouped by prompt (row j * k + s is sample s of prompt slot j);
        #    every token's random number comes from (seed, rollout, prompt slot, sample).
        order = prompt_order(len(prompt_ids), cfg.seed, rollout_idx * cfg.prompts_per_rollout, cfg.prompts_per_rollout)
        batch_prompts = [prompt_ids[i] for i in order for _ in range(cfg.k)]
        uniforms = sample_uniforms(cfg.seed, STEP, rollout_idx, cfg.prompts_per_rollout, cfg.k, cfg.response_length)
        with torch.no_grad(), autocast(device, compute_dtype):
            generations = generate(
                policy, batch_prompts, uniforms=uniforms, max_new_tokens=cfg.response_length,
                temperature=cfg.temperature, top_p=1.0, eos_id=eos_id, pad_id=pad_id,
            )
        responses = [g.tokens for g in generations]
        ended = torch.tensor([g.finish_reason == "eos" for g in generations])
        rollout = Rollout(batch_prompts, responses, response_length=cfg.response_length, pad_id=pad_id).to(device)

        # 2. Log-probs of the policy and of the reference, PM scores; the reward is conservative under an
        #    ensemble, and a response cut off before EOS pays missing_eos_penalty.
        with torch.no_grad(), autocast(device, compute_dtype):
            scored = _score_rollout(models, rollout, batch_prompts, responses, cfg)
        scores = conservative_reward(scored.members, ended, ensemble_penalty=cfg.ensemble_penalty,
                                     missing_eos_penalty=cfg.missing_eos_penalty)

        # 3. Sequence rewards and group advantages.
        advantages = rollout_advantages(scores.reward.to(device), scored, rollout.response_mask, cfg)

        # 4. Epochs of clipped mini-batch updates on the rollout (no value function).
        policy.train()
        disable_dropout(policy)
        stats = _update(policy, optimizer, trainable, rollout, scored, advantages.advantages, rollout_idx=rollout_idx,
                        cfg=cfg, device=device, compute_dtype=compute_dtype)

        # 5. Metrics (namespaced, as cleanrl; policy/* are the keys every sampling method reports) and a checkpoint.
        elapsed = time.perf_counter() - started
        last = _rollout_metrics(scored, scores, advantages, ended, rollout.response_mask, stats,
                                episodes=(rollout_idx + 1) * batch_size, episodes_per_s=batch_size / elapsed)
        log_progress(metrics, bar, rollout_idx + 1, last)
        last_of_run = rollout_idx + 1 == rollouts.stop  # a run stopped by max_rollouts_this_run resumes from here
        if (rollout_idx + 1) % cfg.checkpoint_every == 0 or rollout_idx + 1 == num_rollouts or last_of_run:
            save_checkpoint(
                checkpoints, rollout_idx + 1, model=policy, optimizer=optimizer,
                state={"rollout": rollout_idx + 1, "config": to_dict(cfg)},
            )
    bar.close()
    if checkpointed(checkpoints) < num_rollouts:
        return collect_result(STEP, out, {}, last, complete=False)

    # 6. Save the policy as an ordinary Hugging Face directory in float32 (LoRA merged), then the summary.
    save_policy(policy, tokenizer, final_dir, lora=bool(cfg.lora_r))
    return finish(STEP, cfg, {**last_metrics(out), "rloo/rollouts": num_rollouts})


def main(argv: Sequence[str] | None = None) -> int:
    return cli(RLOOConfig, run, argv, prog="workers.rloo", description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
