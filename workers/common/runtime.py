"""Device, dtype, seeds, RNG state and progress bars for worker steps."""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from workers.common.config import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for CUDA without one is an error, never a fallback."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device ({spec!r}) asks for CUDA, but torch sees no CUDA device on this machine")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device ({spec!r}) does not exist: torch sees {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise ConfigError(f"device ({spec!r}) must be {DEVICE_CHOICES}")


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a CUDA device that supports it, float32 otherwise."""
    spec = spec.strip().lower()
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if spec not in DTYPES:
        raise ConfigError(f"dtype ({spec!r}) must be auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


def check_training_dtype(spec: str) -> None:
    """Refuse float16 for a training step: without loss scaling its gradients underflow
    (bfloat16 has float32's range; float32 weights are kept either way)."""
    if spec.strip().lower() == "float16":
        raise ConfigError("dtype (float16) is not supported for training; use bfloat16 or float32")


def set_threads(num_threads: int | None) -> None:
    """Limit torch's CPU threads (None leaves torch's default)."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global RNG states: (tensors for safetensors, JSON-able values)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    values = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, values


def set_rng_state(tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8).cpu())
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k].to(torch.uint8).cpu() for k in cuda[: torch.cuda.device_count()]])
    py_version, py_state, py_gauss = values["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    name, keys, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def progress(total: int, *, desc: str, enabled: bool, initial: int = 0, unit: str = "step") -> tqdm:
    """A tqdm bar on stderr (a no-op bar when disabled)."""
    return tqdm(
        total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True
    )


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Mixed precision for a lower ``dtype`` (float32 master weights stay as they are)."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (so timings measure work, not launches)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
