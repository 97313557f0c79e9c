"""Fakes and builders for orchestration tests: a step runner without torch, a store labeler, a tiny world.

``FakeRunner`` honours the ``StepRunner`` contract (inputs localized from the
artifact store, outputs written under a (week, stage)-keyed folder and
uploaded with the real ``InProcessRunner.upload``) but computes nothing: the
tests here are about orchestration (idempotency, crashes, the gate), and the
full-cycle test runs the real workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from datetime import timedelta
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.faults import kill_point
from orchestrator.runners import InProcessRunner, StepFailed, StepOutcome, StepRequest
from orchestrator.settings import CycleSettings
from store.artifacts import ArtifactStore, sha256_bytes
from store.datasets import create_dataset
from store.db import Database
from store.deployments import deploy
from store.feedback import NewComparison, create_feedback_batch
from store.policies import create_policy
from store.tasks import lease_tasks

RESPONSES = (" Sure! Here is how.", " Sorry, I can't help with that.", " Hmm.", " Maybe later.")

GOOD_EVAL = {
    "eval/win_rate_test_pm": 0.7,
    "eval/win_rate_train_pm": 0.72,
    "eval/kl": 0.5,
    "eval/test_pm_delta": 0.3,
    "eval/train_pm_delta": 0.35,
    "eval/gold_candidate": 0.8,
    "eval/gold_baseline": 0.2,
}


def _h(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:4], "big")


class FakeRunner:
    """Runs no model: writes small deterministic outputs, uploads them like the real runner."""

    def __init__(self, artifacts: ArtifactStore, work_dir: str | Path, *, eval_metrics: dict | None = None,
                 fail: dict[str, int] | None = None, candidate_response: str = RESPONSES[0],
                 baseline_responses: tuple[str, ...] = RESPONSES[1:], collapse_below: float = 0.0):
        self.inner = InProcessRunner(artifacts, work_dir)
        self.eval_metrics = dict(GOOD_EVAL if eval_metrics is None else eval_metrics)
        self.candidate_response = candidate_response
        """what the candidate answers every held-out prompt (the store labeler prefers "Sure")"""
        self.baseline_responses = baseline_responses
        """what the deployed policy answers, in turn"""
        self.collapse_below = collapse_below
        """sampled below this temperature, a policy gives one response per prompt (a collapsed policy)"""
        self.fail = dict(fail or {})
        """step -> how many of its next runs raise"""
        self.calls: list[str] = []

    def run(self, request: StepRequest) -> StepOutcome:
        self.calls.append(request.step)
        stage = request.key.split(":")[-1]
        kill_point(stage, "in_step")
        if self.fail.get(request.step, 0) > 0:
            self.fail[request.step] -= 1
            raise StepFailed(f"injected failure of {request.step}")
        config = self.inner.step_config(request)
        out = Path(config["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        outputs, metrics = getattr(self, f"_{request.step}")(config, out)
        uploaded = {name: self.inner.upload(request, name, Path(outputs[name]), None) for name in request.outputs}
        result = {"step": request.step, "output_dir": str(out), "outputs": {k: str(v) for k, v in outputs.items()},
                  "files": {}, "manifests": {}, "metrics": metrics, "complete": True}
        return StepOutcome(result=result, outputs=uploaded, compute_s=0.01)

    @staticmethod
    def _model_dir(path: Path, label: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"fake": label}))
        (path / "model.safetensors").write_bytes(label.encode())
        return path

    def _sample(self, config: dict, out: Path):
        prompts = [json.loads(line) for line in Path(config["prompts_path"]).read_text().splitlines()]
        lines = []
        for label in config["policies"]:
            for p in prompts:
                for k in range(config["num_samples"]):
                    draw = k if config["temperature"] >= self.collapse_below else 0
                    response = RESPONSES[_h(config["seed"], label, p["id"], draw) % len(RESPONSES)]
                    lines.append(json.dumps({"prompt_id": p["id"], "policy": label, "sample_index": k,
                                             "prompt": p["prompt"], "response": response}))
        path = out / "samples.jsonl"
        path.write_text("\n".join(lines) + "\n")
        return {"samples": path}, {"samples/responses": len(lines)}

    def _train_pm(self, config: dict, out: Path):
        data = Path(config["dataset_path"]).read_bytes()
        label = sha256_bytes(data)[:12]
        metrics = {"heldout/accuracy": 0.8, "heldout/decisive": 40, "heldout/ece": 0.05,
                   "data/train_comparisons": data.count(b"\n"), "test_pm/heldout/accuracy": 0.75,
                   "test_pm/heldout/decisive": 40}
        return {"pm": self._model_dir(out / "pm", f"pm-{label}"),
                "test_pm": self._model_dir(out / "test_pm", f"test-pm-{label}")}, metrics

    def _ppo(self, config: dict, out: Path):
        label = f"policy-{config['seed']}-{Path(config['pm_path']).name}"
        metrics = {"ppo/reward": 0.4, "ppo/kl": 0.5, "ppo/episodes": 64,  # ppo reports its own keys and the common ones
                   "policy/reward": 0.4, "policy/kl": 0.5, "policy/episodes": 64}
        return {"policy": self._model_dir(out / "policy", label)}, metrics

    def _dpo(self, config: dict, out: Path):
        label = f"dpo-{config['seed']}-{sha256_bytes(Path(config['dataset_path']).read_bytes())[:12]}"
        return {"policy": self._model_dir(out / "policy", label)}, {"losses/dpo": 0.6, "eval/heldout_accuracy": 0.7}

    def _sampling_method(self, name: str, config: dict, out: Path):
        label = f"{name}-{config['seed']}-{Path(config['pm_path']).name}"
        return {"policy": self._model_dir(out / "policy", label)}, {"policy/reward": 0.3, "policy/kl": 0.2,
                                                                   "policy/episodes": 32}

    def _online_dpo(self, config: dict, out: Path):
        return self._sampling_method("online-dpo", config, out)

    def _rloo(self, config: dict, out: Path):
        return self._sampling_method(f"rloo-{config['estimator']}", config, out)

    def _rejection_sampling(self, config: dict, out: Path):
        return self._sampling_method("rs", config, out)

    def _evaluate(self, config: dict, out: Path):
        path = out / "report.json"
        path.write_text(json.dumps({"metrics": self.eval_metrics}))
        prompts = [json.loads(line) for line in Path(config["prompts_path"]).read_text().splitlines()]
        rows = []
        for i, p in enumerate(prompts):
            for k in range(config.get("num_samples", 1)):
                baseline = self.baseline_responses[(i + k) % len(self.baseline_responses)]
                rows.append(json.dumps({"prompt_id": p["id"], "sample": k, "candidate": {"response": self.candidate_response},
                                        "baseline": {"response": baseline}}))
        samples = out / "samples.jsonl"
        samples.write_text("\n".join(rows) + "\n")
        return {"report": path, "samples": samples}, dict(self.eval_metrics)


def fast_settings(**changes: Any) -> CycleSettings:
    """Cycle settings for orchestration tests: tiny, no waiting, no retry delay."""
    base = {
        "sample": {"prompts_per_cycle": 6, "config": {"num_samples": 3}},
        "gather": {"min_comparisons": 5, "all_tasks": True, "deadline_s": 60, "poll_interval_s": 0.05},
        "stage_retries": 1,
        "retry_delay_s": 0,
        "evaluate": {"prompt_set": "eval-prompts"},
        "human_eval": {"min_comparisons": 3, "deadline_s": 60, "poll_interval_s": 0.05},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return CycleSettings.model_validate(base)


def fake_world(database: Database, artifacts: ArtifactStore, work_dir: Path, *, prompts: int = 12,
               target: str = "default") -> int:
    """Prompt sets and a deployed fake P0 (a model folder with no real weights) of deployment target ``target``;
    returns P0's id. Another target's are its own, named as its cycles look for them by default
    (``prompts@<target>``, ``eval-prompts@<target>``; P0 ``policy@<target>``), with prompts of their own."""
    own = "" if target == "default" else f"@{target}"
    about = "" if target == "default" else f" for {target}"
    with database.session() as session:
        for name, n in ((f"prompts{own}", prompts), (f"eval-prompts{own}", 4)):
            body = "".join(json.dumps({"id": f"{name}-{i}", "prompt": f"\n\nHuman: question {i}{about}?\n\nAssistant:"})
                           + "\n" for i in range(n)).encode()
            ref = artifacts.put_bytes(f"datasets/{name}.jsonl", body)
            create_dataset(session, name=name, kind="prompts", content_sha256=ref.sha256, row_count=n, artifact=ref)
        folder = "p0" if target == "default" else f"p0-{target}"
        model = FakeRunner._model_dir(work_dir / folder, folder)
        policy = create_policy(session, name=f"policy{own}", base_model="fake",
                               artifact=artifacts.put_dir(f"world/{folder}", model))
        deploy(session, policy_id=policy.id, name=target, reason="P0", actor="test")
        return policy.id


class StoreLabeler:
    """Answers open comparison tasks straight through the store (a labeling tool without HTTP).

    Every committed batch id is appended to ``ack_path`` (when given) after
    the commit, so a test can check that no acknowledged comparison was lost.
    """

    def __init__(self, database: Database, *, ack_path: Path | None = None, rater: str = "store-labeler",
                 prefers: str = "Sure", judge: Callable[[str, str, str], str] | None = None):
        self.database = database
        self.prefers = prefers
        """the labeler prefers the response containing this (B when neither or both do)"""
        self.judge = judge or (lambda prompt, a, b: "a" if self.prefers in a else "b")
        """(prompt, response A, response B) -> a, b or tie (default: by ``prefers``)"""
        self.ack_path = ack_path
        self.rater = rater
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="store-labeler")

    def label_once(self) -> int:
        with self.database.session() as session:
            tasks = [leased.task for leased in lease_tasks(session, rater_id=self.rater, limit=50,
                                                           lease=timedelta(minutes=5))]
            if not tasks:
                return 0
            comparisons = [
                NewComparison(prompt=t.prompt, response_a=t.response_a, response_b=t.response_b,
                              choice=self.judge(t.prompt, t.response_a, t.response_b), rater_id=self.rater,
                              task_id=t.id)
                for t in tasks
            ]
            batch, _ = create_feedback_batch(session, source="store-labeler", comparisons=comparisons)
            batch_id = batch.id
        if self.ack_path is not None:
            with open(self.ack_path, "a") as fh:
                fh.write(f"{batch_id}\n")
                fh.flush()
                os.fsync(fh.fileno())
        return len(comparisons)

    def _loop(self) -> None:
        while not self.stop.is_set():
            if not self.label_once():
                self.stop.wait(0.05)

    def __enter__(self) -> StoreLabeler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def wait_for(predicate, timeout_s: float = 30.0, interval_s: float = 0.05) -> None:
    """Poll ``predicate`` until it is true (fails the test after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval_s)
