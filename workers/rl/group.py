"""Critic-free baselines over k samples per prompt: RLOO and GRPO advantages.

``rewards`` has shape [b, k]: one sequence-level reward per sample, k samples
of each of b prompts. Both return advantages of the same shape, one per
sample, to weight that sample's summed (RLOO) or per-token (GRPO)
log-probability.

* RLOO (Kool et al. 2019; Ahmadian et al. 2024, eq. 3): the baseline of
  sample i is the mean reward of the other k - 1 samples of its prompt,
  A_i = r_i - 1/(k - 1) * sum_{j != i} r_j = k/(k - 1) * (r_i - mean(r)).
* GRPO (Shao et al. 2024, DeepSeekMath eq. 3 with outcome supervision): the
  group-normalised reward A_i = (r_i - mean(r)) / (std(r) + eps), std over
  the group (the population std, as the paper's normalisation uses; a group
  whose rewards are all equal gets advantages 0). ``scale=False`` keeps only
  the centring (Dr. GRPO, Liu et al. 2025, which finds the division biases
  toward easy and hard prompts).
"""

from __future__ import annotations

import torch


def _check(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must have shape [prompts, k] with k >= 2, got {tuple(rewards.shape)}")


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages, shape [b, k]: each reward less the mean of its prompt's other rewards."""
    _check(rewards)
    k = rewards.shape[1]
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    return rewards - others


def grpo_advantages(rewards: torch.Tensor, *, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """Group-normalised advantages, shape [b, k]: (r - group mean) / (group std + eps), or only centred."""
    _check(rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)
