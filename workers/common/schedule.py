"""The schedules of a training loop: which examples a step reads, and its learning rate (train_pm, sft)."""

from __future__ import annotations

import math

import numpy as np


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
