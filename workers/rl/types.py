"""Carriers of PPO tensors, with their shapes."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Trajectory(NamedTuple):
    """One rollout, everything PPO needs from it (all on one device).

    b is the number of episodes, r the padded response length.
    """

    query_responses: torch.Tensor
    """prompt and response token ids, left-padded prompt then right-padded response; shape [b, p + r]"""
    attention_mask: torch.Tensor
    """1 for real tokens; shape [b, p + r]"""
    response_mask: torch.Tensor
    """1 for response tokens up to and including EOS; shape [b, r]"""
    logprobs: torch.Tensor
    """log-prob of each response token under the policy that sampled it; shape [b, r]"""
    ref_logprobs: torch.Tensor
    """log-prob of each response token under the reference policy; shape [b, r]"""
    values: torch.Tensor
    """value estimate before each response token; shape [b, r]"""
    scores: torch.Tensor
    """the preference model's score of the whole response (penalties applied); shape [b]"""
    advantages: torch.Tensor
    """GAE advantages (whitened); shape [b, r]"""
    returns: torch.Tensor
    """value targets: advantages + values before whitening; shape [b, r]"""


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
