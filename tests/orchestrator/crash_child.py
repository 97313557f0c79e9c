"""The process the crash tests kill: runs the week's cycle with a fake runner and a store labeler.

    python -m tests.orchestrator.crash_child DATABASE_URL ARTIFACTS WORK_DIR WEEK ACK_FILE HOOK_LOG

``RATCHET_TEST_KILL_AT`` (orchestrator.faults) makes it SIGKILL itself at one
point of one stage; ``PREFECT_API_URL`` points at the test session's server.
"""

from __future__ import annotations

import sys
from pathlib import Path

from orchestrator.flow import use_env, weekly_cycle
from orchestrator.hooks import DeployHook
from orchestrator.cycle import CycleEnv
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


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
