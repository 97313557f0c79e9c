"""Stopping a step at a unit boundary when whoever runs it asks (an operator cancelled the cycle).

The orchestrator runs an in-process step inside ``stop_when(check)``; the
training loops iterate over ``this_run`` (``policy_step``) or call
``stop_requested()`` between optimizer steps, and end the run the way
``max_steps_this_run`` does: the step returns an incomplete result, which the
orchestrator does not register. ``check`` is called at most once per
``every_s`` seconds (it asks the store). Outside ``stop_when`` (a step run by
hand, or under torchrun, where each process would have to agree)
``stop_requested()`` is always False. Standard library only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_check: ContextVar[Callable[[], bool] | None] = ContextVar("ratchet_stop_check", default=None)


class _Throttled:
    def __init__(self, check: Callable[[], bool], every_s: float):
        self.check, self.every_s = check, every_s
        self.asked_at = -float("inf")
        self.stopped = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self.stopped and now - self.asked_at >= self.every_s:
            self.asked_at = now
            self.stopped = bool(self.check())
        return self.stopped


@contextmanager
def stop_when(check: Callable[[], bool], *, every_s: float = 2.0) -> Iterator[None]:
    """Inside the block, ``stop_requested()`` is True once ``check()`` has returned True."""
    token = _check.set(_Throttled(check, every_s))
    try:
        yield
    finally:
        _check.reset(token)


def stop_requested() -> bool:
    """Whether the step running now has been asked to stop (never, outside ``stop_when``)."""
    check = _check.get()
    return check is not None and check()
