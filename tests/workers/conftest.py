"""Shared, session-scoped worker fixtures: tiny models, a tokenizer, data files, a trained PM."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

from tests.workers.builders import hh_comparisons, prompt_set, synthetic_preferences, write_jsonl
from workers.common.testing import build_tiny_model, build_tokenizer

# Tiny models gain nothing from intra-op threads, and on a shared machine a descheduled
# OpenMP thread stalls every op; one thread keeps the suite fast and steady.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The byte-level BPE tokenizer shared by the tiny models (trained on the built-in corpus)."""
    return build_tokenizer(vocab_size=512)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 2-layer, 64-wide GPT-2 directory (dropout 0.1, as GPT-2's config)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "gpt2", tokenizer=tiny_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide Llama directory whose tokenizer adds BOS."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "llama", arch="llama", seed=1)


@pytest.fixture(scope="session")
def synthetic_path(tmp_path_factory) -> Path:
    """400 comparisons where the response ending in " please" wins."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "synthetic.jsonl", synthetic_preferences(400))


@pytest.fixture(scope="session")
def hh_path(tmp_path_factory) -> Path:
    """The first 160 HH-RLHF harmless-base test comparisons, converted (A = chosen)."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "hh.jsonl", hh_comparisons(160))


@pytest.fixture(scope="session")
def prompts_path(tmp_path_factory) -> Path:
    """Eight prompts of varied lengths."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "prompts.jsonl", prompt_set(8))


@pytest.fixture(scope="session")
def trained_pm(tmp_path_factory, tiny_gpt2, synthetic_path):
    """(config, result) of a short train_pm run on the synthetic preference."""
    from workers.train_pm import TrainPMConfig, run

    cfg = TrainPMConfig(
        model_path=str(tiny_gpt2),
        dataset_path=str(synthetic_path),
        output_dir=str(tmp_path_factory.mktemp("runs") / "synthetic"),
        heldout_fraction=0.2,
        batch_size=16,
        learning_rate=3e-3,
        max_steps=24,
        max_length=64,
        progress=False,
    )
    return cfg, run(cfg)


@pytest.fixture(scope="session")
def ensemble_pm(tmp_path_factory, tiny_gpt2, synthetic_path) -> Path:
    """A 2-member ensemble PM directory, briefly trained on the synthetic preference."""
    from workers.train_pm import TrainPMConfig, run

    cfg = TrainPMConfig(
        model_path=str(tiny_gpt2), dataset_path=str(synthetic_path), output_dir=str(tmp_path_factory.mktemp("runs") / "ens"),
        heldout_fraction=0.2, batch_size=16, learning_rate=3e-3, max_steps=6, max_length=64, ensemble_size=2,
        progress=False,
    )
    return Path(run(cfg).outputs["pm"])
