"""Putting a real deployment's starting point into the store: a prompt set and
the initial policy (P0), which the demo world does for itself.

    ratchet prompts add prompts.jsonl [--name prompts]
    ratchet policy add ./my-sft-model [--name policy] [--deploy]

Both check their input before anything is written and name the line or file
at fault; both are content-addressed where the store is (a prompt set
registered twice is one version).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from formats.chat import message_problems
from store.artifacts import ArtifactStore, sha256_bytes
from store.datasets import create_dataset
from store.db import Database
from store.deployments import deploy
from store.errors import InvalidInput, NotFound
from store.models import Dataset, Deployment, Policy
from store.policies import create_policy

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_prompt_set(data: bytes, *, source: str) -> int:
    """The number of prompts in a JSONL set of ``{"id", "prompt"}`` and/or ``{"id", "messages"}`` lines (chat
    prompts: formats.chat); every bad line is named."""
    problems, seen = [], {}
    lines = data.decode("utf-8", errors="strict").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append({"index": number, "field": "line", "message": f"invalid JSON: {exc.msg}"})
            continue
        if not isinstance(record, dict):
            problems.append({"index": number, "field": "line", "message": "not a JSON object"})
            continue
        pid, prompt = record.get("id"), record.get("prompt")
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            problems.append({"index": number, "field": "id", "message": "id must be a string or an integer"})
        elif json.dumps(pid) in seen:
            problems.append({"index": number, "field": "id", "message": f"id {pid!r} repeats line {seen[json.dumps(pid)]}"})
        else:
            seen[json.dumps(pid)] = number
        if "messages" in record:  # a chat prompt; its text is derived from the messages when it has none
            problems += [{"index": number, "field": "messages", "message": m} for m in message_problems(record["messages"])]
            if "prompt" in record and not isinstance(prompt, str):
                problems.append({"index": number, "field": "prompt", "message": "prompt must be a string"})
        elif not isinstance(prompt, str) or not prompt.strip():
            problems.append({"index": number, "field": "prompt", "message": "prompt must be a non-empty string"})
    if problems:
        raise InvalidInput(f"prompt set {source}: {len(problems)} bad line(s), nothing was registered", problems)
    if not seen:
        raise InvalidInput(f"prompt set {source} has no prompts")
    return len(seen)


def register_prompt_set(database: Database, artifacts: ArtifactStore, path: str | Path, *, name: str = "prompts") -> tuple[Dataset, bool]:
    """Register a prompt set file as a ``prompts`` dataset version; returns (dataset, created)."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"prompt set {path} does not exist")
    data = path.read_bytes()
    try:
        count = check_prompt_set(data, source=str(path))
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"prompt set {path} is not UTF-8: {exc}") from None
    sha = sha256_bytes(data)
    ref = artifacts.put_bytes(f"datasets/{name}/{sha}.jsonl", data)
    with database.session() as session:
        return create_dataset(
            session, name=name, kind="prompts", content_sha256=sha, row_count=count, artifact=ref,
            metadata={"registered_from": str(path)},
        )


def check_model_dir(path: Path) -> None:
    """A Hugging Face model directory with safetensors weights (pickle is never loaded)."""
    if not path.is_dir():
        raise NotFound(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise InvalidInput(f"{path} has no config.json: not a Hugging Face model directory")
    files = [p.name for p in path.iterdir() if p.is_file()]
    if not any(f.endswith(".safetensors") for f in files):
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        detail = f" (found {', '.join(sorted(pickles))}: convert them to safetensors)" if pickles else ""
        raise InvalidInput(f"{path} has no .safetensors weights{detail}")


def register_policy(
    database: Database,
    artifacts: ArtifactStore,
    path: str | Path,
    *,
    name: str = "policy",
    deploy_to: str | None = None,
    actor: str = "cli",
) -> tuple[Policy, Deployment | None]:
    """Register a model directory as a new version of policy ``name`` (an initial
    policy: no init, reference or PM), and deploy it on ``deploy_to`` if given."""
    path = Path(path)
    check_model_dir(path)
    ref = artifacts.put_dir(f"policies/{name}/registered-{uuid.uuid4().hex[:12]}", path)
    with database.session() as session:
        policy = create_policy(
            session, name=name, base_model=path.name, artifact=ref, config={"registered_from": str(path.resolve())}
        )
        deployment = None
        if deploy_to is not None:
            deployment = deploy(
                session, policy_id=policy.id, name=deploy_to, reason=f"initial policy from {path}", actor=actor
            )
        return policy, deployment
