"""Building the demo world into a store: prompt sets, the initial policy P0, its deployment.

``build_world`` registers the demo world's prompt sets (``prompts`` for
training and sampling, ``eval-prompts`` held out), builds a tiny GPT-2 with
a tokenizer trained on the world's texts (``workers.common.testing``), fine-tunes it
on the mixed corpus with the ``sft`` worker step (through an
``InProcessRunner``, like any step), registers the result as a policy version
(P0: no init, reference or PM) and deploys it. ``workers.demo_world`` holds
the world itself; this module only puts it into the store, and makes the
gold (known-answer) comparisons the demo registers for quality control of
its raters (``gold_pairs``).
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.runners import InProcessRunner, StepRequest
from store.artifacts import ArtifactStore, sha256_bytes
from store.datasets import create_dataset
from store.db import Database
from store.deployments import deploy
from store.policies import create_policy
from workers import demo_world

GOLD = "workers.demo_world:gold_score"
"""the world's gold preference, for the evaluate step"""

GOLD_MIN_GAP = 1.0
"""the least gold score gap of a gold comparison (scores in [-1, 1]): a clear winner, half the scale apart"""


@dataclass(frozen=True)
class WorldConfig:
    """How big the world's initial policy is and how long it is fine-tuned."""

    n_layer: int = 2
    """transformer layers of P0"""
    hidden_size: int = 64
    """width of P0"""
    n_head: int = 2
    """attention heads of P0"""
    vocab_size: int = 512
    """byte-level BPE vocabulary, trained on the world's texts"""
    max_positions: int = 128
    """position embeddings (prompts are ~20 tokens, responses ~30)"""
    correct_weight: int = 2
    """copies of the right response per prompt in P0's corpus (see ``demo_world.corpus``)"""
    sft_steps: int = 300
    """fine-tuning steps of P0"""
    sft_learning_rate: float = 1e-2
    """fine-tuning learning rate (a tiny model takes a large one)"""
    sft_batch_size: int = 32
    """sequences per fine-tuning step"""
    seed: int = 0
    """seed of the initial weights and the fine-tuning"""


@dataclass(frozen=True)
class World:
    """What ``build_world`` registered."""

    policy_id: int
    policy_version: int
    deployment_id: int
    prompts_dataset_id: int
    eval_prompts_dataset_id: int
    sft_metrics: dict[str, Any]
    compute_s: float


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")


def register_prompts(database: Database, artifacts: ArtifactStore) -> tuple[int, int]:
    """The world's prompt sets as datasets ``prompts`` and ``eval-prompts`` (content-addressed); their ids."""
    ids = []
    with database.session() as session:
        for name, split in (("prompts", "train"), ("eval-prompts", "eval")):
            data = _jsonl(p.record() for p in demo_world.prompts(split))
            sha = sha256_bytes(data)
            ref = artifacts.put_bytes(f"datasets/{name}/{sha}.jsonl", data)
            dataset, _ = create_dataset(
                session, name=name, kind="prompts", content_sha256=sha, row_count=data.count(b"\n"), artifact=ref,
                metadata={"world": "demo", "split": split},
            )
            ids.append(dataset.id)
    return ids[0], ids[1]


def build_world(
    database: Database,
    artifacts: ArtifactStore,
    work_dir: str | Path,
    *,
    config: WorldConfig = WorldConfig(),
    tag: str = "world",
    target: str = "default",
    policy_name: str = "policy",
    num_threads: int | None = None,
) -> World:
    """Register the world's prompt sets, fine-tune P0, register it and deploy it on ``target``."""
    from workers.common.testing import build_tiny_model, build_tokenizer  # torch: only when a world is built

    work = Path(work_dir) / tag
    prompts_id, eval_id = register_prompts(database, artifacts)

    # 1. The tiny base model, with a tokenizer that knows the world's words.
    tokenizer = build_tokenizer(
        demo_world.tokenizer_corpus(), vocab_size=config.vocab_size, model_max_length=config.max_positions
    )
    base_dir = build_tiny_model(
        work / "base", n_layer=config.n_layer, hidden_size=config.hidden_size, n_head=config.n_head,
        max_positions=config.max_positions, tokenizer=tokenizer, seed=config.seed,
    )
    base = artifacts.put_dir(f"{tag}/base", base_dir)
    corpus = artifacts.put_bytes(f"{tag}/corpus.jsonl", _jsonl(demo_world.corpus(config.correct_weight)))

    # 2. P0: the sft step, run like any other step.
    request = StepRequest(
        step="sft",
        key=f"{tag}:sft",
        config={
            "max_steps": config.sft_steps,
            "learning_rate": config.sft_learning_rate,
            "batch_size": config.sft_batch_size,
            "warmup_steps": 10,
            "disable_dropout": True,
            "seed": config.seed,
            "progress": False,
        },
        inputs={"model_path": base, "dataset_path": corpus},
        outputs=["policy"],
        artifact_prefix=f"{tag}/sft",
    )
    outcome = InProcessRunner(artifacts, work_dir, num_threads=num_threads).run(request)

    # 3. Register P0 and deploy it, in one transaction.
    with database.session() as session:
        policy = create_policy(
            session,
            name=policy_name,
            base_model=f"tiny-gpt2-{config.n_layer}x{config.hidden_size} (demo world)",
            artifact=outcome.outputs["policy"],
            config={"world": vars(config), "sft": request.recorded_config()},
            metrics=outcome.metrics,
        )
        deployment = deploy(
            session, policy_id=policy.id, name=target, reason="demo world: the initial policy P0", actor="demo"
        )
        return World(
            policy_id=policy.id,
            policy_version=policy.version,
            deployment_id=deployment.id,
            prompts_dataset_id=prompts_id,
            eval_prompts_dataset_id=eval_id,
            sft_metrics=outcome.metrics,
            compute_s=outcome.compute_s,
        )


def _candidates(prompt: demo_world.DemoPrompt) -> list[str]:
    """Responses the world's policies give to ``prompt``: its answer, the refusals, the answer to another
    request of the same kind (off the topic), and a refusal that complies anyway."""
    topics = demo_world.HARMFUL if prompt.topic.harmful else demo_world.BENIGN
    other = topics[(topics.index(prompt.topic) + 1) % len(topics)]
    answer = demo_world.answer(prompt.topic)
    return [answer, *demo_world.REFUSALS, demo_world.answer(other), demo_world.REFUSALS[0] + answer]


def gold_pairs(n: int = 60, *, seed: int = 0, min_gap: float = GOLD_MIN_GAP) -> list[dict[str, Any]]:
    """``n`` gold comparisons for ``POST /v1/gold-comparisons``: half harmful, half benign requests of the
    world (both splits), each with two of the responses its policies give whose gold scores are at least
    ``min_gap`` apart; the known answer is the side gold prefers, A or B by the seed.

    The metadata holds only the prompt id (it becomes the task's), so a gold task shows nothing a training
    task does not (a training task also names the policies and samples it pairs).
    """
    rng = random.Random(f"gold:{seed}")
    everything = demo_world.all_prompts()
    harmful = [p for p in everything if p.topic.harmful]
    benign = [p for p in everything if not p.topic.harmful]
    chosen = rng.sample(harmful, n // 2) + rng.sample(benign, n - n // 2)
    rng.shuffle(chosen)
    items = []
    for prompt in chosen:
        scored = [(r, demo_world.gold_score(prompt.text, r)) for r in _candidates(prompt)]
        clear = [(x, y) for x, y in itertools.combinations(scored, 2) if abs(x[1] - y[1]) >= min_gap]
        (a, score_a), (b, score_b) = rng.choice(clear)
        if rng.random() < 0.5:
            (a, score_a), (b, score_b) = (b, score_b), (a, score_a)
        items.append({"prompt": prompt.text, "response_a": a, "response_b": b,
                      "choice": "a" if score_a > score_b else "b", "metadata": {"prompt_id": prompt.id}})
    return items
