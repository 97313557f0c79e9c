"""Each way of improving the policy raises the demo world's gold over three cycles, on tiny models.

For every ``improve.method``: the demo world (P0 fine-tuned on the mixed
corpus, registered, deployed), then three weekly cycles run stage by stage
with the real worker steps in-process, under the stage protocol (what the
flow runs, without Prefect). A labeler answers every task through the store
by the world's gold preference with 10% coin flips, the training tasks and
the human A/B evaluation's alike, and the gate decides as the demo's does.
The gold score of the policy deployed after the third cycle must beat P0's,
and no deploy may lose gold.

The settings are the demo's own (``demo_cycle_settings``: each method's step
config is there), on one thread, with one rater and a single train PM.

The six methods' first cycles are the same up to improve (only improve reads
``improve.method``), so each test process runs that much once: the world (P0
fine-tuned, 200 steps), then cycle 1's open, sample, gather, snapshot and
train_pm, in a database of its own (``cycle_one``). Each method's test starts
from a copy of that database with ``improve.method`` set in the settings the
open stage recorded, as if the cycle had opened with it, and resumes the
cycle from improve, as a re-run of a cycle that stopped there would.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator.cycle import STAGES, CycleEnv, stored
from orchestrator.demo.command import demo_cycle_settings
from orchestrator.demo.world import WorldConfig, build_world
from orchestrator.flow import stage_task
from orchestrator.outputs import OpenOutputs
from orchestrator.runners import InProcessRunner
from orchestrator.settings import CycleSettings, resolve
from orchestrator.stages import finish, open_stage
from store.artifacts import ArtifactStore
from store.cycles import get_cycle
from store.db import Database
from store.models import Cycle, StageRun
from store.status import summarize_cycle
from tests.conftest import throwaway_database
from tests.orchestrator.fakes import StoreLabeler
from workers import demo_world

WEEKS = ("2027-W10", "2027-W11", "2027-W12")

TEST_CHANGES = {
    "pm": {"config": {"parallel_pms": 1, "ensemble_size": 1}},
    "gather": {"poll_interval_s": 0.05},
    "human_eval": {"poll_interval_s": 0.05},
    "qc": {"gold_share": 0.0, "overlap_share": 0.0},
    "num_threads": 1,
    "stage_retries": 0,
}
"""what the test changes of the demo's settings: one thread, one train PM instead of an ensemble of three (half
the PM training), one rater (no gold or overlap tasks), quick polls"""


def method_settings(method: str) -> CycleSettings:
    """The demo's cycle settings with ``method``, as the test runs them."""
    return resolve(demo_cycle_settings(), {**TEST_CHANGES, "improve": {"method": method}}, trusted=True)


class GoldJudge:
    """A careful rater: the response with the higher gold score, a tie on equal scores, ``noise`` coin flips."""

    def __init__(self, seed: int, noise: float = 0.1):
        self.rng, self.noise = random.Random(seed), noise

    def __call__(self, prompt: str, a: str, b: str) -> str:
        if self.rng.random() < self.noise:
            return self.rng.choice("ab")
        ga, gb = demo_world.gold_score(prompt, a), demo_world.gold_score(prompt, b)
        return "tie" if ga == gb else ("a" if ga > gb else "b")


@dataclass(frozen=True)
class CycleOne:
    """The database cycle 1 ran up to improve in, and where the rater's coin flips stood then."""

    url: str
    judge_state: tuple

    def judge(self) -> GoldJudge:
        """The rater as it stood after cycle 1's gather: the rest of the test flips the coins it would have."""
        judge = GoldJudge(seed=0)
        judge.rng.setstate(self.judge_state)
        return judge


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One artifact store and work folder for the module."""
    root = tmp_path_factory.mktemp("methods")
    return ArtifactStore(str(root / "artifacts")), root / "work"


@pytest.fixture(scope="module")
def cycle_one(pg_url, shared) -> Iterator[CycleOne]:
    """URL of a database holding the world and cycle 1 run up to improve (under the ppo settings), the
    template every method's copy starts from; once per test process."""
    artifacts, work = shared
    with throwaway_database() as url:
        database = Database(url)
        build_world(database, artifacts, work, config=WorldConfig(sft_steps=200), tag="world", num_threads=1)
        env = method_env(database, shared, "ppo", work_dir=work / "cycle-one")
        judge = GoldJudge(seed=0)
        with StoreLabeler(database, rater="careful", judge=judge):
            ctx = open_stage(env, week=WEEKS[0], params=None, trigger="manual", flow_run_id=None)
            for stage in STAGES[1:STAGES.index("improve")]:
                assert not stage_task.fn(ctx, stage).get("halt"), f"cycle {WEEKS[0]} halted at {stage}"
        database.dispose()  # nothing may be connected to a template
        yield CycleOne(url, judge.rng.getstate())


def method_env(database: Database, shared, method: str, *, work_dir: Path) -> CycleEnv:
    artifacts, _ = shared
    return CycleEnv(database, artifacts, work_dir=work_dir, defaults=method_settings(method),
                    runner=InProcessRunner(artifacts, work_dir, num_threads=1))


def open_with(database: Database, week: str, method: str) -> None:
    """Record ``improve.method`` in the settings the week's open stage recorded: what the open stage would
    have recorded had the cycle opened with ``method`` (the rest of the settings are the same)."""
    with database.session() as session:
        run = session.scalar(select(StageRun).join(Cycle).where(Cycle.week == week, StageRun.stage == "open"))
        opened = OpenOutputs.model_validate(run.outputs)
        assert opened.settings == method_settings("ppo"), "cycle one opened with other settings than the tests'"
        run.outputs = stored(opened.model_copy(update={"settings": method_settings(method)}))


def run_cycle(env: CycleEnv, week: str) -> dict:
    """One cycle, every stage under the stage protocol (as the flow runs them; a stage already finished is
    kept); its summary."""
    ctx = open_stage(env, week=week, params=None, trigger="manual", flow_run_id=None)
    for stage in STAGES[1:]:
        if stage_task.fn(ctx, stage).get("halt"):
            raise AssertionError(f"cycle {week} halted at {stage}")
    finish(ctx)
    with env.database.session() as session:
        return summarize_cycle(get_cycle(session, ctx.cycle_id))


@pytest.mark.parametrize("method", ["ppo", "dpo", "online_dpo", "rloo", "grpo", "rejection_sampling"])
def test_each_method_raises_the_gold_of_the_deployed_policy_over_three_cycles(cycle_one, shared, method):
    _, work = shared
    with throwaway_database(template=cycle_one.url) as url:
        database = Database(url)
        try:
            open_with(database, WEEKS[0], method)
            env = method_env(database, shared, method, work_dir=work / method)
            started = time.perf_counter()
            with StoreLabeler(database, rater="careful", judge=cycle_one.judge()):
                rows = [run_cycle(env, week) for week in WEEKS]
            with database.session() as session:
                improved = session.scalars(select(StageRun.outputs).where(StageRun.stage == "improve")).all()
        finally:
            database.dispose()
    golds = [(r["gold_baseline"], r["gold_candidate"], r["deployed"], r["gate_reasons"]) for r in rows]
    print(f"{method}: {time.perf_counter() - started:.0f} s; (deployed gold, candidate gold, deployed, why not): "
          f"{golds}")
    assert all(r["status"] == "succeeded" for r in rows), [r["reason"] for r in rows]
    assert [o["method"] for o in improved] == [method] * 3  # cycle 1's improve too
    # Measured (seed 0, these weeks, one train PM): P0 0.085; the deployed policy ends at 0.34 (grpo) to 0.52
    # (rloo), after one or two deploys.
    p0_gold, final = rows[0]["gold_baseline"], rows[-1]["gold_score"]
    assert final > p0_gold + 0.05, golds
    for r in rows:
        if r["deployed"]:
            assert r["gold_candidate"] >= r["gold_baseline"] - 0.01, golds
