"""Run the worker steps that support it under torchrun, on a worker node with several devices.

``TorchrunRunner`` is the ``InProcessRunner`` of a GPU node (``orchestrator.worker_flows``)
when ``RATCHET_NPROC_PER_NODE`` asks for more than one process (``auto``: one per CUDA
device the job was given, which on the Kubernetes GPU pool is its ``gpu_count`` job
variable). For a step in ``DISTRIBUTED_STEPS`` it writes the step's config beside its
outputs and runs

    python -m torch.distributed.run --standalone --nproc_per_node N -m workers.<step> --config <file>

(``--nnodes M --rdzv_backend c10d --rdzv_endpoint host:port`` instead of ``--standalone``
for a multi-node step; docs/deploy.md) with ``--result-file`` beside it too; once every
process has exited 0 it reads the result rank 0 wrote there, and the outputs are uploaded
as for one process.
Other steps run in this process, as ever. A killed launch leaves the step's checkpoints
(``torch.distributed.checkpoint``, one shard per process); the next attempt, on the same
number of processes, resumes from them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from orchestrator.runners import InProcessRunner, StepFailed, _step
from store.artifacts import ArtifactStore

log = logging.getLogger(__name__)

DISTRIBUTED_STEPS = frozenset({"sample", "sft", "train_pm", "ppo", "evaluate"})
"""worker steps that run under torchrun (workers.common.distributed); the others run in one process"""

CONFIG_FILENAME = "torchrun-config.json"
RESULT_FILENAME = "torchrun-result.json"
STDERR_TAIL_CHARS = 4000


def resolve_nproc(spec: str) -> int:
    """Processes per node for ``RATCHET_NPROC_PER_NODE``: a number, or ``auto`` (the CUDA devices this node
    sees, 1 without CUDA)."""
    if spec.strip().lower() != "auto":
        return int(spec)
    import torch

    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1


class TorchrunRunner(InProcessRunner):
    """An ``InProcessRunner`` that runs ``DISTRIBUTED_STEPS`` in ``nproc_per_node`` x ``nnodes`` processes."""

    def __init__(self, artifacts: ArtifactStore, work_dir: str | Path, *, nproc_per_node: int, nnodes: int = 1,
                 rdzv_endpoint: str | None = None, rdzv_id: str | None = None, **kwargs: Any):
        super().__init__(artifacts, work_dir, **kwargs)
        if nproc_per_node < 1 or nnodes < 1:
            raise ValueError(f"nproc_per_node ({nproc_per_node}) and nnodes ({nnodes}) must be >= 1")
        if nnodes > 1 and not rdzv_endpoint:
            raise ValueError(f"a step on {nnodes} nodes needs a rendezvous endpoint (RATCHET_RDZV_ENDPOINT)")
        self.nproc_per_node = nproc_per_node
        self.nnodes = nnodes
        self.rdzv_endpoint = rdzv_endpoint
        self.rdzv_id = rdzv_id

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def command(self, step: str, config_path: Path, *, rdzv_id: str, result_path: Path | None = None) -> list[str]:
        """The torchrun command line of one step (rank 0 writes the step's result to ``result_path``)."""
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={self.nproc_per_node}"]
        if self.nnodes == 1:
            cmd.append("--standalone")
        else:
            cmd += [f"--nnodes={self.nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={self.rdzv_endpoint}",
                    f"--rdzv_id={rdzv_id}"]
        cmd += ["-m", _step(step)[0], "--config", str(config_path)]
        return cmd + (["--result-file", str(result_path)] if result_path is not None else [])

    def execute(self, step: str, cfg: Any, *, key: str) -> Any:
        if step not in DISTRIBUTED_STEPS or self.world_size == 1:
            return super().execute(step, cfg, key=key)
        from workers.common.config import to_dict
        from workers.common.metrics import StepResult

        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        config_path = out.parent / f"{out.name}.{CONFIG_FILENAME}"  # beside, not in, the step's own folder
        config_path.write_text(json.dumps(to_dict(cfg), sort_keys=True) + "\n", encoding="utf-8")
        result_path = out.parent / f"{out.name}.{RESULT_FILENAME}"
        result_path.unlink(missing_ok=True)  # an earlier attempt's
        cmd = self.command(step, config_path, rdzv_id=self.rdzv_id or key.replace(":", "-"), result_path=result_path)
        log.info("running %s on %d process(es): %s", step, self.world_size, " ".join(cmd))
        env = {**os.environ, "OMP_NUM_THREADS": str(self.num_threads or os.environ.get("OMP_NUM_THREADS", "1"))}
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise StepFailed(
                f"{step} under torchrun ({self.world_size} processes) exited {proc.returncode}; run it again to "
                f"resume from its checkpoints:\n{proc.stderr[-STDERR_TAIL_CHARS:]}"
            )
        if not result_path.is_file():
            raise StepFailed(f"{step} under torchrun exited 0 but rank 0 wrote no result ({result_path})")
        return StepResult(**json.loads(result_path.read_text(encoding="utf-8")))


def runner_for_node(artifacts: ArtifactStore, work_dir: str | Path) -> InProcessRunner:
    """The runner of a worker node from its ``RATCHET_*`` settings: torchrun for more than one process."""
    from store.settings import get_settings

    settings = get_settings()
    nproc = resolve_nproc(settings.nproc_per_node)
    if nproc * settings.nnodes == 1:
        return InProcessRunner(artifacts, work_dir)
    return TorchrunRunner(artifacts, work_dir, nproc_per_node=nproc, nnodes=settings.nnodes,
                          rdzv_endpoint=settings.rdzv_endpoint)
