"""Masked statistics, whitening, and generalised advantage estimation."""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (over all, or along ``dim``)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` where ``mask`` is 1 (Bessel-corrected by default)."""
    mean = masked_mean(values, mask)
    centred = (values - mean) ** 2
    var = masked_mean(centred, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"unbiased variance needs at least 2 unmasked values, got {int(n)}")
        var = var * n / (n - 1)
    return var


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / std over the unmasked entries; masked entries become 0.

    ``shift_mean=False`` only rescales (used for rewards, so their sign survives).
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016).

    delta_t = r_t + gamma * V_{t+1} - V_t, with V = 0 past the last response
    token; A_t = delta_t + gamma * lam * A_{t+1}. Returns (advantages, returns)
    with returns = advantages + values. Shapes: [b, r] in, [b, r] out; masked
    positions are 0.
    """
    mask = response_mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    length = rewards.shape[1]
    next_advantage = torch.zeros_like(rewards[:, 0])
    reversed_adv = []
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        reversed_adv.append(next_advantage)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages, (advantages + values) * mask
