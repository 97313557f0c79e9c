"""Hugging Face model directories in and out: safetensors only, never pickle.

Any causal LM with an ``AutoModelForCausalLM`` class works (GPT-2, Llama,
Qwen, Mistral families). Loading always passes ``use_safetensors=True`` and
never ``trust_remote_code``; a directory whose weights are only in a pickle
format (``pytorch_model.bin``, ``*.pt``) is refused with a message that says
how to convert it, before transformers is asked to read anything.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from workers.common.config import WorkerError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
# transformers 4.56 renamed from_pretrained's ``torch_dtype`` to ``dtype``.
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def check_model_dir(path: str | os.PathLike, *, what: str = "model") -> Path:
    """``path`` as a directory holding a config and safetensors weights, or a clear ``WorkerError``."""
    root = Path(path)
    if not root.exists():
        raise WorkerError(f"{what} directory {root} does not exist")
    if not root.is_dir():
        raise WorkerError(f"{what} path {root} is a file, not a Hugging Face model directory")
    if not (root / "config.json").is_file():
        raise WorkerError(f"{what} directory {root} has no config.json; it is not a Hugging Face model directory")
    files = [p.name for p in root.iterdir() if p.is_file()]
    safetensors = [f for f in files if f.endswith(".safetensors") or f == "model.safetensors.index.json"]
    if not safetensors:
        pickled = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        if pickled:
            raise WorkerError(
                f"{what} directory {root} holds weights only in a pickle format ({', '.join(pickled)}); "
                "Ratchet loads .safetensors weights only and never unpickles a file. Convert it once where you "
                "trust the file: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise WorkerError(f"{what} directory {root} has no .safetensors weights (files: {', '.join(sorted(files)) or 'none'})")
    return root


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The directory's tokenizer; a tokenizer without a pad token gets EOS as pad.

    Worker steps pad with explicit lengths and masks, never by searching for
    the pad id, so a pad equal to EOS (GPT-2's own tokenizer) is harmless.
    """
    root = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise WorkerError(f"cannot load a tokenizer from {root}: {exc}") from None
    if tokenizer.eos_token_id is None:
        raise WorkerError(f"the tokenizer in {root} has no EOS token; set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load(cls, path: str | os.PathLike, *, device: torch.device, dtype: torch.dtype, attn_implementation: str | None, what: str):
    root = check_model_dir(path, what=what)
    kwargs = {"use_safetensors": True, "trust_remote_code": False, _DTYPE_KWARG: dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = cls.from_pretrained(root, **kwargs)
    except ValueError as exc:
        if attn_implementation == "sdpa" and "sdpa" in str(exc).lower():
            raise WorkerError(
                f"the model in {root} does not support attn_implementation='sdpa'; set attn_implementation=eager"
            ) from None
        raise WorkerError(f"cannot load {what} from {root}: {exc}") from None
    except OSError as exc:
        raise WorkerError(f"cannot load {what} from {root}: {exc}") from None
    return model.to(device)


def load_causal_lm(
    path: str | os.PathLike, *, device: torch.device, dtype: torch.dtype, attn_implementation: str | None = None
) -> PreTrainedModel:
    """``AutoModelForCausalLM`` from a safetensors directory, on ``device`` in ``dtype``, in eval mode."""
    return _load(AutoModelForCausalLM, path, device=device, dtype=dtype, attn_implementation=attn_implementation, what="policy model").eval()


def load_trunk(
    path: str | os.PathLike, *, device: torch.device, dtype: torch.dtype, attn_implementation: str | None = None
) -> PreTrainedModel:
    """The base transformer (``AutoModel``: the causal LM without its LM head) from a safetensors directory."""
    return _load(AutoModel, path, device=device, dtype=dtype, attn_implementation=attn_implementation, what="model")


def model_config(path: str | os.PathLike):
    """The directory's ``PretrainedConfig`` (no weights read)."""
    root = check_model_dir(path)
    return AutoConfig.from_pretrained(root, trust_remote_code=False)


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings allow, when the config says."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def causal_mask_4d(attention_mask: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """The full attention mask [b, 1, n, n] of a padded batch: causal, padding keys masked.

    Passing it ready-made skips transformers' per-call mask construction, which
    costs more than the whole forward pass of a small model on a CPU. Boolean
    for SDPA attention, additive (0 / dtype min) for eager; a padding query
    attends to itself so its (ignored) row is finite.
    """
    n = attention_mask.shape[1]
    device = attention_mask.device
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=device))
    mask = causal[None, None] & attention_mask[:, None, None, :].bool()
    mask = mask | torch.eye(n, dtype=torch.bool, device=device)[None, None]
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", "sdpa") == "sdpa":
        return mask
    dtype = next(model.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)


def key_mask_4d(attention_mask: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """The attention mask [b, 1, 1, n] of one new query token over n cached keys (padding masked)."""
    mask = attention_mask[:, None, None, :].bool()
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", "sdpa") == "sdpa":
        return mask
    dtype = next(model.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def resolve_max_length(requested: int | None, model_path: str | os.PathLike) -> int:
    """The sequence length a step trains at: ``requested`` (refused past the model's
    position embeddings), or the model's limit capped at 1024 when None."""
    from workers.common.config import ConfigError

    limit = max_positions(model_config(model_path))
    if requested is not None and limit is not None and requested > limit:
        raise ConfigError(f"max_length ({requested}) exceeds the model's {limit} position embeddings")
    return requested or min(limit or 1024, 1024)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (modules and the attention-dropout config attributes)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "attn_dropout"):
            value = getattr(module, attr, None)
            if isinstance(value, float):
                setattr(module, attr, 0.0)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing what was there, without a window with neither."""
    if final.exists():
        old = final.with_name(f".tmp-old-{uuid.uuid4().hex}-{final.name}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def staging_dir(final: Path) -> Path:
    """A fresh temporary directory beside ``final`` (same filesystem, so the rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{uuid.uuid4().hex}-{final.name}")
    tmp.mkdir()
    return tmp


def save_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, final: str | os.PathLike,
                   *, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """``save_pretrained`` (safetensors) of the model and tokenizer into ``final``, atomically (``state_dict``:
    these weights instead of the model's own, as a sharded model's gathered ones)."""
    final = Path(final)
    tmp = staging_dir(final)
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
