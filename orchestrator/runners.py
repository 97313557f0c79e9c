"""Step runners: how the orchestrator runs a worker step.

A ``StepRequest`` names the step, its config, its inputs by config field
(the artifacts the step reads: a runner verifies them and hands the step
their local paths in those fields), the outputs to upload, and the (cycle,
stage) key. A runner returns a ``StepOutcome``: the
step's result (``StepResult.to_dict()``), the uploaded outputs as artifact
refs, and the step's own compute time.

- ``InProcessRunner`` (local use, tests, the demo): imports
  ``workers.<step>`` only when it runs one, so the orchestrator never loads
  torch at import time; inputs on a local artifact store are read in place,
  others are fetched (checksums verified) into a content-addressed cache.
- ``DeploymentRunner`` (production): ``run_deployment`` of the step's own
  Prefect deployment on the ``gpu`` work pool, idempotency key
  ``"<week>:<stage>"`` (``"<week>@<target>:<stage>"`` for a deployment
  target other than "default"), tagged with the cycle's week and target
  (``cycle_tags``), so a cancel finds one cycle's step runs; that flow (``orchestrator.worker_flows``) runs the
  step with an ``InProcessRunner`` on the GPU node and writes the outcome
  next to the outputs, where this runner reads it.

Output directories and upload keys are both keyed by (target, week, stage): a step
re-run after a crash resumes or reuses its output directory, and its uploads
land on the same keys.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from store.artifacts import ArtifactRef, ArtifactStore

log = logging.getLogger(__name__)

STEPS: dict[str, tuple[str, str]] = {
    "sample": ("workers.sample", "SampleConfig"),
    "train_pm": ("workers.train_pm", "TrainPMConfig"),
    "ppo": ("workers.ppo", "PPOConfig"),
    "dpo": ("workers.dpo", "DPOConfig"),
    "online_dpo": ("workers.online_dpo", "OnlineDPOConfig"),
    "rloo": ("workers.rloo", "RLOOConfig"),
    "rejection_sampling": ("workers.rejection_sampling", "RejectionSamplingConfig"),
    "evaluate": ("workers.evaluate", "EvaluateConfig"),
    "sft": ("workers.sft", "SFTConfig"),
}
"""worker steps: name -> (module, config class)"""

RESULT_FILENAME = "result.json"


def cycle_tags(week: str, target: str) -> list[str]:
    """The Prefect tags that say which cycle a step's flow run belongs to: ``week:<week>`` and
    ``target:<target>`` (``orchestrator.operations`` cancels one cycle's step runs by both)."""
    return [f"week:{week}", f"target:{target}"]


class StepFailed(RuntimeError):
    """A worker step did not produce its outputs."""


@dataclass(frozen=True)
class StepRequest:
    """One run of a worker step for a (cycle, stage)."""

    step: str
    """the worker step (a key of ``STEPS``)"""
    key: str
    """idempotency key, ``"<week>:<stage>"`` (``"<week>@<target>:<stage>"`` for a target other than "default")"""
    config: dict[str, Any]
    """the step's config fields other than its inputs; output_dir is filled in by the runner"""
    inputs: dict[str, ArtifactRef]
    """the config fields that name an input, with the artifact each reads (checked on fetch)"""
    outputs: list[str]
    """named outputs of the step's result to upload"""
    artifact_prefix: str
    """artifact key the outputs are uploaded under (``cycles/<week>/<stage>``)"""
    input_sets: dict[str, dict[str, ArtifactRef]] = field(default_factory=dict)
    """the config fields that name several inputs by label (sample's ``policies``), with their artifacts"""
    tags: list[str] = field(default_factory=list)
    """Prefect tags of the step's flow run that say whose it is (``cycle_tags``: week and target; none for a step
    run outside a cycle, whose week the runner reads off the key)"""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (a Prefect deployment parameter)."""
        return {
            "step": self.step,
            "key": self.key,
            "config": self.config,
            "inputs": {name: vars(ref) for name, ref in self.inputs.items()},
            "input_sets": {name: {label: vars(ref) for label, ref in refs.items()} for name, refs in self.input_sets.items()},
            "outputs": list(self.outputs),
            "artifact_prefix": self.artifact_prefix,
            "tags": list(self.tags),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepRequest:
        return cls(
            step=data["step"],
            key=data["key"],
            config=dict(data["config"]),
            inputs={name: ArtifactRef(**ref) for name, ref in data["inputs"].items()},
            input_sets={name: {label: ArtifactRef(**ref) for label, ref in refs.items()}
                        for name, refs in data.get("input_sets", {}).items()},
            outputs=list(data["outputs"]),
            artifact_prefix=data["artifact_prefix"],
            tags=list(data.get("tags", [])),
        )

    def step_config(self, path_of: Callable[[ArtifactRef], str]) -> dict[str, Any]:
        """The step's config with each input field set to ``path_of`` its artifact (a local path, or its URI
        for the record)."""
        return {
            **self.config,
            **{name: path_of(ref) for name, ref in self.inputs.items()},
            **{name: {label: path_of(ref) for label, ref in refs.items()} for name, refs in self.input_sets.items()},
        }

    def recorded_config(self) -> dict[str, Any]:
        """The config as the store records it beside a version: inputs as their artifact URIs."""
        return self.step_config(lambda ref: ref.uri)

    @property
    def work_subdir(self) -> str:
        """The step's output directory under a runner's work dir: the key as a path."""
        return self.key.replace(":", "/")


@dataclass(frozen=True)
class StepOutcome:
    """What a runner hands back: the step's result, its uploaded outputs, its compute time."""

    result: dict[str, Any]
    """``StepResult.to_dict()``"""
    outputs: dict[str, ArtifactRef]
    """uploaded outputs by name"""
    compute_s: float
    """seconds the step itself ran"""
    extra: dict[str, Any] = field(default_factory=dict)
    """runner-specific facts (the flow run id of a deployment run)"""

    @property
    def metrics(self) -> dict[str, Any]:
        return self.result.get("metrics", {})

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "outputs": {k: vars(v) for k, v in self.outputs.items()},
            "compute_s": self.compute_s,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepOutcome:
        return cls(
            result=data["result"],
            outputs={k: ArtifactRef(**v) for k, v in data["outputs"].items()},
            compute_s=float(data["compute_s"]),
            extra=dict(data.get("extra") or {}),
        )


class StepRunner(Protocol):
    """Runs a worker step and uploads its outputs."""

    def run(self, request: StepRequest) -> StepOutcome: ...


class InProcessRunner:
    """Runs worker steps in this process (imported lazily) and uploads their outputs."""

    def __init__(
        self,
        artifacts: ArtifactStore,
        work_dir: str | Path,
        *,
        cache_dir: str | Path | None = None,
        num_threads: int | None = None,
    ):
        self.artifacts = artifacts
        self.work_dir = Path(work_dir)
        self.cache_dir = Path(cache_dir) if cache_dir else self.work_dir / "cache"
        self.num_threads = num_threads
        """torch CPU threads for every step run here (None: torch's default)"""

    @property
    def _local(self) -> bool:
        return "file" in _protocols(self.artifacts.fs) or "local" in _protocols(self.artifacts.fs)

    def localize(self, ref: ArtifactRef) -> str:
        """A local path of an input artifact: in place on a local store, else a verified cached copy."""
        if self._local:
            path = Path(self.artifacts.path_of(ref.uri))
            if not path.exists():
                raise StepFailed(f"input artifact {ref.uri} does not exist")
            return str(path)
        dest = self.cache_dir / ref.sha256
        if not dest.exists():
            tmp = self.cache_dir / f".tmp-{ref.sha256}"
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            if ref.is_dir:
                self.artifacts.fetch_dir(ref.uri, ref.sha256, tmp)
            else:
                self.artifacts.fetch_file(ref.uri, ref.sha256, tmp)
            tmp.rename(dest)
        return str(dest)

    def run(self, request: StepRequest) -> StepOutcome:
        config = self.step_config(request)
        # Lazily: the orchestrator must not import torch before it runs a step.
        from workers.common.config import from_dict

        if self.num_threads is not None:
            import torch

            torch.set_num_threads(self.num_threads)
        cfg = from_dict(config_class(request.step), config, source=f"{request.step} config")
        t0 = time.perf_counter()
        result = self.execute(request.step, cfg, key=request.key)
        compute_s = time.perf_counter() - t0
        if not result.complete:
            raise StepFailed(f"{request.step} stopped before finishing ({result.metrics}); run it again to resume")
        missing = [name for name in request.outputs if name not in result.outputs]
        if missing:
            raise StepFailed(f"{request.step} returned no {', '.join(missing)} (it returned {sorted(result.outputs)})")
        uploaded = {}
        for name in request.outputs:
            uploaded[name] = self.upload(request, name, Path(result.outputs[name]), result.manifests.get(name))
        return StepOutcome(result=result.to_dict(), outputs=uploaded, compute_s=compute_s)

    def execute(self, step: str, cfg: Any, *, key: str) -> Any:
        """Run the step on its config here; its ``StepResult`` (``orchestrator.torchrun`` runs some elsewhere)."""
        return importlib.import_module(_step(step)[0]).run(cfg)

    def step_config(self, request: StepRequest) -> dict[str, Any]:
        """The config the step runs with here: its inputs as local paths, its output folder under the work dir."""
        return {**request.step_config(self.localize), "output_dir": str(self.work_dir / request.work_subdir)}

    def upload(self, request: StepRequest, name: str, path: Path, worker_sha: str | None) -> ArtifactRef:
        """Upload one output under ``<artifact_prefix>/<name>``; the store's checksum is the one registered."""
        key = f"{request.artifact_prefix}/{name}"
        if path.is_dir():
            # The key is this (week, stage)'s and nothing registered it yet (the stage has not
            # succeeded), so files left by an earlier attempt are cleared, not mixed in.
            target = self.artifacts.path_of(self.artifacts.uri_of(key))
            if self.artifacts.fs.exists(target):
                self.artifacts.fs.rm(target, recursive=True)
            ref = self.artifacts.put_dir(key, path)
        else:
            ref = self.artifacts.put_file(f"{key}{path.suffix}", path)
        if worker_sha is not None and worker_sha != ref.sha256:
            # Same manifest algorithm on both sides: a difference means the files changed in between.
            raise StepFailed(
                f"{request.step} output {name} changed between the step and the upload "
                f"(worker sha256 {worker_sha}, uploaded {ref.sha256}); run the stage again"
            )
        return ref


def _step(step: str) -> tuple[str, str]:
    if step not in STEPS:
        raise StepFailed(f"unknown worker step {step!r}; known: {', '.join(STEPS)}")
    return STEPS[step]


def config_class(step: str) -> type:
    """The config dataclass of a worker step (imports the step's module, and with it torch)."""
    module_name, class_name = _step(step)
    return getattr(importlib.import_module(module_name), class_name)


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return tuple(proto) if isinstance(proto, (tuple, list)) else (proto,)


# -- Prefect deployments -------------------------------------------------------------------

FAILED_STATES = {"FAILED", "CRASHED", "CANCELLED", "CANCELLING"}


class DeploymentRunner:
    """Runs each worker step as its own Prefect deployment (``run_deployment``) on the ``gpu`` pool.

    The first attempt of a (week, stage) uses idempotency key ``"<week>:<stage>"``;
    if that flow run ended failed, crashed or cancelled, the next attempt uses
    ``"<week>:<stage>:2"`` and so on. A re-run after an orchestrator crash
    therefore finds the GPU job it started (still running: it waits; finished:
    it reads the outcome) instead of starting a second one. Each step's flow
    run is tagged ``week:<week>``, ``target:<target>`` and ``stage:<stage>``,
    so cancelling a cycle finds the step runs of its week and target.
    """

    def __init__(
        self,
        artifacts: ArtifactStore,
        deployments: dict[str, str],
        *,
        work_pool: str = "gpu",
        poll_interval_s: float = 10.0,
        client_factory: Callable[[], Any] | None = None,
    ):
        self.artifacts = artifacts
        self.deployments = deployments
        self.work_pool = work_pool
        self.poll_interval_s = poll_interval_s
        self._client_factory = client_factory

    def _client(self):
        if self._client_factory is not None:
            return self._client_factory()
        from prefect import get_client

        return get_client(sync_client=True)

    def run(self, request: StepRequest) -> StepOutcome:
        if request.step not in self.deployments:
            raise StepFailed(f"no Prefect deployment is configured for step {request.step!r}")
        name = self.deployments[request.step]
        with self._client() as client:
            deployment = client.read_deployment_by_name(name)
            if deployment.work_pool_name and deployment.work_pool_name != self.work_pool:
                log.warning("deployment %s runs on pool %s, not %s", name, deployment.work_pool_name, self.work_pool)
            attempt = 1
            while True:
                key = request.key if attempt == 1 else f"{request.key}:{attempt}"
                existing = _flow_run_by_key(client, deployment.id, key)
                if existing is not None and _state(existing) in FAILED_STATES:
                    attempt += 1  # an earlier attempt that failed: the next key is the next attempt
                    continue
                if existing is None:
                    existing = client.create_flow_run_from_deployment(
                        deployment.id,
                        parameters={"request": request.to_dict()},
                        idempotency_key=key,
                        tags=["ratchet", *(request.tags or [f"week:{request.key.split(':')[0]}"]),
                              f"stage:{request.key.split(':')[-1]}"],
                    )
                    log.info("started %s as flow run %s (key %s)", name, existing.id, key)
                final = self._wait(client, existing.id)
                if _state(final) != "COMPLETED":
                    raise StepFailed(
                        f"{request.step} flow run {final.id} of {name} ended {_state(final)}: "
                        f"{getattr(final.state, 'message', '') or 'no message'}"
                    )
                outcome = self.read_outcome(request)
                return StepOutcome(outcome.result, outcome.outputs, outcome.compute_s, {"flow_run_id": str(final.id), "key": key})

    def _wait(self, client, flow_run_id):
        """The step's flow run once it is final. If the cycle is cancelled meanwhile (``stop_requested``), the
        flow run is set to Cancelling (its worker stops the process) and ``StepFailed`` is raised."""
        from workers.common.stopping import stop_requested

        while True:
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            if stop_requested():
                from prefect.states import Cancelling

                client.set_flow_run_state(flow_run_id, Cancelling(message="the cycle was cancelled"), force=True)
                raise StepFailed(f"flow run {flow_run_id} was cancelled with its cycle")
            time.sleep(self.poll_interval_s)

    def read_outcome(self, request: StepRequest) -> StepOutcome:
        """The outcome the worker flow wrote beside the step's outputs."""
        path = self.artifacts.path_of(self.artifacts.uri_of(f"{request.artifact_prefix}/{RESULT_FILENAME}"))
        if not self.artifacts.fs.exists(path):
            raise StepFailed(f"the {request.step} flow run finished but wrote no {request.artifact_prefix}/{RESULT_FILENAME}")
        return StepOutcome.from_dict(json.loads(self.artifacts.fs.cat_file(path)))


def _state(flow_run) -> str:
    state = getattr(flow_run, "state", None)
    return str(getattr(state, "type", "UNKNOWN")).rsplit(".", 1)[-1].upper()


def _flow_run_by_key(client, deployment_id, key: str):
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterIdempotencyKey,
    )

    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=[key])),
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        limit=1,
    )
    return runs[0] if runs else None
