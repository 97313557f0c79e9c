"""The schedules of a training loop: which examples a step reads, its learning rate, and its optimizer
(train_pm, sft, dpo)."""

from __future__ import annotations

import math

import numpy as np
import torch


class DataOrder:
    """A stream of training indices: epoch e is a permutation seeded by (seed, e).

    Step s takes stream positions [s * batch_size, (s + 1) * batch_size), so
    the data position of a run is its step count: nothing is dropped at epoch
    ends, and a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, n: int, *, seed: int):
        self.n = n
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def batch(self, step: int, batch_size: int) -> list[int]:
        """Indices of step ``step``'s batch."""
        start = step * batch_size
        return [int(self._perm(pos // self.n)[pos % self.n]) for pos in range(start, start + batch_size)]

    def epoch_of(self, step: int, batch_size: int) -> float:
        """Epochs completed at the start of ``step``."""
        return step * batch_size / self.n


def lr_at(step: int, *, base: float, warmup: int, total: int, schedule: str) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then constant/linear/cosine decay.

    Linear decay without warmup gives base * (total - step) / total, the
    schedule of transformers' ``get_linear_schedule_with_warmup``.
    """
    if step < warmup:
        return base * (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return base * max(0.0, 1.0 - progress_)
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))
    return base


def adamw(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[torch.optim.AdamW, list[torch.nn.Parameter]]:
    """AdamW over the trainable parameters, with weight decay on matrices only (not biases or norms);
    returns the optimizer and its parameters (decayed first), for gradient clipping. The fused kernel
    (CPU and CUDA) is the fastest AdamW and as deterministic as the others."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=betas, eps=eps, fused=device.type in ("cpu", "cuda"),
    )
    return optimizer, decay + no_decay
