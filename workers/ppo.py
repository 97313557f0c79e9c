"""PPO against a preference model, with a per-token KL penalty to a reference policy.

    python -m workers.ppo --config ppo.json [key=value ...]

One rollout is: sample responses to a batch of prompts with the policy, score
them with the PM at EOS, penalise every token by beta * KL(policy || reference)
(Bai et al. 2022 use r_PM - beta * KL with beta = 0.001), estimate advantages
with GAE, then run several epochs of clipped-PPO mini-batch updates. The math
lives in ``workers.rl``; this file is the loop, read top to bottom.

With an ensemble PM (``workers.train_pm`` ``ensemble_size``) the reward is
conservative: the members' mean minus ``ensemble_penalty`` times their
standard deviation, so responses the members disagree on (where the PM has
seen no data) pay less (Coste et al. 2023).

The value function is a linear head on the policy's last hidden state
(``value_model="head"``: one forward pass per mini-batch) or a separate critic
trunk initialised from the PM's trunk (``value_model="critic"``, as TRL does).
With ``lora_r > 0`` only LoRA adapters train and the reference policy is the
same network with its adapters switched off, so no second copy is held; the
saved policy has the adapters merged, an ordinary Hugging Face directory.

Checkpoints (policy, value head, optimizer, KL coefficient, data position) are
written every ``checkpoint_every`` rollouts; every random draw is seeded from
(seed, rollout, ...), so a killed and resumed run computes the same losses as
an uninterrupted one.

Under ``torchrun --nproc_per_node N -m workers.ppo`` (DDP, or FSDP2 without
LoRA; see ``workers.common.distributed``) each process samples and scores an
equal share of every rollout (its rows' random numbers are the rows' own, so
the responses are those one process would sample); the shares are gathered,
so every process computes the same rewards, advantages and whitening, and
each trains on its share of every micro-batch, normalised by the whole
micro-batch's token count. The result is one process's run, within float
rounding. The frozen reference and PMs are held whole by every process.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from workers.common.checkpoint import save_checkpoint
from workers.common.config import ConfigError, cli, save_config, to_dict
from workers.common.data import load_prompts
from workers.common.distributed import (
    World, accumulate, check_divisible, check_strategy, gathered, gathered_state, init_world,
    launched_world_size, on_main, shutdown, wrap,
)
from workers.common.generation import generate, row_seed, row_uniforms
from workers.common.metrics import MetricsWriter, StepResult, collect_result
from workers.common.modeling import causal_mask_4d, disable_dropout, load_tokenizer, load_trunk, save_model_dir
from workers.common.policy_step import (
    ConservativeReward, PolicyModels, ScoredRollout, check_inputs, check_policy_config, checkpointed,
    conservative_reward, finish, finished_result, last_metrics, load_models, log_progress, policy_metrics,
    prompt_order, resume_state, save_policy, this_run,
)
from workers.common.rollout import (
    Rollout,
    encode_prompts,
    entropy_of,
    pm_member_scores,
    pm_scores,
    reference_logprobs,
    response_logprobs,
    sample_with_kl,
)
from workers.common.runtime import autocast, progress, resolve_dtype, seed_everything, set_threads
from workers.rl.advantages import gae, masked_mean, masked_var, whiten
from workers.rl.kl import AdaptiveKLController, FixedKLController, kl_estimate, penalised_rewards, sqrt_kl
from workers.rl.losses import ppo_loss
from workers.rl.types import PPOStats

STEP = "ppo"
RUN_ONLY_FIELDS = {"output_dir", "max_rollouts_this_run", "progress", "num_threads", "checkpoint_every", "device"}
"""config fields that do not change what a run computes (a resume or a re-run may change them)"""


@dataclass(frozen=True)
class PPOConfig:
    """Config of the PPO step."""

    policy_path: str
    """the policy to start from (the deployed policy, or the initial one): a Hugging Face causal LM directory"""
    reference_path: str
    """the frozen reference policy of the KL penalty (the initial policy, as in the paper)"""
    pm_path: str
    """the preference model that scores responses (the train PM)"""
    prompts_path: str
    """prompt set JSONL, one {"id", "prompt"} a line"""
    output_dir: str
    """where the trained policy (policy/), metrics, summary, checkpoints and the config go"""
    test_pm_path: str | None = None
    """a held-out PM scored alongside (metrics only), to see over-optimisation"""
    total_episodes: int = 256
    """responses to train on in all (a multiple of rollout_batch_size)"""
    rollout_batch_size: int = 16
    """responses sampled per rollout"""
    mini_batch_size: int = 8
    """responses per optimiser step (rollout_batch_size must be a multiple)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per mini-batch (mini_batch_size must be a multiple)"""
    ppo_epochs: int = 4
    """passes over each rollout"""
    response_length: int = 32
    """longest response in tokens (EOS included)"""
    max_prompt_tokens: int | None = None
    """keep only the last this-many prompt tokens; None: prompts must fit as they are"""
    temperature: float = 1.0
    """sampling temperature of rollouts (log-probs are taken at this temperature)"""
    kl_coef: float = 0.001
    """beta, the KL penalty coefficient (the start value when kl_target is set)"""
    kl_estimator: str = "k1"
    """per-token KL estimator: k1 (log ratio) or k3 (always >= 0)"""
    kl_target: float | None = None
    """adaptive KL: steer beta so the per-response KL approaches this (None: fixed beta)"""
    kl_horizon: int = 10_000
    """episodes over which the adaptive controller moves beta"""
    gamma: float = 1.0
    """discount over response tokens"""
    lam: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient (epsilon)"""
    value_clip: float = 0.2
    """how far a value may move from its rollout estimate before its loss is clipped"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    whiten_rewards: bool = False
    """scale per-token rewards to unit variance before GAE"""
    missing_eos_penalty: float | None = None
    """subtracted from the PM score of a response that ran out of tokens before EOS"""
    ensemble_penalty: float = 0.0
    """lambda of the conservative reward for an ensemble PM: the members' mean score minus lambda times their
    standard deviation (Coste et al. 2023, uncertainty-weighted optimisation; 0: the mean)"""
    value_model: str = "head"
    """head: a value head on the policy; critic: a separate trunk initialised from the PM's"""
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
    eval_prompts_path: str | None = None
    """held-out prompts scored every eval_every rollouts with fixed random numbers (a smooth reward-vs-KL curve)"""
    eval_every: int = 0
    """rollouts between evaluations on eval_prompts_path (0: never)"""
    checkpoint_every: int = 1
    """write a checkpoint every this many rollouts"""
    max_rollouts_this_run: int | None = None
    """stop after this many rollouts in this invocation; a re-run resumes after them"""
    seed: int = 0
    """seed of sampling, mini-batch order and the value head's initialisation"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N (under torchrun: auto, cuda or cpu; each process takes
    cuda:LOCAL_RANK)"""
    dtype: str = "auto"
    """compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16. Trained weights (the policy,
    or its LoRA adapters, and the value function) stay float32 and are saved so; the frozen reference, PMs and a
    LoRA policy's base weights are held in this dtype"""
    parallel: str = "ddp"
    """under torchrun: ddp (each process holds the policy) or fsdp (FSDP2: the policy and value function's
    parameters, gradients and optimizer state sharded over the processes, gathered whole while sampling; not
    with LoRA); one process ignores it"""
    num_threads: int | None = None
    """torch CPU threads (None: torch's default)"""
    progress: bool = True
    """show a progress bar on stderr"""

    def validate(self) -> None:
        """Raise ConfigError naming the offending values."""
        for name in ("total_episodes", "rollout_batch_size", "mini_batch_size", "gradient_accumulation_steps",
                     "ppo_epochs", "kl_horizon"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.total_episodes % self.rollout_batch_size:
            raise ConfigError(
                f"total_episodes ({self.total_episodes}) must be a multiple of rollout_batch_size ({self.rollout_batch_size})"
            )
        if self.rollout_batch_size % self.mini_batch_size:
            raise ConfigError(
                f"rollout_batch_size ({self.rollout_batch_size}) must be divisible by mini_batch_size ({self.mini_batch_size})"
            )
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ConfigError(
                f"mini_batch_size ({self.mini_batch_size}) must be divisible by "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps})"
            )
        if self.rollout_batch_size < 2:
            raise ConfigError(f"rollout_batch_size ({self.rollout_batch_size}) must be >= 2 to whiten advantages")
        if self.kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"kl_estimator ({self.kl_estimator!r}) must be k1 or k3")
        if self.value_model not in ("head", "critic"):
            raise ConfigError(f"value_model ({self.value_model!r}) must be head or critic")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef ({self.kl_coef}) must be >= 0")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ConfigError(f"kl_target ({self.kl_target}) must be > 0 or null")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError(f"gamma ({self.gamma}) and lam ({self.lam}) must be in [0, 1]")
        if self.eval_every < 0 or (self.eval_every and not self.eval_prompts_path):
            raise ConfigError(f"eval_every ({self.eval_every}) must be >= 0 and needs eval_prompts_path")
        if self.max_rollouts_this_run is not None and self.max_rollouts_this_run < 1:
            raise ConfigError(f"max_rollouts_this_run ({self.max_rollouts_this_run}) must be >= 1 or null")
        check_policy_config(self)
        check_strategy(self.parallel)
        if (world_size := launched_world_size()) > 1:
            check_divisible("rollout_batch_size", self.rollout_batch_size, world_size)
            check_divisible("mini_batch_size / gradient_accumulation_steps",
                            self.mini_batch_size // self.gradient_accumulation_steps, world_size)
            if self.parallel == "fsdp" and self.lora_r:
                raise ConfigError(
                    f"parallel fsdp with LoRA (lora_r={self.lora_r}) is not supported: FSDP2 shards float32 adapters "
                    "and frozen base weights of another dtype in one unit; use parallel ddp (the adapters are small, "
                    "each process holds the frozen base)"
                )


class PolicyWithValue(nn.Module):
    """The policy LM and its value function (a head on its trunk, or a separate critic)."""

    def __init__(self, lm: nn.Module, value_head: nn.Linear, critic: nn.Module | None = None):
        super().__init__()
        self.lm = lm
        self.value_head = value_head
        self.critic = critic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        """(logits [b, n, vocab], values [b, n]) of every position; ``attention_mask`` is 2-D [b, n]."""
        full = causal_mask_4d(attention_mask, self.lm)
        critic_mask = causal_mask_4d(attention_mask, self.critic) if self.critic is not None else None
        attention_mask = full
        out = self.lm(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            output_hidden_states=self.critic is None, use_cache=False,
        )
        if self.critic is None:
            hidden = out.hidden_states[-1]
        else:
            hidden = self.critic(
                input_ids=input_ids, attention_mask=critic_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        return out.logits, self.value_head(hidden).squeeze(-1).float()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over real tokens (1 is perfect, <= 0 is no better than a constant)."""
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns <= 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask, unbiased=False) / var_returns)


def _with_value_function(lm: nn.Module, cfg: PPOConfig, device: torch.device) -> PolicyWithValue:
    """The policy LM (``load_models``) with its value function, a head on its trunk or on a critic trunk
    initialised from the PM's; the value function's weights are float32, as every trained weight."""
    critic = None
    if cfg.value_model == "critic":
        critic = load_trunk(cfg.pm_path, device=device, dtype=torch.float32)
        disable_dropout(critic)
    hidden = (critic.config if critic is not None else lm.config).hidden_size
    head = nn.Linear(hidden, 1, device=device, dtype=torch.float32)
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        # A small random head (std 1/sqrt(h+1), as TRL's value head) and zero bias: values start near 0.
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) / math.sqrt(hidden + 1))
        head.bias.zero_()
    return PolicyWithValue(lm, head, critic)


@torch.no_grad()
def evaluate_policy(model: PolicyWithValue, reference, pm, test_pm, prompts: Sequence[list[int]], cfg: PPOConfig,
                    eos_id: int, pad_id: int) -> dict[str, float]:
    """Mean PM score and KL(policy || reference) per response on fixed prompts and fixed random numbers."""
    was_training = model.training
    model.eval()
    uniforms = torch.stack([row_uniforms(row_seed(cfg.seed, "ppo-eval", i, 0), cfg.response_length) for i in range(len(prompts))])
    responses, kls = sample_with_kl(
        model.lm, reference, prompts, uniforms=uniforms, max_new_tokens=cfg.response_length,
        temperature=cfg.temperature, eos_id=eos_id, pad_id=pad_id,
    )
    kl = float(kls.mean())
    out = {"eval/reward": float(pm_scores(pm, prompts, responses, cfg.pm_batch_size).mean()),
           "eval/kl": kl, "eval/sqrt_kl": sqrt_kl(kl)}
    if test_pm is not None:
        out["eval/reward_test_pm"] = float(pm_scores(test_pm, prompts, responses, cfg.pm_batch_size).mean())
    model.train(was_training)
    return out


def _kl_controller(cfg: PPOConfig) -> FixedKLController | AdaptiveKLController:
    """beta: fixed, or steered toward kl_target over kl_horizon episodes."""
    if cfg.kl_target is None:
        return FixedKLController(cfg.kl_coef)
    return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)


class SampledRollout(NamedTuple):
    """A rollout's b responses, gathered from every process, and this process's share of its rows."""

    rollout: Rollout
    """every row: query_responses [b, p + r], response_mask [b, r]"""
    ended: torch.Tensor
    """whether each response ended with EOS, shape [b] (bool)"""
    own: Rollout
    """this process's rows (the rollout itself in one process)"""
    own_prompts: list[list[int]]
    """this process's rows' prompt tokens"""
    own_responses: list[list[int]]
    """this process's rows' response tokens"""


def _sample_rollout(model: PolicyWithValue, prompts: list[list[int]], k: int, cfg: PPOConfig, world: World, *,
                    device: torch.device, compute_dtype: torch.dtype, eos_id: int, pad_id: int) -> SampledRollout:
    """Rollout ``k``'s responses to ``prompts``, each process sampling its share of the rows, gathered. Every
    token's random number comes from (seed, rollout, row), so a row's response does not depend on which
    process samples it."""
    share = world.share(cfg.rollout_batch_size)
    uniforms = torch.stack(
        [row_uniforms(row_seed(cfg.seed, "ppo", k, i), cfg.response_length) for i in range(len(prompts))[share]]
    )
    with torch.no_grad(), autocast(device, compute_dtype), gathered(model, world):
        generations = generate(
            model.lm, prompts[share], uniforms=uniforms, max_new_tokens=cfg.response_length,
            temperature=cfg.temperature, top_p=1.0, eos_id=eos_id, pad_id=pad_id,
        )
    own_responses = [g.tokens for g in generations]
    responses = world.gather_lists(own_responses)
    ended = world.gather(torch.tensor([g.finish_reason == "eos" for g in generations]))
    rollout = Rollout(prompts, responses, response_length=cfg.response_length, pad_id=pad_id).to(device)
    own = rollout if not world.distributed else Rollout(
        prompts[share], own_responses, response_length=cfg.response_length, pad_id=pad_id
    ).to(device)
    return SampledRollout(rollout, ended, own, prompts[share], own_responses)


def _score_rollout(model: PolicyWithValue, models: PolicyModels, sampled: SampledRollout, cfg: PPOConfig,
                   world: World) -> tuple[ScoredRollout, torch.Tensor]:
    """The policy's log-probs, entropy and values [b, r], the reference's log-probs and the PMs' scores of a
    rollout: each process scores its share of the rows, gathered, so every process holds the whole rollout's
    (called under no_grad, autocast and ``gathered``)."""
    own, ctx = sampled.own, sampled.own.context_length
    prompts, responses = sampled.own_prompts, sampled.own_responses
    logits, all_values = model(own.query_responses, own.attention_mask, own.position_ids)
    logprobs = world.gather(response_logprobs(logits, own.query_responses, ctx, cfg.temperature))
    values = world.gather(all_values[:, ctx - 1 : ctx - 1 + cfg.response_length])
    mask = sampled.rollout.response_mask
    entropy = masked_mean(world.gather(entropy_of(logits, ctx, cfg.response_length, cfg.temperature)), mask)
    del logits
    ref_logprobs = world.gather(reference_logprobs(model.lm, models.reference, own, cfg.temperature))
    members = world.gather(pm_member_scores(models.pm, prompts, responses, cfg.pm_batch_size).T).T  # [K, b]
    test_scores = (
        world.gather(pm_scores(models.test_pm, prompts, responses, cfg.pm_batch_size)) if models.test_pm else None
    )
    return ScoredRollout(logprobs, ref_logprobs, entropy, members, test_scores), values


def _update(trained: Any, optimizer: torch.optim.Optimizer, trainable: list[nn.Parameter], rollout: Rollout,
            scored: ScoredRollout, values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor, *, k: int,
            cfg: PPOConfig, world: World, device: torch.device, compute_dtype: torch.dtype) -> list[PPOStats]:
    """``ppo_epochs`` passes of clipped-PPO mini-batch updates on rollout ``k``, each pass in an order seeded by
    (seed, rollout, epoch); the loss stats of every micro-batch. ``trained`` is what ``wrap`` returned."""
    num_mini_batches = cfg.rollout_batch_size // cfg.mini_batch_size
    micro_batch_size = cfg.mini_batch_size // cfg.gradient_accumulation_steps
    ctx, mask = rollout.context_length, rollout.response_mask
    stats: list[PPOStats] = []
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(
            cfg.rollout_batch_size, generator=torch.Generator().manual_seed(row_seed(cfg.seed, "minibatch", k, epoch))
        )
        for m in range(num_mini_batches):
            mini = perm[m * cfg.mini_batch_size : (m + 1) * cfg.mini_batch_size]
            optimizer.zero_grad(set_to_none=True)
            for a in range(cfg.gradient_accumulation_steps):
                micro = mini[a * micro_batch_size : (a + 1) * micro_batch_size].to(device)
                idx = micro[world.share(micro_batch_size)]
                token_count = mask[micro].sum().clamp(min=1) / world.size if world.distributed else None
                with accumulate(trained, world, sync=a == cfg.gradient_accumulation_steps - 1):
                    with autocast(device, compute_dtype):  # forward and loss; backward outside, as autocast asks
                        new_logits, new_all_values = trained(
                            rollout.query_responses[idx], rollout.attention_mask[idx], rollout.position_ids[idx]
                        )
                        new_logprobs = response_logprobs(new_logits, rollout.query_responses[idx], ctx,
                                                         cfg.temperature)
                        new_values = new_all_values[:, ctx - 1 : ctx - 1 + cfg.response_length]
                        loss, loss_stats = ppo_loss(
                            logprobs=new_logprobs, old_logprobs=scored.logprobs[idx], advantages=advantages[idx],
                            values=new_values, old_values=values[idx], returns=returns[idx], mask=mask[idx],
                            clip_coef=cfg.clip_coef, value_clip=cfg.value_clip, vf_coef=cfg.vf_coef,
                            token_count=token_count,
                        )
                    (loss / cfg.gradient_accumulation_steps).backward()
                stats.append(loss_stats)
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
    # A process's loss stats are partial means of the whole micro-batch's: their mean over the processes is it.
    return [type(s)(*world.mean(torch.stack(list(s)))) for s in stats] if world.distributed else stats


def _rollout_metrics(sampled: SampledRollout, scored: ScoredRollout, scores: ConservativeReward, kl: torch.Tensor,
                     beta: float, mean_kl: float, stats: list[PPOStats], explained: float, *, episodes: int,
                     episodes_per_s: float) -> dict[str, Any]:
    """The metrics line of a rollout: the ppo/* keys, the losses and the common policy/* keys. ``kl`` [b, r] is
    the per-token estimate the rewards were penalised by, at coefficient ``beta``; ``mean_kl`` the k1 KL summed
    over a response's tokens, averaged over the responses."""
    mask = sampled.rollout.response_mask
    record = {
        "ppo/reward": float(scores.mean.mean()),
        "ppo/reward_spread": float(scores.spread.mean()),
        "ppo/reward_conservative": float(scores.conservative.mean()),
        "ppo/kl": mean_kl,
        "ppo/sqrt_kl": sqrt_kl(mean_kl),
        "ppo/kl_coef": beta,
        "ppo/non_score_reward": float((-beta * kl).sum(1).mean()),
        "ppo/entropy": float(scored.entropy),
        "ppo/eos_fraction": float(sampled.ended.float().mean()),
        "ppo/response_length": float(mask.sum(1).mean()),
        "losses/policy": float(torch.stack([s.policy_loss for s in stats]).mean()),
        "losses/value": float(torch.stack([s.value_loss for s in stats]).mean()),
        "ppo/approx_kl": float(torch.stack([s.approx_kl for s in stats]).mean()),
        "ppo/clipfrac": float(torch.stack([s.clipfrac for s in stats]).mean()),
        "ppo/value_clipfrac": float(torch.stack([s.value_clipfrac for s in stats]).mean()),
        "ppo/explained_variance": explained,
        "ppo/episodes": episodes,
        "charts/episodes_per_s": episodes_per_s,
        **policy_metrics(scores, mean_kl, episodes, scored.test_scores),
    }
    if scored.test_scores is not None:
        record["ppo/reward_test_pm"] = record["policy/reward_test_pm"]
    return record


def run(cfg: PPOConfig) -> StepResult:
    """Train the policy with PPO; resumes from the newest checkpoint under output_dir."""
    cfg.validate()
    if (done := finished_result(STEP, cfg, RUN_ONLY_FIELDS)) is not None:
        return done
    check_inputs(cfg)
    set_threads(cfg.num_threads)
    world, device = init_world(cfg.parallel, cfg.device)
    try:
        return _train(cfg, world, device)
    finally:
        shutdown(world)


def _train(cfg: PPOConfig, world: World, device: torch.device) -> StepResult:
    """The run of one process: its share of every rollout (all of it alone)."""
    # 0. Setup: derived sizes, device, models, data.
    num_rollouts = cfg.total_episodes // cfg.rollout_batch_size
    out = Path(cfg.output_dir)
    compute_dtype = resolve_dtype(cfg.dtype, device)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out, step=STEP)

    tokenizer = load_tokenizer(cfg.policy_path)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_ids = encode_prompts(tokenizer, load_prompts(cfg.prompts_path), max_prompt_tokens=cfg.max_prompt_tokens)
    eval_ids = (
        encode_prompts(tokenizer, load_prompts(cfg.eval_prompts_path), max_prompt_tokens=cfg.max_prompt_tokens)
        if cfg.eval_prompts_path else []
    )
    seed_everything(cfg.seed)  # LoRA's adapter initialisation draws from the global generator
    models = load_models(cfg, device, compute_dtype, lora_dropout=cfg.lora_dropout)
    model = _with_value_function(models.policy, cfg, device)
    trained = wrap(model, world, device, compute_dtype=compute_dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, eps=1e-5)
    kl_ctl = _kl_controller(cfg)

    checkpoints = out / "checkpoints"
    state = resume_state(checkpoints, cfg, RUN_ONLY_FIELDS, model=model, optimizer=optimizer, world=world)
    start_rollout = state.get("rollout", 0)
    kl_ctl.value = state.get("kl_coef", kl_ctl.value)
    metrics = MetricsWriter(out / "metrics.jsonl", enabled=world.main)
    metrics.rewind(after_step=start_rollout)

    bar = progress(num_rollouts, desc="ppo", enabled=cfg.progress and world.main, initial=start_rollout,
                   unit="rollout")
    last: dict[str, Any] = {}
    for k in this_run(start_rollout, num_rollouts, cfg.max_rollouts_this_run):
        # 0. On schedule, score the fixed held-out prompts before this rollout's update.
        evaluation = {}
        if cfg.eval_every and k % cfg.eval_every == 0:
            with autocast(device, compute_dtype), gathered(model, world):
                evaluation = evaluate_policy(model, models.reference, models.pm, models.test_pm, eval_ids, cfg,
                                             eos_id, pad_id)
        started = time.perf_counter()
        model.eval()
        # 1. Sample responses, each process its share of the rows, gathered.
        order = prompt_order(len(prompt_ids), cfg.seed, k * cfg.rollout_batch_size, cfg.rollout_batch_size)
        sampled = _sample_rollout(model, [prompt_ids[i] for i in order], k, cfg, world, device=device,
                                  compute_dtype=compute_dtype, eos_id=eos_id, pad_id=pad_id)
        rollout, mask = sampled.rollout, sampled.rollout.response_mask

        # 2. Log-probs and values of the policy, log-probs of the reference, PM scores: each process its
        #    share of the rows, gathered, so every process holds the whole rollout's. The reward is
        #    conservative under an ensemble, and a response cut off before EOS pays missing_eos_penalty.
        with torch.no_grad(), autocast(device, compute_dtype), gathered(model, world):
            scored, values = _score_rollout(model, models, sampled, cfg, world)
            scores = conservative_reward(scored.members, sampled.ended, ensemble_penalty=cfg.ensemble_penalty,
                                         missing_eos_penalty=cfg.missing_eos_penalty)

            # 3. Per-token rewards: -beta * KL everywhere, the PM score at the last token.
            kl = kl_estimate(scored.logprobs, scored.ref_logprobs, cfg.kl_estimator) * mask
            rewards = penalised_rewards(scores.reward.to(device), kl, mask, kl_ctl.value)
            if cfg.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False)

            # 4. GAE over response tokens (gamma 1 by default), then whitened advantages.
            advantages, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
            advantages = whiten(advantages, mask)

        # 5. Several epochs of clipped-PPO mini-batch updates; each process trains on its share of every
        #    micro-batch, its token means over the whole micro-batch's count (so averaged gradients are one
        #    process's).
        model.train()
        disable_dropout(model)
        stats = _update(trained, optimizer, trainable, rollout, scored, values, advantages, returns, k=k, cfg=cfg,
                        world=world, device=device, compute_dtype=compute_dtype)

        # 6. The KL controller sees this rollout's mean per-response KL.
        mean_kl = float((kl_estimate(scored.logprobs, scored.ref_logprobs, "k1") * mask).sum(1).mean())
        beta = kl_ctl.value
        kl_ctl.update(mean_kl, cfg.rollout_batch_size)

        # 7. Metrics (namespaced, as cleanrl; policy/* are the keys every sampling method reports) and a checkpoint.
        elapsed = time.perf_counter() - started
        last = _rollout_metrics(sampled, scored, scores, kl, beta, mean_kl, stats,
                                explained_variance(values, returns, mask), episodes=(k + 1) * cfg.rollout_batch_size,
                                episodes_per_s=cfg.rollout_batch_size / elapsed)
        last.update(evaluation)
        log_progress(metrics, bar, k + 1, last)
        if (k + 1) % cfg.checkpoint_every == 0 or k + 1 == num_rollouts:
            save_checkpoint(
                checkpoints, k + 1, model=model, optimizer=optimizer,
                state={"rollout": k + 1, "kl_coef": kl_ctl.value, "config": to_dict(cfg)}, world=world,
            )
    bar.close()
    if checkpointed(checkpoints) < num_rollouts:
        return collect_result(STEP, out, {}, last, complete=False)

    # 8. Save the policy as an ordinary Hugging Face directory in float32 (LoRA merged), then the summary
    #    (rank 0; under fsdp every process gathers the weights first).
    return _save_and_finish(model, tokenizer, cfg, world, num_rollouts)


def _save_and_finish(model: PolicyWithValue, tokenizer: PreTrainedTokenizerBase, cfg: PPOConfig, world: World,
                     num_rollouts: int) -> StepResult:
    """The trained policy as an ordinary Hugging Face directory in float32 (LoRA merged), then the summary that
    marks the run finished (rank 0; under fsdp every process gathers the weights first)."""
    out = Path(cfg.output_dir)
    final_dir = out / "policy"
    state = gathered_state(model, world)
    if state is not None:  # rank 0 of a sharded run: the gathered policy, its value head left out
        save_model_dir(model.lm, tokenizer, final_dir,
                       state_dict={k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")})
    elif world.main:
        save_policy(model.lm, tokenizer, final_dir, lora=bool(cfg.lora_r))
    result = on_main(world, lambda: finish(STEP, cfg, {**last_metrics(out), "ppo/rollouts": num_rollouts}))
    return result if result is not None else finished_result(STEP, cfg, RUN_ONLY_FIELDS)


def main(argv: Sequence[str] | None = None) -> int:
    return cli(PPOConfig, run, argv, prog="workers.ppo", description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
