"""The production path, run for real: a Prefect server on PostgreSQL, the deployments of
``deploy/prefect.yaml``, a process worker per pool, and one weekly cycle whose worker steps run as
flow runs of their own ``ratchet-step/*`` deployments on the ``gpu`` pool.

Every piece is a separate process started the way an operator starts it (``prefect server start``,
``prefect work-pool create``, ``prefect deploy --all --prefect-file ...``, ``prefect worker start``,
``ratchet db upgrade``, ``ratchet prompts add``, ``ratchet policy add``, ``ratchet cycle run
--via-deployment``); nothing of the cycle runs in the test's process except a labeler that answers
comparison tasks through the store, as a labeling tool would. The test then reads the flow runs
back from the Prefect API and the versions from the store.

What differs from production, and why:

- ``deploy/prefect.yaml`` is copied with four values replaced, each checked to be there first:
  the pull step's working directory (``/opt/ratchet``, where the image holds the code) becomes
  this checkout; the step deployments' ``RATCHET_WORK_DIR`` (``/scratch/ratchet``, a volume) and
  the cycle deployment's ``RATCHET_CYCLE_CONFIG`` (``/etc/ratchet/cycle.json``, baked into the
  image) become folders of the test; the steps' ``RATCHET_NPROC_PER_NODE`` (``auto``: one process
  per GPU, so 1 here) becomes 2, so that the steps run under torchrun on two CPU processes
  (gloo), as they would on a two-GPU job. Everything else (entrypoints, pools, tags, the cycle's
  concurrency limit and schedule) is the file's own.
- The cycle settings are ``deploy/cycle.json`` (``runner: deployment``, its pool and step
  deployments) with the sizes of a tiny model and a minute of labeling instead of a week's.
- The server's scheduler service is off: the test's flow run is the only cycle run there is,
  whatever the day and hour (the cron schedule is still registered).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import sqlalchemy as sa
import yaml
from sqlalchemy import select
from sqlalchemy.engine import make_url

from orchestrator.cycle import DONE, STAGES
from orchestrator.settings import load_defaults
from store.db import Database
from store.lineage import lineage_back
from store.models import Cycle, Dataset, Policy, PreferenceModel
from tests.orchestrator.fakes import StoreLabeler
from tests.workers.builders import prompt_set, write_jsonl
from workers.common.testing import build_tiny_model

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
WEEK = "2026-W30"
CYCLE_DEPLOYMENT = "weekly-cycle/weekly-cycle"
STEP_STAGES = {"sample": "sample", "train_pm": "train-pm", "improve": "ppo", "evaluate": "evaluate"}
"""the cycle's stages that run a worker step -> the ratchet-step deployment each runs on (the improve
stage's method is ppo)"""
NPROC = 2
"""worker processes of the steps that run under torchrun (the job variable RATCHET_NPROC_PER_NODE)"""
SERVER_START_S = 90.0
CYCLE_TIMEOUT_S = 420.0
"""a bound, for a hung path: the cycle takes about 2 minutes on two idle cores"""

TINY = {
    "sample": {"prompts_per_cycle": 16, "config": {"num_samples": 3, "max_new_tokens": 8, "batch_size": 16}},
    "gather": {"min_comparisons": 10, "all_tasks": True, "deadline_s": 120, "poll_interval_s": 0.2},
    "pm": {"config": {"learning_rate": 1e-3, "batch_size": 8, "micro_batch_size": 8, "max_steps": 4,
                      "max_length": 64, "heldout_fraction": 0.3, "select_by": "last", "ensemble_size": 2,
                      "dtype": "float32"}},
    "ppo": {"config": {"total_episodes": 16, "rollout_batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1,
                       "gradient_accumulation_steps": 1, "response_length": 8, "learning_rate": 1e-4}},
    "evaluate": {"config": {"max_new_tokens": 8}},
    "human_eval": {"max_tasks": 6, "min_comparisons": 3, "deadline_s": 60, "poll_interval_s": 0.2},
    "device": "cpu",
    "step_poll_interval_s": 1,
    "stage_retries": 0,
    "retry_delay_s": 0,
}
"""deploy/cycle.json's sections, sized for a tiny model on two CPU cores (torch threads: the workers'
OMP_NUM_THREADS=1, which the flow runs they start inherit)"""


# -- processes -------------------------------------------------------------------------------


class Processes:
    """Long-running subprocesses of the test, each in its own process group, logged to a file."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps its own descriptor
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.started.append((name, proc))
        return proc

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def logs(self) -> str:
        """The end of every process's log, for a failure message."""
        return "\n".join(f"--- {name} ---\n{self.log_tail(name)}" for name, _ in self.started)

    def stop_all(self) -> None:
        """Workers first, then the server: SIGTERM to each process group and to every descendant (a worker's
        flow runs have sessions of their own), SIGKILL to what is left after a grace period."""
        for _, proc in reversed(self.started):
            family = _family(proc.pid)
            _signal_group(proc.pid, signal.SIGTERM)
            _signal_all(family, signal.SIGTERM)
            _, alive = psutil.wait_procs(family, timeout=10)
            _signal_group(proc.pid, signal.SIGKILL)
            _signal_all(alive, signal.SIGKILL)
            proc.wait(timeout=10)


def _family(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (none when it is gone)."""
    try:
        leader = psutil.Process(pid)
        return [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _signal_all(members: list[psutil.Process], sig: int) -> None:
    for member in members:
        try:
            member.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(*commands: list[str], env: dict[str, str]) -> list[str]:
    """Commands that must succeed, run at once (each mostly imports: two cores overlap them); their stdouts."""
    procs = [subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in commands]
    outs = []
    for args, proc in zip(commands, procs):
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        assert proc.returncode == 0, (f"{Path(args[0]).name} {' '.join(args[1:])} exited {proc.returncode}:\n"
                                      f"{stdout[-2000:]}\n{stderr[-3000:]}")
        outs.append(stdout)
    return outs


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def databases(pg_url) -> Iterator[dict[str, str]]:
    """Two fresh, empty PostgreSQL databases on the test server: the store's and Prefect's (both dropped
    afterwards). ``pg_url`` skips the test without a server, or fails it in CI."""
    suffix = uuid.uuid4().hex[:10]
    names = {"store": f"ratchet_prodpath_{suffix}", "prefect": f"prefect_prodpath_{suffix}"}
    server = make_url(pg_url).set(database="postgres")
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in names.values():
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield {
            "store": server.set(database=names["store"]).render_as_string(hide_password=False),
            "prefect": server.set(drivername="postgresql+asyncpg", database=names["prefect"])
            .render_as_string(hide_password=False),
        }
    finally:
        with admin.connect() as conn:
            for name in names.values():
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def processes(tmp_path) -> Iterator[Processes]:
    """The test's subprocesses, stopped at the end whatever happened."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    procs = Processes(log_dir)
    try:
        yield procs
    finally:
        procs.stop_all()


def _base_env(tmp_path: Path) -> dict[str, str]:
    """This process's environment without its Prefect and Ratchet settings (the session may run a Prefect
    test harness), with the settings every process of the path shares."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RATCHET_"))}
    env.update({
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    return env


# -- the steps of the path -------------------------------------------------------------------


def start_server(processes: Processes, env: dict[str, str], prefect_db: str) -> str:
    """``prefect server start`` on a free loopback port, on its own PostgreSQL database; its API URL once
    /api/health answers."""
    port = _free_port()
    server_env = {**env, "PREFECT_API_DATABASE_CONNECTION_URL": prefect_db,
                  "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
    proc = processes.start("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                      "--port", str(port)], server_env)
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + SERVER_START_S
    while True:
        assert proc.poll() is None, f"prefect server exited {proc.returncode}:\n{processes.log_tail('server')}"
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return api
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"no /api/health in {SERVER_START_S:.0f} s:\n{processes.log_tail('server')}"
        time.sleep(0.5)


def derived_prefect_yaml(path: Path, *, work_dir: Path, cycle_config: Path) -> Path:
    """``deploy/prefect.yaml`` with only the values that name places of the image replaced (each checked
    to be there with the value it replaces), written to ``path``."""
    text = (DEPLOY / "prefect.yaml").read_text()
    spec = yaml.safe_load(text)
    (pull,) = spec["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == "/opt/ratchet"
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert by_name["weekly-cycle"]["work_pool"]["job_variables"]["env"]["RATCHET_CYCLE_CONFIG"] == "/etc/ratchet/cycle.json"
    assert spec["definitions"]["step_env"]["RATCHET_WORK_DIR"] == "/scratch/ratchet"
    assert spec["definitions"]["step_env"]["RATCHET_NPROC_PER_NODE"] == "auto"
    replaced = {"directory: /opt/ratchet": f"directory: {ROOT}",
                "RATCHET_NPROC_PER_NODE: auto": f'RATCHET_NPROC_PER_NODE: "{NPROC}"',
                "RATCHET_WORK_DIR: /scratch/ratchet": f"RATCHET_WORK_DIR: {work_dir}",
                "RATCHET_CYCLE_CONFIG: /etc/ratchet/cycle.json": f"RATCHET_CYCLE_CONFIG: {cycle_config}"}
    for old, new in replaced.items():
        assert text.count(old) == 1, f"deploy/prefect.yaml should say {old!r} once"
        text = text.replace(old, new)
    path.write_text(text)
    derived = yaml.safe_load(text)
    # the anchors still carry the step env into every step deployment
    assert {d["name"]: d["work_pool"]["job_variables"]["env"].get("RATCHET_WORK_DIR")
            for d in derived["deployments"] if d["name"] != "weekly-cycle"} == {
        d["name"]: str(work_dir) for d in spec["deployments"] if d["name"] != "weekly-cycle"}
    return path


def tiny_cycle_config(path: Path) -> Path:
    """``deploy/cycle.json`` with ``TINY`` merged in (its runner, pool and step deployments kept), checked as
    the server checks it, written to ``path``."""
    config = _deep_merge(json.loads((DEPLOY / "cycle.json").read_text()), TINY)
    path.write_text(json.dumps(config, indent=2))
    settings = load_defaults(path)
    assert (settings.runner, settings.work_pool, settings.improve.method) == ("deployment", "gpu", "ppo")
    assert {stage: settings.step_deployments[step] for stage, step in
            (("sample", "sample"), ("train_pm", "train_pm"), ("improve", "ppo"), ("evaluate", "evaluate"))} == {
        stage: f"ratchet-step/{name}" for stage, name in STEP_STAGES.items()}
    return path


def _deep_merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def bootstrap(env: dict[str, str], tmp_path: Path) -> None:
    """The store as a user seeds it: migrate, then register the prompt sets and register and deploy P0."""
    ratchet = str(BIN / "ratchet")
    _run([ratchet, "db", "upgrade"], env=env)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_set(32))
    eval_prompts = write_jsonl(tmp_path / "eval-prompts.jsonl",
                               [{**p, "id": f"eval-{p['id']}"} for p in prompt_set(6, seed=1)])
    p0 = build_tiny_model(tmp_path / "p0", n_layer=2, hidden_size=32, n_head=2, max_positions=128)
    _run([ratchet, "prompts", "add", str(prompts)],
         [ratchet, "prompts", "add", str(eval_prompts), "--name", "eval-prompts"],
         [ratchet, "policy", "add", str(p0), "--deploy", "default"], env=env)


def flow_runs(api: str) -> list[dict]:
    """Every flow run on the server, with its deployment's and flow's names."""
    with httpx.Client(base_url=api, timeout=10) as client:
        runs = client.post("/flow_runs/filter", json={"limit": 200}).raise_for_status().json()
        deployments = {d["id"]: d for d in client.post("/deployments/filter", json={"limit": 200}).raise_for_status().json()}
        flows = {f["id"]: f["name"] for f in client.post("/flows/filter", json={"limit": 200}).raise_for_status().json()}
    for run in runs:
        deployment = deployments.get(run["deployment_id"])
        run["deployment"] = f"{flows[deployment['flow_id']]}/{deployment['name']}" if deployment else None
        run["flow"] = flows[run["flow_id"]]
    return runs


def wait_for_flow_run(api: str, flow_run_id: str, processes: Processes) -> dict:
    """The flow run once its state is final (the test fails after ``CYCLE_TIMEOUT_S``)."""
    deadline = time.monotonic() + CYCLE_TIMEOUT_S
    while True:
        run = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=10).raise_for_status().json()
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        assert time.monotonic() < deadline, (
            f"cycle flow run still {run['state_type']} after {CYCLE_TIMEOUT_S:.0f} s\n{processes.logs()}")
        time.sleep(1)


# -- the test --------------------------------------------------------------------------------


def test_a_weekly_cycle_runs_through_prefect_deployments_and_process_workers(databases, processes, tmp_path):
    gpu_work_dir, cpu_work_dir = tmp_path / "gpu-scratch", tmp_path / "cpu-work"
    cycle_config = tiny_cycle_config(tmp_path / "cycle.json")
    env = _base_env(tmp_path)
    # a Ratchet node's environment: the store, the shared artifact store, a work folder, the cycle settings
    node_env = {**env, "RATCHET_HOME": str(tmp_path / "ratchet-home"), "RATCHET_DATABASE_URL": databases["store"],
                "RATCHET_ARTIFACTS_URL": str(tmp_path / "artifacts"), "RATCHET_WORK_DIR": str(cpu_work_dir),
                "RATCHET_CYCLE_CONFIG": str(cycle_config)}
    with ThreadPoolExecutor(1) as pool:
        # 1. the store is seeded while the Prefect server starts (neither needs the other)
        seeded = pool.submit(bootstrap, node_env, tmp_path)
        api = start_server(processes, env, databases["prefect"])
        env["PREFECT_API_URL"] = node_env["PREFECT_API_URL"] = api

        # 2. the pools, and the deployments registered from (a copy of) deploy/prefect.yaml
        prefect = str(BIN / "prefect")
        _run(*[[prefect, "work-pool", "create", name, "--type", "process"] for name in ("cpu", "gpu")], env=env)
        prefect_yaml = derived_prefect_yaml(tmp_path / "prefect.yaml", work_dir=gpu_work_dir, cycle_config=cycle_config)
        _run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_yaml)], env=env)

        # 3. one process worker per pool, on a Ratchet node, polling every second
        worker_env = {**node_env, "PREFECT_WORKER_QUERY_SECONDS": "1"}
        for name in ("cpu", "gpu"):
            processes.start(f"worker-{name}", [prefect, "worker", "start", "--pool", name, "--type", "process",
                                               "--limit", "1"], worker_env)
        seeded.result()

    # 4. the week's cycle, a flow run of the weekly-cycle deployment; a labeler answers its tasks meanwhile
    (out,) = _run([str(BIN / "ratchet"), "cycle", "run", "--week", WEEK, "--via-deployment"], env=node_env)
    trigger = json.loads(out.strip().splitlines()[-1])
    assert (trigger["week"], trigger["deployment"]) == (WEEK, CYCLE_DEPLOYMENT)
    database = Database(databases["store"])
    try:
        with StoreLabeler(database, judge=lambda prompt, a, b: "a" if len(a) <= len(b) else "b"):
            cycle_run = wait_for_flow_run(api, trigger["flow_run_id"], processes)
        assert cycle_run["state_type"] == "COMPLETED", (
            f"cycle flow run {cycle_run['state_type']}: {cycle_run['state']['message']}\n{processes.logs()}")

        # 5. what Prefect and the store recorded
        check_flow_runs(api, trigger["flow_run_id"])
        check_store(database, trigger["flow_run_id"], artifacts=tmp_path / "artifacts")
    finally:
        database.dispose()
    # the steps wrote in the gpu node's work folder (the step deployments' job env), the cycle in none
    assert {p.name for p in (gpu_work_dir / WEEK).iterdir()} >= set(STEP_STAGES)
    assert not (cpu_work_dir / WEEK).exists()
    # every step ran under torchrun (the launch config beside its folder)
    launched = {p.name for p in (gpu_work_dir / WEEK).glob("*.torchrun-config.json")}
    assert launched == {f"{stage}.torchrun-config.json" for stage in STEP_STAGES}


def check_flow_runs(api: str, cycle_flow_run_id: str) -> None:
    """The cycle ran on the cpu pool; each of its worker steps as a flow run of its own deployment on the gpu
    pool, keyed by (week, stage), completed."""
    runs = flow_runs(api)
    (cycle,) = [r for r in runs if r["deployment"] == CYCLE_DEPLOYMENT]
    assert (cycle["id"], cycle["work_pool_name"], cycle["name"]) == (cycle_flow_run_id, "cpu", f"cycle-{WEEK}")
    assert cycle["parameters"]["week"] == WEEK
    steps = {r["idempotency_key"]: r for r in runs if r["id"] != cycle_flow_run_id}
    assert set(steps) == {f"{WEEK}:{stage}" for stage in STEP_STAGES}, sorted(steps)
    for stage, deployment in STEP_STAGES.items():
        run = steps[f"{WEEK}:{stage}"]
        assert (run["flow"], run["deployment"], run["work_pool_name"], run["state_type"]) == (
            "ratchet-step", f"ratchet-step/{deployment}", "gpu", "COMPLETED"), (stage, run)
        assert run["parameters"]["request"]["artifact_prefix"] == f"cycles/{WEEK}/{stage}"
        assert f"stage:{stage}" in run["tags"]


def check_store(database: Database, cycle_flow_run_id: str, *, artifacts: Path) -> None:
    """The cycle finished in the store, claimed by the cycle's flow run, with a PM and a candidate policy
    whose lineage reaches P0 and the labeler's batches, their weights where the gpu flow runs uploaded them."""
    with database.session() as s:
        cycle = s.scalar(select(Cycle).where(Cycle.week == WEEK))
        assert (cycle.status, cycle.trigger, cycle.flow_run_id) == ("succeeded", "cli", cycle_flow_run_id), cycle.reason
        statuses = {r.stage: r.status for r in cycle.stages}
        assert set(statuses) == set(STAGES) and set(statuses.values()) <= set(DONE), statuses
        assert all(statuses[stage] == "succeeded" for stage in (*STEP_STAGES, "gather", "snapshot", "human_eval", "gate"))
        outputs = {r.stage: r.outputs for r in cycle.stages}
        p0, candidate = s.scalars(select(Policy).order_by(Policy.version)).all()
        assert (candidate.version, candidate.cycle_id, candidate.init_policy_id, candidate.reference_policy_id) == (
            2, cycle.id, p0.id, p0.id)
        pm = s.get(PreferenceModel, candidate.pm_id)
        test_pm = s.get(PreferenceModel, outputs["train_pm"]["test_pm_id"])
        assert (pm.role, pm.cycle_id, test_pm.role, test_pm.dataset_id) == ("train", cycle.id, "test", pm.dataset_id)
        snapshot = s.get(Dataset, pm.dataset_id)
        assert snapshot.kind == "comparisons" and snapshot.row_count == outputs["snapshot"]["rows"] >= 10
        graph = lineage_back(s, kind="policy", id=candidate.id)
        assert set(graph.ids("policy")) == {p0.id, candidate.id} and graph.ids("feedback_batch")
        for row, key in ((candidate, "improve/policy"), (pm, "train_pm/pm"), (test_pm, "train_pm/test_pm")):
            assert row.artifact.uri.rstrip("/").endswith(f"cycles/{WEEK}/{key}"), row.artifact.uri
        assert (artifacts / "cycles" / WEEK / "improve" / "result.json").is_file()
        assert 0.0 <= outputs["evaluate"]["metrics"]["eval/win_rate_test_pm"] <= 1.0
