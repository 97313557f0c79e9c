"""The clipped PPO objective and the clipped value loss."""

from __future__ import annotations

import torch

from workers.rl.advantages import masked_mean
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
) -> tuple[torch.Tensor, PPOStats]:
    """PPO-clip (Schulman et al. 2017, eq. 7) plus a clipped value loss.

    All tensors are [b, r] over response tokens; ``mask`` selects real ones.
    pg_loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), token mean;
    v_loss = 0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped within
    ``value_clip`` of the rollout's value. Returns (loss, detached stats),
    loss = pg_loss + vf_coef * v_loss.
    """
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    policy_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)

    v_clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    v_loss1 = (values - returns) ** 2
    v_loss2 = (v_clipped - returns) ** 2
    value_loss = 0.5 * masked_mean(torch.max(v_loss1, v_loss2), mask)

    loss = policy_loss + vf_coef * value_loss
    with torch.no_grad():
        stats = PPOStats(
            policy_loss=policy_loss.detach(),
            value_loss=value_loss.detach(),
            approx_kl=masked_mean((ratio - 1) - logratio, mask),
            clipfrac=masked_mean((pg_loss2 > pg_loss1).float(), mask),
            value_clipfrac=masked_mean((v_loss2 > v_loss1).float(), mask),
            ratio_mean=masked_mean(ratio, mask),
        )
    return loss, stats
