"""Orchestration overhead of one weekly cycle: wall time minus the stages' own compute time.

    python bench/cycle_overhead.py [--backend postgres|sqlite] [--world-steps 300]

1. A scratch store (a throwaway PostgreSQL database on the server
   RATCHET_BENCH_POSTGRES_URL names, default the local one; or a SQLite file),
   local artifacts, and the demo world built into it (not timed).
2. Prefect's temporary server (not timed), the REST API on a loopback port,
   and the simulated labeler answering tasks over HTTP, as in ``ratchet demo``.
3. One cycle of the ``weekly-cycle`` flow with the demo's settings, timed
   from the call to its return.

Each stage run records its own compute time (``compute_s``): a worker step's
time inside ``run()``, and for ``gather`` the time spent waiting for
labelers. What is left of the wall time is the orchestrator's: Prefect flow
and task runs, store transactions, uploads and checksums, task creation,
the snapshot, reading outputs back, the report artifact.

The last line is JSON: {"wall_s", "compute_s", "overhead_s", ...}. Target: overhead_s <= 10.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sqlalchemy as sa  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

SERVER = os.environ.get("RATCHET_BENCH_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


def scratch_database(backend: str, tmp: Path) -> tuple[str, callable]:
    """A migrated scratch database URL and a function that drops it."""
    from store.db import upgrade

    if backend == "sqlite":
        url = f"sqlite:///{tmp / 'ratchet.db'}"
        upgrade(url)
        return url, lambda: None
    name = f"ratchet_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(SERVER, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = make_url(SERVER).set(database=name).render_as_string(hide_password=False)
    upgrade(url)

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--world-steps", type=int, default=300, help="SFT steps of the demo world's P0")
    parser.add_argument("--week", default="2030-W01")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from transformers.utils import logging as hf_logging

    from api.app import create_app
    from orchestrator.demo.command import ApiThread, demo_cycle_settings, start_prefect
    from orchestrator.flow import use_env, weekly_cycle
    from orchestrator.demo.labeler import SimulatedLabeler
    from orchestrator.cycle import STAGES, CycleEnv
    from orchestrator.demo.world import WorldConfig, build_world
    from store.artifacts import ArtifactStore
    from store.db import open_database
    from store.keys import create_api_key
    from store.cycles import get_cycle
    from store.settings import Settings
    from workers.demo_world import gold_score

    hf_logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp(prefix="ratchet-bench-"))
    url, drop = scratch_database(args.backend, tmp)
    database = open_database(url)
    try:
        artifacts = ArtifactStore(str(tmp / "artifacts"))
        settings = demo_cycle_settings()
        print(f"building the demo world ({args.backend} store)", file=sys.stderr)
        build_world(database, artifacts, tmp / "work", config=WorldConfig(sft_steps=args.world_steps),
                    num_threads=settings.num_threads)
        print(f"Prefect API at {start_prefect()}", file=sys.stderr)
        env = CycleEnv(database, artifacts, work_dir=tmp / "work", defaults=settings)
        api = ApiThread(create_app(Settings(home=tmp, database_url=url, artifacts_url=str(tmp / "artifacts")),
                                   database=database, artifacts=artifacts))
        api.start()
        with database.session() as session:
            token = create_api_key(session, name="bench-labeler", role="labeler")[1]
        labeler = SimulatedLabeler(api.url, token, gold=gold_score, noise=0.1)
        stop = threading.Event()
        thread = threading.Thread(target=labeler.run, args=(stop,), kwargs={"poll_interval_s": 0.1}, daemon=True)
        thread.start()
        try:
            with use_env(env):
                t0 = time.perf_counter()
                summary = weekly_cycle(week=args.week)
                wall = time.perf_counter() - t0
        finally:
            stop.set()
            thread.join(timeout=10)
            labeler.close()
            api.stop()
        if summary["status"] != "succeeded":
            print(f"the cycle {summary['status']}: {summary['reason']}", file=sys.stderr)
            return 1
        with database.session() as session:
            cycle = get_cycle(session, summary["cycle_id"])
            stages = {run.stage: run.compute_s or 0.0 for run in cycle.stages}
        compute = sum(stages.values())
        for stage in STAGES:
            print(f"  {stage:<9} compute {stages.get(stage, 0.0):7.2f} s", file=sys.stderr)
        print(f"wall {wall:.2f} s, compute {compute:.2f} s, overhead {wall - compute:.2f} s", file=sys.stderr)
        print(json.dumps({
            "wall_s": round(wall, 3),
            "compute_s": round(compute, 3),
            "overhead_s": round(wall - compute, 3),
            "backend": args.backend,
            "stages_compute_s": {k: round(v, 3) for k, v in stages.items()},
            "deployed": summary["deployed"],
        }))
        return 0
    finally:
        database.dispose()
        drop()


if __name__ == "__main__":
    raise SystemExit(main())
