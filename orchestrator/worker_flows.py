"""The Prefect flow that runs one worker step on a worker machine (the GPU pool in production).

``DeploymentRunner`` starts it with ``run_deployment`` of the step's
deployment (``ratchet-step/sample``, ``ratchet-step/train-pm``, ...; see
``deploy/prefect.yaml``). It fetches the inputs from the artifact store
(checksums verified), runs the step with an ``InProcessRunner`` (under
torchrun with ``RATCHET_NPROC_PER_NODE`` above 1: ``orchestrator.torchrun``) in a work
folder on the node (mount a persistent volume there so a restarted job
resumes from its checkpoints), uploads the outputs, and writes the outcome
to ``<artifact_prefix>/result.json`` where the orchestrator reads it. It never
touches the database: only the orchestrator writes to the store.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow

from orchestrator.runners import RESULT_FILENAME, StepRequest


@flow(name="ratchet-step", flow_run_name="{request[key]}", validate_parameters=False)
def ratchet_step(request: dict[str, Any]) -> dict[str, Any]:
    """Run one worker step from a ``StepRequest`` dict; returns the ``StepOutcome`` dict."""
    from orchestrator.torchrun import runner_for_node
    from store.artifacts import ArtifactStore
    from store.settings import get_settings

    settings = get_settings()
    artifacts = ArtifactStore(settings.resolved_artifacts_url)
    step = StepRequest.from_dict(request)
    outcome = runner_for_node(artifacts, settings.resolved_work_dir).run(step)
    payload = outcome.to_dict()
    artifacts.put_bytes(f"{step.artifact_prefix}/{RESULT_FILENAME}", json.dumps(payload, sort_keys=True).encode())
    return payload
