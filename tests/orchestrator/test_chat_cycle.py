"""A whole cycle on chat-format prompts, with the real worker steps in-process, on PostgreSQL.

The prompt sets give only message lists (``{"id", "messages"}``); P0 is a
tiny GPT-2 whose tokenizer has a chat template (``CHAT_TEMPLATE``). Every
stage runs under the stage protocol (what the flow runs, without Prefect),
a labeler answers the training and the eval tasks through the store, and
then the messages are followed through the cycle: the sample step encoded
each prompt with the template and wrote its messages into the samples, the
tasks and the snapshot records carry them, the PMs and the candidate keep
the template, and the conversational export writes them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from formats.chat import hh_text, prompt_token_ids
from orchestrator.cycle import STAGES, CycleEnv
from orchestrator.flow import stage_task
from orchestrator.runners import InProcessRunner
from orchestrator.settings import CycleSettings
from orchestrator.stages import finish, open_stage
from store.artifacts import ArtifactStore
from store.cycles import get_cycle
from store.datasets import create_dataset, dataset_batch_ids, get_dataset
from store.db import Database
from store.deployments import deploy
from store.feedback import conversation_pairs
from store.models import ComparisonTask, Policy, PreferenceModel
from store.policies import create_policy
from tests.orchestrator.fakes import StoreLabeler
from workers.common.modeling import load_tokenizer
from workers.common.testing import CHAT_TEMPLATE, build_tiny_model, build_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

WEEK = "2027-W20"
TOPICS = ("bread", "the sea", "a bike tire", "the guitar", "sleep", "photosynthesis", "Paris", "spiders")

CHAT_CYCLE = CycleSettings.model_validate(
    {
        "sample": {"prompts_per_cycle": 24, "config": {"num_samples": 3, "max_new_tokens": 8, "batch_size": 24}},
        "gather": {"min_comparisons": 8, "all_tasks": True, "deadline_s": 60, "poll_interval_s": 0.05},
        "pm": {"config": {"learning_rate": 1e-3, "batch_size": 8, "max_steps": 3, "max_length": 96,
                          "heldout_fraction": 0.3, "select_by": "last", "ensemble_size": 1, "parallel_pms": 1}},
        "ppo": {"config": {"total_episodes": 16, "rollout_batch_size": 8, "mini_batch_size": 8, "ppo_epochs": 1,
                           "response_length": 8, "learning_rate": 1e-2, "lam": 1.0}},
        "evaluate": {"prompt_set": "eval-prompts", "config": {"num_samples": 2, "max_new_tokens": 8}},
        "human_eval": {"min_comparisons": 2, "deadline_s": 60, "poll_interval_s": 0.05},
        "gate": {"win_margin": 0.0, "kl_budget": 100.0, "max_pm_gap": 1.0},
        "qc": {"gold_share": 0.0, "overlap_share": 0.0},
        "device": "cpu",
        "num_threads": 1,
        "stage_retries": 0,
    }
)


def chat_prompt(i: int) -> list[dict[str, str]]:
    """The ``i``-th prompt's messages: a system message and a user turn."""
    return [{"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}, please ({i})."}]


def register_chat_world(database: Database, artifacts: ArtifactStore, work: Path) -> PreTrainedTokenizerFast:
    """Prompt sets of messages only, and P0 (a tiny GPT-2 with a chat template) deployed; P0's tokenizer."""
    tokenizer = build_tokenizer(vocab_size=512, model_max_length=128, chat_template=CHAT_TEMPLATE)
    p0 = build_tiny_model(work / "p0", hidden_size=32, max_positions=128, tokenizer=tokenizer, seed=0)
    with database.session() as session:
        for name, ids in (("prompts", range(24)), ("eval-prompts", range(24, 28))):
            body = "".join(json.dumps({"id": f"c{i}", "messages": chat_prompt(i)}) + "\n" for i in ids).encode()
            ref = artifacts.put_bytes(f"datasets/{name}.jsonl", body)
            create_dataset(session, name=name, kind="prompts", content_sha256=ref.sha256, row_count=len(ids), artifact=ref)
        policy = create_policy(session, name="policy", base_model="tiny-gpt2 (chat template)",
                               artifact=artifacts.put_dir("world/p0", p0))
        deploy(session, policy_id=policy.id, reason="P0", actor="test")
    return tokenizer


def read_jsonl(artifacts: ArtifactStore, artifact) -> list[dict]:
    return [json.loads(line) for line in artifacts.read_bytes(artifact.uri, artifact.sha256).decode().splitlines()]


def test_chat_prompts_run_a_whole_cycle_through_the_chat_template(pg_db, artifacts, tmp_path):
    tokenizer = register_chat_world(pg_db, artifacts, tmp_path / "world")
    env = CycleEnv(pg_db, artifacts, work_dir=tmp_path / "work", defaults=CHAT_CYCLE,
                   runner=InProcessRunner(artifacts, tmp_path / "work", num_threads=1))
    ctx = open_stage(env, week=WEEK, params=None, trigger="manual", flow_run_id=None)
    with StoreLabeler(pg_db, rater="chat-rater", judge=lambda prompt, a, b: "a" if len(a) >= len(b) else "b"):
        for stage in STAGES[1:]:
            assert not stage_task.fn(ctx, stage).get("halt"), stage
    finish(ctx)

    messages = {f"c{i}": chat_prompt(i) for i in range(28)}
    with pg_db.session() as s:
        cycle = get_cycle(s, ctx.cycle_id)
        assert cycle.status == "succeeded", cycle.reason
        outputs = {r.stage: r.outputs for r in cycle.stages}
        samples = read_jsonl(artifacts, get_dataset(s, outputs["sample"]["samples_dataset_id"]).artifact)
        snapshot = get_dataset(s, outputs["snapshot"]["dataset_id"])
        records = read_jsonl(artifacts, snapshot.artifact)
        tasks = s.scalars(select(ComparisonTask).where(ComparisonTask.cycle_id == cycle.id)).all()
        batch_ids = dataset_batch_ids(s, dataset_id=snapshot.id)
        pm_dirs = [artifacts.path_of(s.get(PreferenceModel, outputs["train_pm"][key]).artifact.uri)
                   for key in ("pm_id", "test_pm_id")]
        candidate = s.get(Policy, outputs["improve"]["policy_id"])
        candidate_dir = artifacts.path_of(candidate.artifact.uri)

    # 1. The sample step read the messages, gave each prompt its HH-RLHF text, and encoded it with the template.
    assert len(samples) == 24 * 3
    for row in samples:
        chat = messages[row["prompt_id"]]
        assert (row["messages"], row["prompt"]) == (chat, hh_text(chat))
        with_template = prompt_token_ids(tokenizer, [row["prompt"]], [chat])[0]
        assert row["prompt_tokens"] == len(with_template) != len(prompt_token_ids(tokenizer, [row["prompt"]])[0])
        assert tokenizer.decode(with_template).endswith("<|assistant|>")
    # 2. Training and eval tasks carry the messages; their answers' snapshot records do too.
    assert {t.kind for t in tasks} == {"train", "eval"}
    assert all(t.meta["messages"] == messages[t.prompt_id] and t.prompt == hh_text(messages[t.prompt_id]) for t in tasks)
    assert records and all(r["messages"] == messages_of(r["prompt"], messages) for r in records)
    assert snapshot.meta["chat_comparisons"] == len(records) == outputs["snapshot"]["rows"]
    # 3. The PMs and the candidate keep the chat template, so the next cycle samples and scores with it.
    for path in (*pm_dirs, candidate_dir):
        assert load_tokenizer(path).chat_template == CHAT_TEMPLATE
    assert candidate.cycle_id == ctx.cycle_id and outputs["gate"]["deploy"] is outputs["deploy"]["deployed"]
    # 4. The conversational export gives the comparisons back as message lists.
    pairs = list(conversation_pairs(pg_db, batch_ids=batch_ids))
    assert pairs and all(p.messages == messages_of(p.prompt, messages) for p in pairs)


def messages_of(prompt: str, messages: dict[str, list[dict[str, str]]]) -> list[dict[str, str]]:
    """The messages whose HH-RLHF text is ``prompt``."""
    (found,) = [m for m in messages.values() if hh_text(m) == prompt]
    return found
