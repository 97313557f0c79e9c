"""Direct preference losses: DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023), ties included.

A pair is (A, B) with a labelled probability ``target`` that A is preferred:
1 (A), 0 (B) or 1/2 (a tie), as the PM's Bradley-Terry loss reads its labels.
With the policy's and the reference's summed log-probabilities of each
response, the implicit reward of a response is beta * (log pi - log pi_ref),
and

    logits = (log pi(A) - log pi_ref(A)) - (log pi(B) - log pi_ref(B))

* DPO ("sigmoid"): loss = -[t * log sigmoid(beta * logits) + (1 - t) * log sigmoid(-beta * logits)].
  t = 1 is the paper's eq. 7; t = 1/2 (a tie) is minimised at logits = 0,
  equal implicit rewards: the pair says the two are as good as each other.
  ``label_smoothing`` e moves a decisive target to 1 - e (conservative DPO,
  Mitchell 2023).
* IPO ("ipo"): loss = (logits - (2t - 1) / (2 * beta))^2, the squared loss of
  Azar et al. eq. 17 (for t = 1: (logits - 1 / (2 beta))^2), whose target for a
  tie is logits = 0.

Ties are kept rather than dropped: a team's "about the same" is information
(the PM trains on it the same way), and dropping them would make a policy
trained by DPO learn from fewer of the same comparisons than its PM.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "ipo"]


class PreferenceStats(NamedTuple):
    """Detached diagnostics of one preference loss evaluation (scalars over the batch)."""

    loss: torch.Tensor
    reward_a: torch.Tensor
    """mean implicit reward of A: beta * (log pi(A) - log pi_ref(A))"""
    reward_b: torch.Tensor
    accuracy: torch.Tensor
    """fraction of decisive pairs whose preferred response has the higher implicit reward; nan if none"""
    margin: torch.Tensor
    """mean implicit-reward gap, preferred minus other, over decisive pairs; nan if none"""
    num_decisive: torch.Tensor


def preference_loss(
    policy_logps_a: torch.Tensor,
    policy_logps_b: torch.Tensor,
    ref_logps_a: torch.Tensor,
    ref_logps_b: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, PreferenceStats]:
    """Per-pair DPO or IPO losses, shape [b], and their detached stats.

    Every input has shape [b]: summed log-probabilities of each response
    (response tokens only) under the policy and the reference, and ``target``
    the labelled P(A preferred) (1, 0 or 0.5).
    """
    if beta <= 0:
        raise ValueError(f"beta ({beta}) must be > 0")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing ({label_smoothing}) must be in [0, 0.5)")
    logratio_a = policy_logps_a - ref_logps_a
    logratio_b = policy_logps_b - ref_logps_b
    logits = logratio_a - logratio_b
    t = target.to(logits.dtype)
    if loss_type == "sigmoid":
        t = t * (1 - 2 * label_smoothing) + label_smoothing  # 1 -> 1 - e, 0 -> e, 1/2 stays
        losses = -(t * F.logsigmoid(beta * logits) + (1 - t) * F.logsigmoid(-beta * logits))
    elif loss_type == "ipo":
        losses = (logits - (2 * t - 1) / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r} is not one of sigmoid, ipo")
    with torch.no_grad():
        reward_a, reward_b = beta * logratio_a, beta * logratio_b
        decisive = target != 0.5
        sign = torch.where(target > 0.5, 1.0, -1.0).to(logits.dtype)
        gap = sign * (reward_a - reward_b)
        n = decisive.sum()
        nan = torch.tensor(float("nan"))
        stats = PreferenceStats(
            loss=losses.mean().detach(),
            reward_a=reward_a.mean(),
            reward_b=reward_b.mean(),
            accuracy=(gap[decisive] > 0).float().mean() if n > 0 else nan,
            margin=gap[decisive].mean() if n > 0 else nan,
            num_decisive=n,
        )
    return losses, stats
