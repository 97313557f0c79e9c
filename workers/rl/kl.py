"""KL estimators, per-token KL-penalised rewards, and KL coefficient controllers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    With logratio = log pi(x) - log pi_ref(x) for x ~ pi (Schulman 2020):
    ``k1`` = logratio (unbiased, can be negative per token);
    ``k3`` = (exp(-logratio) - 1) + logratio (unbiased, always >= 0, lower variance).
    Shapes follow the inputs, e.g. [b, r].
    """
    logratio = logprobs - ref_logprobs
    if estimator == "k1":
        return logratio
    if estimator == "k3":
        return torch.expm1(-logratio) + logratio
    raise ValueError(f"kl estimator {estimator!r} is not one of k1, k3")


def penalised_rewards(
    scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL at every response token, plus the score
    at the last response token (Ziegler et al. 2019; Bai et al. 2022 use
    r_PM - beta * KL). Shapes: scores [b], kl and response_mask [b, r] -> [b, r].
    """
    rewards = -kl_coef * kl * response_mask
    last = response_mask.long().sum(dim=1).clamp(min=1) - 1
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
    return rewards


@dataclass
class FixedKLController:
    """A constant KL coefficient (the paper's beta = 0.001)."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019, eq. 2: move beta toward a target KL.

    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon),
    where n is the number of episodes since the last update.
    """

    value: float
    target: float
    horizon: int = 10_000

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + proportional_error * n_steps / self.horizon
        return self.value


def sqrt_kl(kl: float) -> float:
    """sqrt(KL) for the reward-vs-sqrt(KL) chart (0 for tiny negative estimates)."""
    return math.sqrt(max(kl, 0.0))
