"""``ratchet demo``: N full cycles of iterated online RLHF on the demo world, end to end.

Everything is the real system, embedded in one process:

- the store: SQLite under ``$RATCHET_HOME/demo`` (recreated each run), or the
  database ``RATCHET_DATABASE_URL`` names (PostgreSQL: the demo adds to it);
- Prefect: the API ``PREFECT_API_URL`` names, else Prefect's temporary local
  server (started once, up front);
- the REST API, served by uvicorn on a free loopback port in a thread, with a
  launcher that runs each cycle's flow in a thread of this process;
- simulated raters, each with its own labeler key, that fetch comparison
  tasks and post feedback batches over HTTP (``orchestrator.demo.labeler``):
  a careful one, a noisier one and a bad one answering at random
  (``--raters all``, the default), or the careful one alone (``one``).

The demo builds the world (P0 fine-tuned, registered and deployed),
registers gold comparisons made from the world (``POST
/v1/gold-comparisons``, as an operator would), then for each simulated week
triggers a cycle with ``POST /v1/cycles`` and follows it with ``GET
/v1/cycles/{id}`` until it finishes. Quality control (``DEMO_QC``) flags the
bad rater on its gold answers and agreement, and each snapshot leaves its
comparisons out, unless ``qc=False`` (``--no-qc``: flagged, but kept). The
summary ends with each rater's numbers from ``GET /v1/raters``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.demo.labeler import CAREFUL, DEMO_RATERS, RaterProfile, SimulatedLabeler
from orchestrator.report import cycle_summary
from orchestrator.settings import METHODS, CycleSettings, Method, resolve, shift_week, week_monday, week_of
from orchestrator.cycle import STAGES, CycleEnv
from orchestrator.demo.world import GOLD, WorldConfig, build_world, gold_pairs
from store.artifacts import ArtifactStore
from store.cycles import list_cycles
from store.db import Database, open_database, upgrade
from store.errors import InvalidInput
from store.keys import create_api_key
from store.settings import Settings

log = logging.getLogger(__name__)

RaterSet = Literal["all", "one"]
"""the demo's raters: ``all`` (careful, noisy, random) or ``one`` (the careful one)"""

DEMO_QC = {
    "gold_share": 0.15,
    "overlap_share": 0.2,
    "min_gold_answers": 8,
    "min_gold_accuracy": 0.7,
    "gold_confidence": 0.99,
    "min_agreement_pairs": 100,
    "min_agreement": 0.1,
}
"""Quality control of the demo's raters (``store.raters.QCPolicy``).

On gold tasks (clear winners) the careful rater is right ~95% of the time,
the noisy one ~82.5% and the random one a third. Raters are checked after
every answer, from the 8th gold one: a rater is flagged once the 99% upper
bound of its gold accuracy is under 0.7. Simulated over a rater's first 60
gold answers (50,000 runs each), that flags the noisy rater in 0.2% of runs
and leaves the random one unflagged past 40 gold answers in 0.25% (median:
flagged at its 9th). Flagging on the share itself (under 0.6 after 8) flags
the noisy rater in 7.6% of runs: its first few answers are a short run.

Agreement is measured against the raters gold has not flagged
(``store.raters.rater_stats``): the careful and the noisy rater against each
other (agreeing on about 4 answers in 5, a kappa near 0.5), the random one
against them (kappa near 0). 0.1 after 100 pairs sits well clear of both, so
kappa backs up what gold shows rather than deciding alone.
"""

GOLD_ITEMS = 60
"""gold comparisons the demo registers before its cycles"""

RATER_BATCH = 20
"""tasks a simulated rater leases at a time: small, so the raters share a cycle's tasks"""


def demo_cycle_settings() -> CycleSettings:
    """Cycle settings sized for the demo world on a 2-core CPU (~30 s a cycle)."""
    return CycleSettings.model_validate(
        {
            "prompt_set": "prompts",
            "sample": {"prompts_per_cycle": 240, "config": {"num_samples": 4, "max_new_tokens": 32, "batch_size": 128}},
            "gather": {"min_comparisons": 200, "all_tasks": True, "deadline_s": 300, "poll_interval_s": 0.25},
            "pm": {"config": {"learning_rate": 1e-3, "batch_size": 32, "max_steps": 40, "max_length": 96,
                              "heldout_fraction": 0.15, "ensemble_size": 3, "test_ensemble_size": 1, "parallel_pms": 2}},
            "improve": {"method": "ppo", "kl_anchor": "deployed"},
            # Each method's step at the same scale as PPO's (about as many responses sampled and trained on,
            # the same learning rate where the update is a policy gradient); only the cycle's method runs.
            "ppo": {
                "config": {"total_episodes": 768, "rollout_batch_size": 32, "mini_batch_size": 16, "ppo_epochs": 4,
                           "response_length": 32, "kl_coef": 0.05, "learning_rate": 1e-4, "lam": 1.0},
            },
            "dpo": {"config": {"beta": 0.1, "learning_rate": 3e-4, "batch_size": 32, "max_steps": 40, "max_length": 96}},
            "online_dpo": {"config": {"rounds": 6, "prompts_per_round": 64, "response_length": 32, "beta": 0.1,
                                      "learning_rate": 2e-4, "epochs": 2, "batch_size": 16}},
            "rloo": {"config": {"total_episodes": 768, "prompts_per_rollout": 8, "k": 4, "mini_batch_size": 16,
                                "epochs": 2, "response_length": 32, "kl_coef": 0.05, "learning_rate": 1e-4}},
            "grpo": {"config": {"total_episodes": 768, "prompts_per_rollout": 8, "k": 4, "mini_batch_size": 16,
                                "epochs": 2, "response_length": 32, "kl_coef": 0.05, "learning_rate": 1e-4}},
            "rejection_sampling": {"config": {"rounds": 3, "prompts_per_round": 96, "n": 4, "response_length": 32,
                                              "sft_steps_per_round": 8, "batch_size": 32, "learning_rate": 3e-4}},
            "evaluate": {"prompt_set": "eval-prompts",
                         "config": {"num_samples": 2, "max_new_tokens": 32, "batch_size": 64}},
            "human_eval": {"min_comparisons": 50, "deadline_s": 300, "poll_interval_s": 0.25},
            "gate": {"win_margin": 0.02, "kl_budget": 10.0, "max_pm_gap": 0.2},
            "qc": DEMO_QC,
            "gold": GOLD,
            "device": "cpu",
            "num_threads": 2,
            "stage_retries": 1,
            "retry_delay_s": 1.0,
        }
    )


def for_raters(settings: CycleSettings, *, raters: RaterSet, qc: bool) -> CycleSettings:
    """``settings`` for the demo's raters: with ``qc`` off, flagged raters stay in snapshots
    (``qc.exclude_flagged``); with one rater, no overlap tasks (there is no other rater to agree with)."""
    overrides: dict[str, Any] = {}
    if not qc:
        overrides["exclude_flagged"] = False
    if len(DEMO_RATERS[raters]) < 2:
        overrides["overlap_share"] = 0.0
    return resolve(settings, {"qc": overrides}, trusted=True) if overrides else settings


def demo_raters(raters: RaterSet, *, noise: float, suffix: str = "") -> list[RaterProfile]:
    """The profiles of the demo's raters: the careful one with ``noise``, ids ending in ``suffix``."""
    return [dataclasses.replace(p, rater_id=p.rater_id + suffix, noise=noise if p is CAREFUL else p.noise)
            for p in DEMO_RATERS[raters]]


def register_demo_gold(client: httpx.Client, *, n: int = GOLD_ITEMS, seed: int = 0) -> int:
    """Register ``n`` gold comparisons made from the world through the API (``client`` has an operator key)."""
    response = client.post("/v1/gold-comparisons", json={"comparisons": gold_pairs(n, seed=seed)})
    if response.status_code != 201:
        raise RuntimeError(f"POST /v1/gold-comparisons answered {response.status_code}: {response.text}")
    return response.json()["count"]


def rater_qc(client: httpx.Client, rater_ids: list[str]) -> list[dict[str, Any]]:
    """Each of ``rater_ids``' quality-control numbers from ``GET /v1/raters`` (``client`` has an operator key)."""
    response = client.get("/v1/raters", params={"cycles": 0})
    response.raise_for_status()
    found = {r["rater_id"]: r for r in response.json()["data"]}
    keys = ("rater_id", "answered", "gold_answered", "gold_accuracy", "agreement_pairs", "kappa", "flagged", "flags",
            "excluded")
    return [{k: found[r][k] for k in keys} for r in rater_ids if r in found]


def seeded(settings: CycleSettings, seed: int) -> CycleSettings:
    """``settings`` with the PM, policy-improvement (of every method) and evaluation seeds set to ``seed``."""
    params = {name: {"config": {"seed": seed}} for name in ("pm", *METHODS, "evaluate")}
    return resolve(settings, params, trusted=True)


def with_method(settings: CycleSettings, method: Method) -> CycleSettings:
    """``settings`` with the improve stage's method set to ``method``."""
    return resolve(settings, {"improve": {"method": method}}, trusted=True)


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo keeps its store, artifacts and worker outputs."""

    database_url: str
    artifacts_url: str
    work_dir: Path
    fresh: bool
    """True when the demo owns a fresh embedded store"""


def demo_paths(settings: Settings) -> DemoPaths:
    """The demo's store: a fresh SQLite home under RATCHET_HOME/demo, or the configured database."""
    home = (settings.home / "demo").resolve()
    if settings.database_url:
        work = home / "work"
        shutil.rmtree(work, ignore_errors=True)
        return DemoPaths(settings.database_url, settings.artifacts_url or str(home / "artifacts"), work, fresh=False)
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    return DemoPaths(f"sqlite:///{home / 'ratchet.db'}", str(home / "artifacts"), home / "work", fresh=True)


def free_weeks(database: Database, n: int, *, now: datetime | None = None, start: str | None = None) -> list[str]:
    """``n`` consecutive weeks for simulated cycles.

    From ``start`` when given (every one of the weeks must be free in the
    store, else ``InvalidInput`` names the taken ones); otherwise from this
    week, or after the newest cycle in the store.
    """
    with database.session() as session:
        weeks = [c.week for c in list_cycles(session, limit=100_000)]
    if start is not None:
        wanted = [shift_week(start, i) for i in range(n)]
        taken = sorted(set(wanted) & set(weeks), key=week_monday)
        if taken:
            raise InvalidInput(
                f"the store already has cycles for {', '.join(taken)}; pick another --start-week "
                "(or leave it out to continue after the newest cycle)"
            )
        return wanted
    first = week_of(now or datetime.now(UTC))
    if weeks:
        latest = max(weeks, key=week_monday)
        first = max(first, shift_week(latest, 1), key=week_monday)
    return [shift_week(first, i) for i in range(n)]


class ApiThread:
    """The API app served by uvicorn on a loopback port, in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True, name="api")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the demo's API server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_prefect() -> str:
    """The Prefect API to use: PREFECT_API_URL, or Prefect's temporary local server (started now)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return PREFECT_API_URL.value()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the process-wide instance Prefect's client uses without an API URL
    server.start(timeout=120)
    return server.api_url


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def run_demo(
    settings: Settings,
    *,
    cycles: int,
    console: Console,
    world_config: WorldConfig = WorldConfig(),
    cycle_settings: CycleSettings | None = None,
    labeler_noise: float = 0.1,
    raters: RaterSet = "all",
    qc: bool = True,
    gold_items: int = GOLD_ITEMS,
    start_week: str | None = None,
    seed: int = 0,
    method: Method = "ppo",
) -> dict[str, Any]:
    """Build the world, run ``cycles`` cycles through the API, and return the summary.

    The simulated weeks start at ``start_week`` (default: this week, or after
    the newest cycle in the store). ``seed`` seeds everything the week does
    not: P0's initial weights and fine-tuning, the raters' judgements, the
    gold comparisons, and the PM, PPO and evaluation runs, so a run is
    replayed by its start week and seed (up to which rater leases which
    task first, and where the server places gold tasks). ``labeler_noise``
    is the careful rater's share of coin flips; ``raters`` and ``qc`` as in
    ``for_raters``; ``gold_items`` gold comparisons are registered first;
    ``method`` is the improve stage's (``improve.method``).
    """
    from api.app import create_app
    from orchestrator.flow import use_env
    from orchestrator.launcher import ThreadLauncher

    t_start = time.perf_counter()
    paths = demo_paths(settings)
    upgrade(paths.database_url)
    database = open_database(paths.database_url)
    artifacts = ArtifactStore(paths.artifacts_url)
    defaults = seeded(with_method(for_raters(cycle_settings or demo_cycle_settings(), raters=raters, qc=qc), method), seed)
    world_config = dataclasses.replace(world_config, seed=seed)
    shown = database.engine.url.render_as_string(hide_password=True)
    console.print(f"[bold]Ratchet demo[/bold]: store {shown}{' (fresh)' if paths.fresh else ''}, artifacts {paths.artifacts_url}")
    weeks = free_weeks(database, cycles, start=start_week)

    # 1. The world: prompt sets, P0 fine-tuned, registered, deployed; Prefect starts meanwhile.
    _build_world_while_prefect_starts(database, artifacts, paths.work_dir, console, world_config,
                                      tag=f"world-{weeks[0]}")
    # 2. The API with a cycle launcher; the raters label through it while the cycles run.
    env = CycleEnv(database, artifacts, work_dir=paths.work_dir, defaults=defaults)
    api_settings = settings.model_copy(update={"database_url": paths.database_url, "artifacts_url": paths.artifacts_url})
    launcher = ThreadLauncher(database, defaults)
    with use_env(env):
        server = ApiThread(create_app(api_settings, database=database, artifacts=artifacts, cycle_launcher=launcher))
        server.start()
        console.print(f"REST API at {server.url}")
        run = _run_with_raters(server, database, console, weeks, fresh=paths.fresh, raters=raters,
                               labeler_noise=labeler_noise, qc=qc, gold_items=gold_items, seed=seed)
    database.dispose()
    return _demo_result(run, weeks=weeks, labeler_noise=labeler_noise, raters=raters, qc=qc, method=method,
                        seed=seed, t_start=t_start, shown=shown, public_url=settings.public_url)


@dataclass(frozen=True)
class _DemoRun:
    """What the raters and the cycles leave for the demo's summary."""

    summaries: list[dict[str, Any]]
    """each cycle's summary (``_run_one``), in week order, up to the first that did not succeed"""
    labelers: list[SimulatedLabeler]
    gold_registered: int
    """gold comparisons registered before the cycles"""
    rater_rows: list[dict[str, Any]]
    """each rater's quality-control numbers at the end (``rater_qc``)"""


def _build_world_while_prefect_starts(
    database: Database, artifacts: ArtifactStore, work_dir: Path, console: Console, world_config: WorldConfig,
    *, tag: str,
) -> None:
    """Build the demo world while Prefect starts in a thread (its temporary local server unless
    PREFECT_API_URL is set: a process of its own, on the other core)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefect-start") as pool:
        prefect_started = pool.submit(start_prefect)
        with console.status("building the demo world: tokenizer, tiny GPT-2, fine-tuning P0 on the mixed corpus"):
            # one thread: the other core is Prefect's while it starts
            world = build_world(database, artifacts, work_dir, config=world_config, tag=tag, num_threads=1)
        console.print(
            f"P0 fine-tuned in {world.compute_s:.1f} s (loss {world.sft_metrics.get('train/loss_last', float('nan')):.3f}); "
            f"registered as policy v{world.policy_version} and deployed"
        )
        with console.status("starting Prefect (its temporary local server unless PREFECT_API_URL is set)"):
            prefect_api = prefect_started.result()
    console.print(f"Prefect API at {prefect_api}")


def _run_with_raters(
    server: ApiThread, database: Database, console: Console, weeks: list[str], *, fresh: bool, raters: RaterSet,
    labeler_noise: float, qc: bool, gold_items: int, seed: int,
) -> _DemoRun:
    """The raters labeling through ``server``, the gold comparisons, one cycle a week (up to the first that does
    not succeed) and what quality control made of each rater; then, whether those succeeded or not, stops the
    raters and ``server``."""
    suffix = weeks[0].lower()
    # A fresh store's raters are named by their kind; in a store that has others, by the first week too
    # (a rater id belongs to the key it first leased under).
    profiles = demo_raters(raters, noise=labeler_noise, suffix="" if fresh else f"-{suffix}")
    operator, labelers = _keyed_labelers(database, server.url, profiles, suffix=suffix, seed=seed)
    stop = threading.Event()
    threads = [threading.Thread(target=labeler.run, args=(stop,), kwargs={"poll_interval_s": 0.2}, daemon=True,
                                name=f"labeler-{labeler.rater_id}") for labeler in labelers]
    client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {operator}"}, timeout=30)
    summaries: list[dict[str, Any]] = []
    try:
        gold_registered = register_demo_gold(client, n=gold_items, seed=seed) if gold_items else 0
        console.print(
            f"{gold_registered} gold comparisons registered; raters "
            + ", ".join(f"{p.rater_id} ({_profile(p)})" for p in profiles)
            + f"; quality control {'leaves flagged raters out' if qc else 'flags raters but leaves none out'}"
        )
        for thread in threads:
            thread.start()
        # 3. One cycle per simulated week, triggered and followed through the API.
        for index, week in enumerate(weeks, start=1):
            summaries.append(_run_one(client, database, console, index, week, len(weeks)))
            if summaries[-1]["status"] != "succeeded":
                break
        # 4. What quality control made of each rater.
        rater_rows = rater_qc(client, [p.rater_id for p in profiles])
    finally:
        stop.set()
        for thread in threads:
            if thread.is_alive():
                thread.join(timeout=10)
        for labeler in labelers:
            labeler.close()
        client.close()
        server.stop()
    return _DemoRun(summaries, labelers, gold_registered, rater_rows)


def _keyed_labelers(
    database: Database, url: str, profiles: list[RaterProfile], *, suffix: str, seed: int
) -> tuple[str, list[SimulatedLabeler]]:
    """A new operator key, and a simulated labeler of the API at ``url`` with a new key of its own for each of
    ``profiles``."""
    with database.session() as session:
        operator = create_api_key(session, name=f"demo-operator-{suffix}", role="operator")[1]
        tokens = {p.rater_id: create_api_key(session, name=p.rater_id, role="labeler")[1] for p in profiles}
    from workers.demo_world import gold_score

    labelers = [SimulatedLabeler.of(p, url, tokens[p.rater_id], gold=gold_score, seed=seed,
                                    batch_size=RATER_BATCH) for p in profiles]
    return operator, labelers


def _demo_result(
    run: _DemoRun, *, weeks: list[str], labeler_noise: float, raters: RaterSet, qc: bool, method: Method, seed: int,
    t_start: float, shown: str, public_url: str,
) -> dict[str, Any]:
    """The demo's summary: a row a cycle (with the address of its dashboard page under ``public_url``,
    RATCHET_PUBLIC_URL), the gold scores before and after, the raters' work and QC numbers."""
    summaries, labelers = run.summaries, run.labelers
    rows = [{**_cycle_row(i, s), "page": f"{public_url.rstrip('/')}/dashboard/cycles/{s['cycle_id']}"}
            for i, s in enumerate(summaries, start=1)]
    return {
        "cycles": rows,
        "gold_score_initial": summaries[0]["gold_baseline"] if summaries else None,
        "gold_score_final": rows[-1]["gold_score"] if rows else None,
        "labeler": {
            "comparisons": sum(x.stats.comparisons for x in labelers),
            "batches": sum(x.stats.batches for x in labelers),
            "noise": labeler_noise,
            "raters": {x.rater_id: {"kind": x.kind, "noise": x.noise, "comparisons": x.stats.comparisons,
                                    "batches": x.stats.batches, "errors": len(x.stats.errors)} for x in labelers},
        },
        "raters": raters,
        "qc": qc,
        "method": method,
        "gold_registered": run.gold_registered,
        "rater_qc": run.rater_rows,
        "start_week": weeks[0],
        "seed": seed,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "store": shown,
    }


def _cycle_row(i: int, s: dict[str, Any]) -> dict[str, Any]:
    """The summary's row for cycle ``i`` (from 1), from its ``_run_one`` summary ``s``."""
    return {
        "cycle": i,
        "week": s["week"],
        "status": s["status"],
        "pm_accuracy": s["pm_accuracy"],
        "test_pm_accuracy": s["test_pm_accuracy"],
        "method": s["method"],
        "policy_reward": s["policy_reward"],
        "kl": s["kl"],
        "eval_kl": s["eval_kl"],
        "win_rate": s["win_rate"],
        "human_win_rate": s["human_win_rate"],
        "human_lower_bound": s["human_lower_bound"],
        "human_answers": s["human_answers"],
        "elo": s["elo_candidate"] if s["deployed"] else s["elo_baseline"],
        "policy_reward_spread": s["policy_reward_spread"],
        "tasks": s["tasks"],
        "top_up_rounds": s["top_up_rounds"],
        "gather_outcome": s["gather_outcome"],
        "deployed": s["deployed"],
        "gold_score": s["gold_score"],
        "policy_version": s["policy_version"],
        "comparisons": s["comparisons"],
        "excluded_raters": s["excluded_raters"],
        "excluded_comparisons": s["excluded_comparisons"],
        "reason": s["reason"],
    }


def _profile(p: RaterProfile) -> str:
    return "random" if p.kind == "random" else f"gold, {p.noise:g} coin flips"


def _run_one(client: httpx.Client, database: Database, console: Console, index: int, week: str, total: int) -> dict:
    started = client.post("/v1/cycles", json={"week": week})
    if started.status_code not in (200, 202):
        raise RuntimeError(f"POST /v1/cycles answered {started.status_code}: {started.text}")
    cycle_id = started.json()["cycle"]["id"]
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[stage]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(f"cycle {index}/{total} ({week})", total=len(STAGES), stage="open")
        while True:
            body = client.get(f"/v1/cycles/{cycle_id}").json()
            done = [s for s in body["stages"] if s["status"] in ("succeeded", "skipped")]
            running = [s["stage"] for s in body["stages"] if s["status"] in ("running", "failed")]
            label = running[-1] if running else (done[-1]["stage"] if done else "open")
            if any(s["status"] == "failed" for s in body["stages"]):
                label += " (retrying)"
            progress.update(bar, completed=len(done), stage=label)
            if body["status"] != "running":
                progress.update(bar, stage=body["status"])
                break
            time.sleep(0.5)
    summary = cycle_summary(database, cycle_id)
    snapshot = next((s["outputs"] for s in body["stages"] if s["stage"] == "snapshot"), None) or {}
    excluded = snapshot.get("excluded_raters") or []
    summary["excluded_raters"] = [e["rater_id"] for e in excluded]
    summary["excluded_comparisons"] = sum(e["comparisons"] for e in excluded)
    if excluded:
        console.print("  quality control left out " + ", ".join(
            f"{e['rater_id']} ({e['comparisons']} comparisons: {e['reason']})" for e in excluded))
    if summary["status"] == "succeeded":
        verdict = "[green]deployed[/green]" if summary["deployed"] else "[yellow]kept the deployed policy[/yellow]"
        console.print(
            f"  PM accuracy {_fmt(summary['pm_accuracy'])}, {summary['method']} reward {_fmt(summary['policy_reward'])}, "
            f"KL {_fmt(summary['kl'])}, test-PM win rate {_fmt(summary['win_rate'])}, human win rate "
            f"{_fmt(summary['human_win_rate'])} (bound {_fmt(summary['human_lower_bound'])}, "
            f"{_fmt(summary['human_answers'])} answers): {verdict}; gold {_fmt(summary['gold_score'])}"
        )
        if not summary["deployed"]:
            console.print(f"  [dim]{summary['reason']}[/dim]")
    else:
        console.print(f"  [red]cycle {week} {summary['status']}[/red]: {summary['reason']}")
    return summary


def summary_table(result: dict[str, Any]) -> Table:
    """The demo's summary as a rich table."""
    table = Table(title="Ratchet demo: one row per cycle (gold: of the policy deployed at the end of the cycle)",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, show_edge=False)
    # people: the human win rate and its lower bound; PM win: the test PM's win rate
    for column in ("#", "week", "PM acc", "reward", "KL", "PM win", "people", "deploy", "Elo", "gold"):
        table.add_column(column, justify="right", no_wrap=True, min_width=max(len(column), 4))
    table.add_row("0", "-", "-", "-", "-", "-", "-", "P0", "0", _fmt(result["gold_score_initial"]))
    table.caption = "people: human win rate of the candidate (its lower bound); PM win: its test-PM win rate"
    for row in result["cycles"]:
        people = "-" if row["human_win_rate"] is None else f"{row['human_win_rate']:.2f} ({_fmt(row['human_lower_bound'], 2)})"
        table.add_row(
            str(row["cycle"]), row["week"], _fmt(row["pm_accuracy"], 2), _fmt(row["policy_reward"], 2), _fmt(row["kl"], 2),
            _fmt(row["win_rate"], 2), people, _fmt(row["deployed"]) if row["status"] == "succeeded" else row["status"],
            _fmt(row["elo"], 0), _fmt(row["gold_score"]),
        )
    return table


def rater_table(result: dict[str, Any]) -> Table:
    """Each rater's quality-control numbers at the end of the demo, as a rich table."""
    table = Table(title="Raters: what quality control made of them (GET /v1/raters)", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True, show_edge=False)
    for column in ("rater", "answered", "gold acc", "gold n", "kappa", "pairs", "flagged", "excluded"):
        table.add_column(column, justify="left" if column == "rater" else "right", no_wrap=True)
    for row in result["rater_qc"]:
        table.add_row(row["rater_id"], str(row["answered"]), _fmt(row["gold_accuracy"], 2), str(row["gold_answered"]),
                      _fmt(row["kappa"], 2), str(row["agreement_pairs"]), _fmt(row["flagged"]), _fmt(row["excluded"]))
    flagged = [f"{row['rater_id']}: {'; '.join(row['flags'])}" for row in result["rater_qc"] if row["flags"]]
    table.caption = "\n".join(flagged) if flagged else "no rater flagged"
    return table


def json_line(result: dict[str, Any]) -> str:
    """The summary as one JSON line (the last line of ``ratchet demo --json``)."""
    keys = ("cycle", "week", "pm_accuracy", "policy_reward", "kl", "win_rate", "human_win_rate", "human_lower_bound",
            "human_answers", "elo", "tasks", "top_up_rounds", "gather_outcome", "deployed", "gold_score",
            "comparisons", "excluded_raters", "excluded_comparisons", "status", "reason")
    payload = {
        "start_week": result["start_week"],
        "seed": result["seed"],
        "raters": result["raters"],
        "qc": result["qc"],
        "method": result["method"],
        "rater_qc": result["rater_qc"],
        "cycles": [{k: row[k] for k in keys} for row in result["cycles"]],
        "gold_score_initial": result["gold_score_initial"],
        "gold_score_final": result["gold_score_final"],
        "wall_s": result["wall_s"],
    }
    return json.dumps(payload, sort_keys=False)
