"""The process the crash tests kill: runs the week's cycle with a fake runner and a store labeler.

The crash test starts each run with :func:`start`, from a ``multiprocessing``
fork server that imported this module (and so Prefect and the orchestrator)
once: a run costs a fork, not the seconds those imports take. ``kill_at``
becomes ``RATCHET_TEST_KILL_AT`` (orchestrator.faults), which makes the run
SIGKILL itself at one point of one stage; ``prefect_api`` is the test
session's server. The run's stdout and stderr go to ``log``.

By hand, without the fork server:

    python -m tests.orchestrator.crash_child DATABASE_URL ARTIFACTS WORK_DIR WEEK ACK_FILE HOOK_LOG
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_LEVEL, temporary_settings

from orchestrator.cycle import CycleEnv
from orchestrator.faults import KILL_ENV
from orchestrator.flow import use_env, weekly_cycle
from orchestrator.hooks import DeployHook
from store.artifacts import ArtifactStore
from store.db import Database
from tests.orchestrator.fakes import FakeRunner, StoreLabeler, fast_settings


def main(argv: list[str]) -> int:
    url, artifacts_root, work_dir, week, ack, hook_log = argv
    database = Database(url)
    artifacts = ArtifactStore(artifacts_root)
    hook = DeployHook(f"{sys.executable} -c \"import sys; open({hook_log!r}, 'a').write(sys.stdin.read() + '\\n')\"")
    env = CycleEnv(database, artifacts, work_dir=Path(work_dir), defaults=fast_settings(),
                   runner=FakeRunner(artifacts, work_dir), deploy_hook=hook)
    with use_env(env), StoreLabeler(database, ack_path=Path(ack)):
        summary = weekly_cycle(week=week)
    print(summary["status"])
    return 0 if summary["status"] == "succeeded" else 1


def _forked(argv: list[str], kill_at: str | None, prefect_api: str, log: str) -> None:
    with open(log, "ab", buffering=0) as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.pop(KILL_ENV, None)
    if kill_at:
        os.environ[KILL_ENV] = kill_at
    # Prefect read its settings when the fork server imported it; the server's URL is set here
    with temporary_settings(updates={PREFECT_API_URL: prefect_api, PREFECT_LOGGING_LEVEL: "ERROR"}):
        code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(code)


def start(argv: list[str], *, kill_at: str | None, prefect_api: str, log: Path) -> multiprocessing.Process:
    """One run of :func:`main`, forked from a fork server that preloaded this module."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    process = context.Process(target=_forked, args=(argv, kill_at, prefect_api, str(log)), daemon=True)
    process.start()
    return process


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
