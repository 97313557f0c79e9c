"""Carriers of PPO tensors, with their shapes."""

from __future__ import annotations

from typing import NamedTuple

import torch


class PPOStats(NamedTuple):
    """Detached diagnostics of one PPO loss evaluation (scalars)."""

    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    approx_kl: torch.Tensor
    """E[(ratio - 1) - log ratio], the k3 estimate of KL(old || new)"""
    clipfrac: torch.Tensor
    """fraction of tokens whose ratio was clipped"""
    value_clipfrac: torch.Tensor
    """fraction of tokens whose value was clipped"""
    ratio_mean: torch.Tensor
