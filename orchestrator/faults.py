"""Fault injection for the crash tests: die with SIGKILL at a named point of a stage.

``RATCHET_TEST_KILL_AT="<stage>:<point>"`` makes the process kill itself
(SIGKILL: no cleanup, no exception handlers, an open transaction simply
vanishes) when the cycle reaches that point. Points every stage passes:

- ``started``: its stage run is recorded as running, nothing else done;
- ``in_commit``: inside the transaction that registers its versions and
  marks it succeeded, just before the commit;

and stages that run a worker step also pass ``ran`` (the step finished and
its outputs are uploaded, nothing registered). The deploy stage passes
``deployed`` (the deployment is committed, the hook not yet called).

Unset (always, outside tests) it costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

KILL_ENV = "RATCHET_TEST_KILL_AT"


def kill_point(stage: str, point: str) -> None:
    """SIGKILL this process if ``RATCHET_TEST_KILL_AT`` names ``<stage>:<point>``."""
    target = os.environ.get(KILL_ENV)
    if target and target == f"{stage}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)
