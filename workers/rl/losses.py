"""The clipped PPO objective and the clipped value loss; GRPO's critic-free clipped objective."""

from __future__ import annotations

from typing import NamedTuple

import torch

from workers.rl.advantages import masked_mean
from workers.rl.kl import kl_estimate
from workers.rl.types import PPOStats


def ppo_loss(
    *,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_coef: float = 0.2,
    value_clip: float = 0.2,
    vf_coef: float = 0.1,
    token_count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PPOStats]:
    """PPO-clip (Schulman et al. 2017, eq. 7) plus a clipped value loss.

    All tensors are [b, r] over response tokens; ``mask`` selects real ones.
    pg_loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), token mean;
    v_loss = 0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped within
    ``value_clip`` of the rollout's value. Returns (loss, detached stats),
    loss = pg_loss + vf_coef * v_loss.

    ``token_count`` is what the token means divide by (None: ``mask.sum()``). A data-parallel process,
    holding a share of the micro-batch, passes the whole micro-batch's count over the number of
    processes: the average of the processes' gradients (and of their stats) is then one process's.
    """
    def mean(x: torch.Tensor) -> torch.Tensor:
        if token_count is None:
            return masked_mean(x, mask)
        return (x * mask.to(x.dtype)).sum() / token_count

    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    policy_loss = mean(torch.max(pg_loss1, pg_loss2))

    v_clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    v_loss1 = (values - returns) ** 2
    v_loss2 = (v_clipped - returns) ** 2
    value_loss = 0.5 * mean(torch.max(v_loss1, v_loss2))

    loss = policy_loss + vf_coef * value_loss
    with torch.no_grad():
        stats = PPOStats(
            policy_loss=policy_loss.detach(),
            value_loss=value_loss.detach(),
            approx_kl=mean((ratio - 1) - logratio),
            clipfrac=mean((pg_loss2 > pg_loss1).float()),
            value_clipfrac=mean((v_loss2 > v_loss1).float()),
            ratio_mean=mean(ratio),
        )
    return loss, stats


class GRPOStats(NamedTuple):
    """Detached diagnostics of one ``grpo_loss`` evaluation (scalars)."""

    policy_loss: torch.Tensor
    """the clipped surrogate alone, per-sequence token mean then batch mean"""
    kl: torch.Tensor
    """the k3 estimate of KL(policy || reference) per token, aggregated as the loss (before kl_coef)"""
    approx_kl: torch.Tensor
    """E[(ratio - 1) - log ratio] over tokens, the k3 estimate of KL(old || new)"""
    clipfrac: torch.Tensor
    """fraction of tokens whose ratio was clipped"""
    ratio_mean: torch.Tensor


def grpo_loss(
    *,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_coef: float = 0.2,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, GRPOStats]:
    """The critic-free clipped objective of GRPO (Shao et al. 2024, DeepSeekMath eq. 3), negated.

    ``logprobs``, ``old_logprobs`` (the rollout's) and ``ref_logprobs`` are
    [b, r] over response tokens, ``mask`` selects real ones; ``advantages`` is
    [b], one per response, shared by its tokens. Per token
    pg = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) and
    kl = k3(policy, reference) = exp(ref - logp) - (ref - logp) - 1; the loss
    is 1/b * sum_i 1/|o_i| * sum_t (pg + kl_coef * kl): each response's token
    mean, then the mean over responses, so a long response weighs as much as a
    short one. ``kl_coef = 0`` is RLOO's update with the KL left in the reward
    (Ahmadian et al. 2024). Returns (loss, detached stats).
    """
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    adv = advantages[:, None]
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    pg_tokens = torch.max(pg_loss1, pg_loss2)
    kl_tokens = kl_estimate(logprobs, ref_logprobs, "k3")
    policy_loss = masked_mean(pg_tokens, mask, dim=1).mean()
    kl = masked_mean(kl_tokens, mask, dim=1).mean()
    loss = policy_loss + kl_coef * kl
    with torch.no_grad():
        stats = GRPOStats(
            policy_loss=policy_loss.detach(),
            kl=kl.detach(),
            approx_kl=masked_mean((ratio - 1) - logratio, mask),
            clipfrac=masked_mean((pg_loss2 > pg_loss1).float(), mask),
            ratio_mean=masked_mean(ratio, mask),
        )
    return loss, stats
