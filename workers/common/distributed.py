"""Data parallelism under torchrun: DDP for a model that fits one device, FSDP2 for one that does not.

    torchrun --nproc_per_node N -m workers.<step> --config cfg.json

runs the same config in N processes (``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK`` come from torchrun). Every process builds the same model
from the same seed and takes its own contiguous share of each global batch;
the gradients are averaged over the processes, so an optimizer step is the
step one process would take on the whole batch (each step normalises its
loss by the global count of what it averages over, so unequal shares of
tokens do not reweight anything).

- ``parallel="ddp"`` (the default): ``DistributedDataParallel``, each process
  holds the whole model and optimizer state; gradients are all-reduced while
  the backward pass runs.
- ``parallel="fsdp"``: FSDP2 (``fully_shard``) on every transformer block and
  on the root, so parameters, gradients and optimizer state are sharded over
  the processes; with ``dtype=bfloat16`` the blocks compute and all-gather in
  bfloat16 while the float32 master weights stay sharded (gradients are
  reduced in float32).

Rank 0 writes a step's files (the Hugging Face or PM directory, the
summary): ``gathered_state`` gathers a sharded model's whole weights into it
(every process calls it), and ``on_main`` runs the writing there and holds
the others at a barrier until it is done.

CPU processes talk over gloo, CUDA processes over NCCL, one device each
(``cuda:LOCAL_RANK``). One process (no torchrun, or ``--nproc_per_node 1``)
runs exactly as before: ``SINGLE``, no process group, nothing wrapped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from workers.common.config import ConfigError
from workers.common.runtime import resolve_device

STRATEGIES = ("ddp", "fsdp")
"""how a model is spread over the processes of a torchrun launch"""

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """The processes a step runs in, and this one's place among them."""

    size: int
    """number of processes (torchrun's WORLD_SIZE)"""
    rank: int
    """this process's index, 0 .. size - 1"""
    local_rank: int
    """this process's index on its node (its CUDA device)"""
    strategy: str = "ddp"
    """ddp or fsdp (see the module docstring)"""

    @property
    def main(self) -> bool:
        """Whether this process writes the step's files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded over the processes (fsdp with more than one)."""
        return self.distributed and self.strategy == "fsdp"

    def share(self, n: int) -> slice:
        """This process's contiguous share of ``n`` rows (``n`` a multiple of the world size)."""
        if n % self.size:
            raise ValueError(f"{n} rows do not split evenly over {self.size} processes")
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` (same shape on each) concatenated along dim 0, in rank order."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def gather_lists(self, items: list[Any]) -> list[Any]:
        """Every process's ``items`` (JSON-like values) concatenated in rank order."""
        if not self.distributed:
            return list(items)
        import torch.distributed as dist

        parts: list[Any] = [None] * self.size
        dist.all_gather_object(parts, list(items))
        return [item for part in parts for item in part]

    def sum(self, value: torch.Tensor | float) -> torch.Tensor:
        """The sum of ``value`` over the processes (a float64 CPU tensor for a number)."""
        tensor = value.detach().clone() if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64)
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean(self, value: torch.Tensor | float) -> torch.Tensor:
        """The mean of ``value`` over the processes."""
        return self.sum(value) / self.size

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


SINGLE = World(size=1, rank=0, local_rank=0)
"""one process: no process group, nothing wrapped"""


def launched_world_size() -> int:
    """The WORLD_SIZE torchrun set (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_strategy(parallel: str) -> None:
    """ConfigError unless ``parallel`` is a known strategy."""
    if parallel not in STRATEGIES:
        raise ConfigError(f"parallel ({parallel!r}) must be one of {', '.join(STRATEGIES)}")


def check_divisible(name: str, value: int, world_size: int) -> None:
    """ConfigError unless a global batch size splits evenly over the processes."""
    if value % world_size:
        raise ConfigError(
            f"{name} ({value}) must be a multiple of the number of processes ({world_size}): each process takes "
            f"an equal share of every batch; change {name} or --nproc_per_node"
        )


def refuse_distributed(step: str) -> None:
    """ConfigError for a step that runs in one process only, when torchrun started several."""
    if (size := launched_world_size()) > 1:
        raise ConfigError(
            f"{step} runs in one process only, and torchrun started {size}; run it without torchrun "
            "(or --nproc_per_node 1)"
        )


def init_world(parallel: str, device_spec: str) -> tuple[World, torch.device]:
    """The world of this launch and this process's device; initialises the process group under torchrun.

    Under torchrun each process takes ``cuda:LOCAL_RANK`` (``device`` auto or cuda) over NCCL, or the CPU
    over gloo (``device`` cpu, or auto on a machine without CUDA). ``cuda:N`` is refused there: the local
    rank picks the device."""
    check_strategy(parallel)
    size = launched_world_size()
    if size == 1:
        return World(1, 0, 0, parallel), resolve_device(device_spec)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    spec = device_spec.strip().lower()
    if spec.startswith("cuda:"):
        raise ConfigError(
            f"device ({device_spec!r}) names one GPU, but under torchrun each process takes cuda:LOCAL_RANK; "
            "set device to auto or cuda"
        )
    device = resolve_device(spec)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun started {local_rank + 1}+ processes on this node, but torch sees "
                f"{torch.cuda.device_count()} CUDA device(s); set --nproc_per_node to at most that"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return World(size, rank, local_rank, parallel), device


def shutdown(world: World) -> None:
    """Leave the process group (every process, at the end of a step)."""
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


# -- wrapping models -------------------------------------------------------------------------------


class MethodForward(nn.Module):
    """A module whose ``forward`` is one method of ``inner`` (DDP synchronises gradients of forward calls only)."""

    def __init__(self, inner: nn.Module, method: str):
        super().__init__()
        self.inner = inner
        self.method = method

    def forward(self, *args, **kwargs):
        return getattr(self.inner, self.method)(*args, **kwargs)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer (the longest ``nn.ModuleList`` in it): FSDP2's sharding units."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ConfigError(f"parallel=fsdp found no transformer blocks (nn.ModuleList) in {type(model).__name__}")
    return list(max(lists, key=len))


def wrap(model: nn.Module, world: World, device: torch.device, *, compute_dtype: torch.dtype,
         method: str | None = None) -> Any:
    """``model`` ready for data-parallel training in ``world``: what to call for training passes.

    ddp: a ``DistributedDataParallel`` around ``model`` (around ``MethodForward(model, method)`` when the
    training pass is a method other than ``forward``). fsdp: ``model`` sharded in place, or its ``method``,
    registered as a forward method so that it gathers parameters too. One process: ``model`` (or its method
    module), untouched. Build the optimizer after this (FSDP2 replaces the parameters by sharded ones)."""
    target = MethodForward(model, method) if method and world.strategy == "ddp" else model
    if not world.distributed:
        return target
    if world.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            target, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # The root's state is set up on its first forward; set it up now, so that a submodule called on its own
    # first (the policy LM sampling, inside ``gathered``) does not take the root's place.
    model._get_fsdp_state()._lazy_init()
    if method:
        register_fsdp_forward_method(model, method)
        return getattr(model, method)
    return model


@contextlib.contextmanager
def accumulate(trained: Any, world: World, *, sync: bool) -> Iterator[None]:
    """Backward passes in the block reduce their gradients over the processes only when ``sync`` (the last
    micro-batch of an optimizer step); the others accumulate locally (DDP's ``no_sync``, FSDP2's
    ``set_requires_gradient_sync``). ``trained`` is what ``wrap`` returned."""
    if not world.distributed or sync:
        yield
        return
    if world.strategy == "ddp":
        with trained.no_sync():
            yield
        return
    module = getattr(trained, "__self__", trained)  # a registered forward method's module
    module.set_requires_gradient_sync(False, recurse=True)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True, recurse=True)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper or a ``MethodForward``."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        module = module.module
    if isinstance(module, MethodForward):
        module = module.inner
    return module


def full_state_dict(model: nn.Module, world: World) -> dict[str, torch.Tensor]:
    """The model's whole state dict on the CPU, in rank 0 (an empty dict elsewhere). Every process must call
    it under fsdp: the shards are gathered."""
    model = unwrap(model)
    if world.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # A tied parameter (an LM head sharing the embedding) is one Parameter under two names: gathered, the
        # second name would be saved as a copy of its own.
        seen: set[int] = set()
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                sd.pop(name, None)
            seen.add(id(param))
        return sd if world.main else {}
    if not world.main:
        return {}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], world: World) -> None:
    """Load a whole state dict (as ``full_state_dict`` returns, read by every process) into ``model``."""
    model = unwrap(model)
    if world.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)


@contextlib.contextmanager
def gathered(model: nn.Module, world: World) -> Iterator[None]:
    """Under fsdp, the whole parameters on every process for the block (sampling: each process then runs as
    many forward passes as its own rows need, with no collective in them); elsewhere nothing."""
    if not world.sharded:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in unwrap(model).modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.set_reshard_after_forward(False)
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(True)


def gathered_state(model: nn.Module, world: World) -> dict[str, torch.Tensor] | None:
    """The model's whole state dict in rank 0 of a sharded run, to save in place of the model's own (every
    process must call it: the shards are gathered); None elsewhere (unsharded, each process's model is whole;
    ranks other than 0 save nothing)."""
    if not world.sharded:
        return None
    state = full_state_dict(model, world)
    return state if world.main else None


def on_main(world: World, write: Callable[[], T]) -> T | None:
    """``write()`` in rank 0 only (a step's files are written once), then a barrier, so that what it wrote
    exists for every process when this returns: ``write``'s value in rank 0, None in the others."""
    value = write() if world.main else None
    world.barrier()
    return value


def save_hf_dir(model: nn.Module, tokenizer, final, world: World):
    """The model as an ordinary Hugging Face directory, written by rank 0 (every process calls it: under fsdp
    the whole weights are gathered first); returns its path once it exists for every process."""
    from pathlib import Path

    from workers.common.modeling import save_model_dir

    state = gathered_state(model, world)
    on_main(world, lambda: save_model_dir(unwrap(model), tokenizer, final, state_dict=state))
    return Path(final)


def grad_norm_value(norm: torch.Tensor) -> float:
    """A gradient norm as a float (under fsdp ``clip_grad_norm_`` returns a DTensor)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

