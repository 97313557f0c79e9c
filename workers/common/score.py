"""Preference model directories: save, load, and score (prompt, response) pairs.

A PM directory is an ordinary Hugging Face directory of the trunk
(``config.json`` + ``model.safetensors``, loadable with ``AutoModel``) and
its tokenizer, plus

- ``pm_head.safetensors``: the scalar head, ``{"weight": [1, hidden]}``,
- ``ratchet_pm.json``: what the head is and how texts become tokens
  (``append_eos``, ``max_length``), the base model, and held-out metrics,
- ``ratchet_step_config.json``: the config of the step that trained it.

An ensemble PM (``TrainPMConfig.ensemble_size`` > 1) is its first member's
directory with the other members in ``members/<i>/`` (each a PM directory
itself), listed under ``members`` in ``ratchet_pm.json``: a reader that
knows nothing of ensembles still finds an ordinary PM (member 0).

``load_pm`` + ``score`` is what the PPO and evaluate steps use; an
ensemble's score is its members' mean, ``member_scores`` gives each.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from workers.common.config import WorkerError, save_config
from workers.common.metrics import write_json
from workers.common.modeling import check_model_dir, load_tokenizer, load_trunk, replace_dir, staging_dir
from workers.common.pm import PreferenceModel, TokenLayout, pad_sequences
from workers.common.runtime import resolve_device, resolve_dtype

PM_SPEC_FILENAME = "ratchet_pm.json"
PM_HEAD_FILENAME = "pm_head.safetensors"
PM_FORMAT = "ratchet-pm"
PM_FORMAT_VERSION = 1


@dataclass
class LoadedPM:
    """A preference model (or an ensemble of them) ready to score: modules, tokenizer, token layout and its spec."""

    models: list[PreferenceModel]
    """trunk + head of each member (one for a single PM), in eval mode"""
    tokenizer: PreTrainedTokenizerBase
    """the PM's tokenizer"""
    layout: TokenLayout
    """how (prompt, response) texts become tokens"""
    spec: dict[str, Any]
    """the contents of ``ratchet_pm.json``"""
    path: Path
    """the directory it was loaded from"""

    @property
    def model(self) -> PreferenceModel:
        """The first (for a single PM, the only) member."""
        return self.models[0]

    @property
    def size(self) -> int:
        """How many members score (1: a single PM)."""
        return len(self.models)


def is_pm_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a Ratchet PM (rather than a plain language model)."""
    return (Path(path) / PM_SPEC_FILENAME).is_file()


def read_pm_spec(path: str | os.PathLike) -> dict[str, Any]:
    """``ratchet_pm.json`` of a PM directory, checked."""
    root = Path(path)
    spec_path = root / PM_SPEC_FILENAME
    if not spec_path.is_file():
        raise WorkerError(f"{root} is not a preference model directory: it has no {PM_SPEC_FILENAME}")
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    if spec.get("format") != PM_FORMAT or spec.get("format_version") != PM_FORMAT_VERSION:
        raise WorkerError(
            f"{spec_path} is format {spec.get('format')!r} v{spec.get('format_version')}; "
            f"this code reads {PM_FORMAT!r} v{PM_FORMAT_VERSION}"
        )
    return spec


def load_head(path: str | os.PathLike, *, hidden_size: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Linear:
    """The scalar head of a PM directory."""
    root = Path(path)
    spec = read_pm_spec(root)
    head_path = root / spec.get("head_file", PM_HEAD_FILENAME)
    if not head_path.is_file():
        raise WorkerError(f"preference model {root} has no head file {head_path.name}")
    tensors = load_file(str(head_path))
    weight = tensors.get("weight")
    if weight is None or tuple(weight.shape) != (1, hidden_size):
        shape = None if weight is None else tuple(weight.shape)
        raise WorkerError(f"{head_path}: head weight has shape {shape}, expected (1, {hidden_size})")
    head = torch.nn.Linear(hidden_size, 1, bias="bias" in tensors, device=device, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        if "bias" in tensors:
            head.bias.copy_(tensors["bias"])
    return head


def save_pm(
    model: PreferenceModel,
    tokenizer: PreTrainedTokenizerBase,
    final: str | os.PathLike,
    *,
    spec: dict[str, Any],
    config: Any | None = None,
    step: str = "train_pm",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a PM directory (trunk, tokenizer, head, spec, config) atomically (``state_dict``: the PM's weights
    instead of the model's own, as a sharded model's gathered ones)."""
    final = Path(final)
    tmp = staging_dir(final)
    if state_dict is None:
        state_dict = {k: v.detach() for k, v in model.state_dict().items()}
    try:
        trunk = {k.removeprefix("trunk."): v for k, v in state_dict.items() if k.startswith("trunk.")}
        model.trunk.save_pretrained(tmp, safe_serialization=True, state_dict=trunk)
        tokenizer.save_pretrained(tmp)
        head = {"weight": state_dict["head.weight"].to("cpu", copy=True).contiguous()}
        if "head.bias" in state_dict:
            head["bias"] = state_dict["head.bias"].to("cpu", copy=True).contiguous()
        save_file(head, str(tmp / PM_HEAD_FILENAME))
        full_spec = {
            "format": PM_FORMAT,
            "format_version": PM_FORMAT_VERSION,
            "head_file": PM_HEAD_FILENAME,
            "hidden_size": model.head.in_features,
            "score_at": "last token of the response (its EOS when append_eos)",
            **spec,
        }
        write_json(tmp / PM_SPEC_FILENAME, full_spec)
        if config is not None:
            save_config(config, tmp, step=step)
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_pm(
    path: str | os.PathLike, *, device: str = "auto", dtype: str = "auto", attn_implementation: str = "sdpa"
) -> LoadedPM:
    """A PM directory (single or ensemble) as a ``LoadedPM`` in eval mode (``device``/``dtype`` as in step configs)."""
    root = check_model_dir(path, what="preference model")
    spec = read_pm_spec(root)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    models = []
    for member in [root] + [root / rel for rel in spec.get("members", [])]:
        check_model_dir(member, what="preference model member")
        trunk = load_trunk(member, device=dev, dtype=dt, attn_implementation=attn_implementation)
        head = load_head(member, hidden_size=trunk.config.hidden_size, device=dev, dtype=dt)
        models.append(PreferenceModel(trunk, head).eval())
    tokenizer = load_tokenizer(root)
    layout = TokenLayout(tokenizer, max_length=int(spec["max_length"]), append_eos=bool(spec["append_eos"]))
    return LoadedPM(models=models, tokenizer=tokenizer, layout=layout, spec=spec, path=root)


@torch.no_grad()
def member_scores(pm: LoadedPM, batch) -> torch.Tensor:
    """Each member's score of a padded batch of sequences: shape [members, b], float32."""
    return torch.stack([model.score_sequences(batch).float() for model in pm.models])


@torch.no_grad()
def score(pm: LoadedPM, pairs: Sequence[tuple[str, str]], *, batch_size: int = 32) -> list[float]:
    """The PM's score of each ``(prompt, response)`` pair, in input order (an ensemble's: the members' mean).

    Texts are tokenized and truncated exactly as in training (``TokenLayout``);
    pairs are batched by length so little compute goes to padding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size ({batch_size}) must be >= 1")
    if not pairs:
        return []
    layout = pm.layout
    prompts = layout.prompts([p for p, _ in pairs])
    responses = layout.responses([r for _, r in pairs])
    seqs = []
    for prompt, response in zip(prompts, responses):
        fitted_prompt, (fitted_response,), _, _ = layout.fit(prompt, [response])
        seqs.append(fitted_prompt + fitted_response)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
    out = [0.0] * len(seqs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = pad_sequences([seqs[i] for i in chunk], pad_id=layout.pad_id)
        scores = member_scores(pm, batch).mean(0).tolist()
        for i, s in zip(chunk, scores):
            out[i] = s
    return out
