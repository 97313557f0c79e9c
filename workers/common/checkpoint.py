"""Training checkpoints: model, optimizer, RNG states and data position; no pickle.

A checkpoint is a directory ``step-00000040/`` holding

- ``model.safetensors``: the module's parameters and buffers (shared tensors once),
- ``optimizer.safetensors``: every tensor of the optimizer state, flattened,
- ``rng.safetensors``: torch's CPU (and CUDA) generator states,
- ``state.json``: the step, data position, optimizer scalars and param groups,
  Python/NumPy RNG states, the config it was written with and anything else
  the step adds.

It is written under a temporary name and renamed into place, so a directory
named ``step-*`` is always complete; a kill mid-write leaves only a
``.tmp-*`` directory, which the next save removes.

A step run by several processes (torchrun; ``workers.common.distributed``)
writes ``torch.distributed.checkpoint`` instead: ``dcp/`` holds the model
and optimizer state (each process its own shard under FSDP2, replicated
tensors once under DDP), ``rng-<rank>.safetensors`` and ``rng-<rank>.json``
each process's generator states, and ``state.json`` (rank 0) records the
world size. Such a checkpoint resumes on the same number of processes only:
the random streams and the shares of each batch are per process, so a run
with another world size is refused with the number it needs (or start over).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from workers.common.config import WorkerError, diff_configs, to_dict
from workers.common.distributed import SINGLE, World, unwrap
from workers.common.metrics import MetricsWriter, atomic_write_text
from workers.common.modeling import staging_dir
from workers.common.runtime import rng_state, seed_everything, set_rng_state

_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint after ``step`` optimizer steps."""
    return f"step-{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


# -- optimizer state as tensors + JSON ---------------------------------------------


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's ``state_dict`` split into named CPU tensors and JSON-able values."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = json.loads(json.dumps(sd["param_groups"], default=_not_json))
    return tensors, {"scalars": scalars, "param_groups": groups}


def _not_json(obj: Any) -> Any:
    raise TypeError(f"optimizer state value {obj!r} ({type(obj).__name__}) cannot be checkpointed as JSON")


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Load what ``optimizer_to_flat`` produced into ``optimizer``."""
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = tensor
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = meta["param_groups"]
    current = optimizer.param_groups
    if len(groups) != len(current):
        raise WorkerError(f"checkpoint has {len(groups)} optimizer param groups, the optimizer has {len(current)}")
    for saved, live in zip(groups, current):
        if len(saved["params"]) != len(live["params"]):
            raise WorkerError(
                f"checkpoint optimizer group has {len(saved['params'])} parameters, the model has {len(live['params'])}"
            )
        for key, value in live.items():  # JSON turned tuples (betas) into lists
            if isinstance(value, tuple) and isinstance(saved.get(key), list):
                saved[key] = tuple(saved[key])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- save / load -------------------------------------------------------------------


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 1,
    world: World = SINGLE,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and keep the newest ``keep`` of them (every process
    of a distributed run calls it)."""
    if world.distributed:
        return _save_sharded(Path(root), step, model=model, optimizer=optimizer, state=state, keep=keep, world=world)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / checkpoint_name(step)
    tmp = staging_dir(final)
    try:
        save_model(unwrap(model), str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_values = rng_state()
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / "rng.safetensors"))
        payload = {"step": step, "optimizer": opt_meta, "rng": rng_values, **state}
        atomic_write_text(tmp / "state.json", json.dumps(payload, sort_keys=True) + "\n")
        for path in tmp.iterdir():  # the rename below must not outrun the data
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(root)[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint_state(path: str | os.PathLike) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint."""
    return json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))


def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    world: World = SINGLE) -> dict[str, Any]:
    """Restore model, optimizer and global RNG states from a checkpoint; return its ``state.json``."""
    path = Path(path)
    written = read_checkpoint_state(path).get("world_size", 1)
    if written != world.size:
        raise WorkerError(
            f"checkpoint {path} was written by {written} process(es) and this run has {world.size}; resume it with "
            f"torchrun --nproc_per_node {written} (1: without torchrun), or start over (resume=false or a new output_dir)"
        )
    if world.distributed:
        return _load_sharded(path, model=model, optimizer=optimizer, world=world)
    model = unwrap(model)
    device = next(model.parameters()).device
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False, device=str(device))
    if missing or unexpected:
        raise WorkerError(
            f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    state = read_checkpoint_state(path)
    optimizer_from_flat(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state


def _save_sharded(root: Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  state: dict[str, Any], keep: int, world: World) -> Path:
    """A ``torch.distributed.checkpoint`` of a distributed run: every process writes its part, rank 0 the rest
    and the rename that makes it complete."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}"
    if world.main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    world.barrier()
    model_sd, optim_sd = get_state_dict(unwrap(model), optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    rng_tensors, rng_values = rng_state()
    save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / f"rng-{world.rank}.safetensors"))
    atomic_write_text(tmp / f"rng-{world.rank}.json", json.dumps(rng_values) + "\n")
    world.barrier()
    if world.main:
        payload = {"step": step, "world_size": world.size, "parallel": world.strategy, **state}
        atomic_write_text(tmp / "state.json", json.dumps(payload, sort_keys=True) + "\n")
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[: -max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


def _load_sharded(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    inner = unwrap(model)
    model_sd, optim_sd = get_state_dict(inner, optimizer)
    loaded = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(loaded, checkpoint_id=str(path / "dcp"))
    set_state_dict(inner, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    rng_values = json.loads((path / f"rng-{world.rank}.json").read_text(encoding="utf-8"))
    set_rng_state(load_file(str(path / f"rng-{world.rank}.safetensors")), rng_values)
    return read_checkpoint_state(path)


def resume_or_start(
    cfg: Any, out: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, run_only_fields: set[str],
    world: World = SINGLE,
) -> tuple[MetricsWriter, int]:
    """The metrics writer and the first step of a single-model training step (sft, dpo): resumed from the
    newest checkpoint under ``out/checkpoints`` (refused when it was written with another config, fields
    in ``run_only_fields`` aside), or started clean with ``cfg.seed`` (``cfg.resume=False`` discards the
    checkpoints first)."""
    ckpt_root = out / "checkpoints"
    writer = MetricsWriter(out / "metrics.jsonl", enabled=world.main)
    if not cfg.resume and world.main:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    world.barrier()
    latest = latest_checkpoint(ckpt_root) if cfg.resume else None
    if latest is None:
        writer.clear()
        seed_everything(cfg.seed)
        return writer, 0
    diffs = diff_configs(read_checkpoint_state(latest).get("config", {}), to_dict(cfg), ignore=run_only_fields)
    if diffs:
        raise WorkerError(
            f"checkpoint {latest} was written with a different config ({'; '.join(diffs)}); "
            "run with the same config to resume it, or resume=false to start over"
        )
    start_step = load_checkpoint(latest, model=model, optimizer=optimizer, world=world)["step"]
    writer.rewind(after_step=start_step)
    return writer, start_step


def save_step_checkpoint(cfg: Any, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         world: World = SINGLE) -> None:
    """A checkpoint of a single-model training step under ``cfg.output_dir/checkpoints``: weights, optimizer,
    the config and the data position (``step * cfg.batch_size``)."""
    save_checkpoint(
        Path(cfg.output_dir) / "checkpoints",
        step,
        model=model,
        optimizer=optimizer,
        state={"config": to_dict(cfg), "data_position": step * cfg.batch_size},
        keep=cfg.keep_checkpoints,
        world=world,
    )
