"""What the steps that fine-tune a causal LM on a fixed dataset share: sft and dpo.

Each of those steps trains one causal LM (every weight, or LoRA adapters on
it) with AdamW, one optimizer step per batch drawn from a seeded
``DataOrder``, checkpoints every ``checkpoint_every`` steps and resumes from
the newest checkpoint (``workers.common.checkpoint.resume_or_start``). What
they share lives here, as small functions each step's ``run`` calls in its
own order (rejection_sampling's fine-tuning rounds take the batches, the
reference's logits and the optimizer step; train_pm, whose model is a PM,
the config checks and the loop's pieces):

* ``RUN_ONLY_FIELDS``: the config fields a resumed run (or a re-run) may change;
* ``check_supervised_config``: the config checks each of them makes (called at the
  start of each ``validate()``; each config still declares its own fields);
* ``finished_result``: the result of a finished run of the same config;
* ``start_output``: output_dir with the config in it, written by rank 0;
* ``total_steps``: the optimizer steps of a run, from max_steps or num_epochs;
* ``load_policy`` and ``load_reference``: the trained LM in train mode (float32, or
  LoRA adapters on a frozen base in the compute dtype) and a frozen reference;
* ``Example`` and ``collate``: a record as token ids, and a right-padded batch of
  them with the labels of its loss tokens;
* ``reference_logits``: the frozen reference's logits of a batch (with LoRA, the
  policy's with its adapters off);
* ``this_run`` (``workers.common.policy_step``'s, the one definition): the steps
  this invocation runs;
* ``set_learning_rate`` and ``optimizer_step``: a step's scheduled rate, then
  clipping, the AdamW step and the gradients zeroed;
* ``log_due``, ``optim_record``, ``step_done`` and ``checkpoint_due``: when a step
  writes its metrics line, the keys every such line has, the progress bar, and when
  a step ends with a checkpoint;
* ``stop_early``: the checkpoint and the partial result of a run stopped by
  max_steps_this_run;
* ``save_policy`` and ``finish``: policy/ as an ordinary Hugging Face directory
  (rank 0), then summary.json, which marks the run finished.

The loop over the steps stays in each step's file (cleanrl's layout): what a
batch is and what its loss is differ, and read best where they are used.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from workers.common.checkpoint import save_step_checkpoint
from workers.common.config import ConfigError, check_at_least, check_at_least_or_null, save_config, to_dict
from workers.common.distributed import SINGLE, World, grad_norm_value, on_main, save_hf_dir
from workers.common.metrics import SUMMARY_FILENAME, StepResult, collect_result, finished_metrics, write_json
from workers.common.modeling import disable_dropout, load_causal_lm
from workers.common.policy_step import this_run  # one definition for steps, rollouts and rounds alike
from workers.common.runtime import check_training_dtype
from workers.common.schedule import lr_at

POLICY_DIRNAME = "policy"
"""the trained policy's directory under output_dir"""

RUN_ONLY_FIELDS = {
    "output_dir",
    "max_steps_this_run",
    "progress",
    "num_threads",
    "checkpoint_every",
    "keep_checkpoints",
    "resume",
    "log_every",
    "device",
}
"""config fields that do not change what a run computes (a resume or a re-run may change them)"""


class SupervisedStepConfig(Protocol):
    """The fields every supervised step's config has (each config dataclass declares and documents its own)."""

    @property
    def output_dir(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def learning_rate(self) -> float: ...
    @property
    def lr_schedule(self) -> str: ...
    @property
    def warmup_steps(self) -> int: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def max_grad_norm(self) -> float | None: ...
    @property
    def num_epochs(self) -> float: ...
    @property
    def max_steps(self) -> int | None: ...
    @property
    def max_steps_this_run(self) -> int | None: ...
    @property
    def max_length(self) -> int | None: ...
    @property
    def checkpoint_every(self) -> int: ...
    @property
    def keep_checkpoints(self) -> int: ...
    @property
    def resume(self) -> bool: ...
    @property
    def log_every(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def num_threads(self) -> int | None: ...


def check_supervised_config(cfg: SupervisedStepConfig) -> None:
    """The checks every supervised step's ``validate()`` makes: ConfigError naming the offending values."""
    check_at_least(cfg, ("batch_size", "keep_checkpoints", "log_every"), 1)
    check_at_least_or_null(cfg, ("max_steps", "max_steps_this_run", "num_threads"))
    if not cfg.learning_rate > 0:
        raise ConfigError(f"learning_rate ({cfg.learning_rate}) must be > 0")
    check_at_least(cfg, ("warmup_steps", "checkpoint_every", "weight_decay"), 0)
    if cfg.max_grad_norm is not None and not cfg.max_grad_norm > 0:
        raise ConfigError(f"max_grad_norm ({cfg.max_grad_norm}) must be > 0 or null")
    if cfg.max_steps is None and not cfg.num_epochs > 0:
        raise ConfigError(f"num_epochs ({cfg.num_epochs}) must be > 0")
    if cfg.max_length is not None and cfg.max_length < 4:
        raise ConfigError(f"max_length ({cfg.max_length}) must be >= 4")
    check_training_dtype(cfg.dtype)


def finished_result(step: str, cfg: SupervisedStepConfig) -> StepResult | None:
    """The result of a finished run of the same config in output_dir (its summary.json), or None; a finished
    run of another config is refused (``finished_metrics``)."""
    out = Path(cfg.output_dir)
    metrics = finished_metrics(out, cfg, step=step, ignore=RUN_ONLY_FIELDS)
    return None if metrics is None else collect_result(step, out, {"policy": out / POLICY_DIRNAME}, metrics)


def start_output(step: str, cfg: SupervisedStepConfig, world: World = SINGLE) -> Path:
    """output_dir, with this config in it (written by rank 0)."""
    out = Path(cfg.output_dir)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out, step=step)
    return out


def total_steps(cfg: SupervisedStepConfig, records: int) -> int:
    """The optimizer steps of a run: max_steps, else num_epochs passes over ``records`` (at least one step)."""
    return cfg.max_steps or max(1, math.ceil(cfg.num_epochs * records / cfg.batch_size))


# -- models ------------------------------------------------------------------------------------------------


def load_policy(path: str, device: torch.device, compute_dtype: torch.dtype, *, dropout: bool = False,
                lora_r: int = 0, lora_alpha: int = 16) -> torch.nn.Module:
    """The LM to train, in train mode: every weight float32 (AdamW's updates at fine-tuning rates are below
    bfloat16's resolution), computed under autocast; with ``lora_r``, a peft model of float32 adapters
    (initialised from torch's global generator) on frozen base weights in ``compute_dtype``. Dropout is off
    unless ``dropout``."""
    model = load_causal_lm(path, device=device, dtype=compute_dtype if lora_r else torch.float32)
    if not dropout:
        disable_dropout(model)
    if lora_r:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    model.train()
    return model


def load_reference(path: str, device: torch.device, compute_dtype: torch.dtype) -> torch.nn.Module:
    """A frozen reference policy in ``compute_dtype``, in eval mode with dropout off (with dropout, log pi and
    log pi_ref would differ by noise even where the policy is the reference)."""
    reference = load_causal_lm(path, device=device, dtype=compute_dtype)
    disable_dropout(reference)
    reference.requires_grad_(False)
    return reference.eval()


@torch.no_grad()
def reference_logits(policy: torch.nn.Module, reference: torch.nn.Module | None, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
    """The reference's logits [b, n, vocab] of a batch, without gradients; ``reference`` None: the policy (a
    peft LoRA model) with its adapters switched off."""
    if reference is None:
        with policy.disable_adapter():
            return policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return reference(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


# -- data --------------------------------------------------------------------------------------------------


class Example(NamedTuple):
    """One record as token ids."""

    input_ids: list[int]
    """prompt + response + EOS"""
    loss_from: int
    """index of the first token whose prediction is trained (the response's first token)"""


def collate(examples: Sequence[Example], *, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) right-padded; labels are -100 where no loss is taken."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        t = torch.tensor(e.input_ids, dtype=torch.long)
        ids[i, : len(t)] = t
        mask[i, : len(t)] = 1
        labels[i, e.loss_from : len(t)] = t[e.loss_from :]
    return ids, mask, labels


# -- the loop ----------------------------------------------------------------------------------------------


def set_learning_rate(optimizer: torch.optim.Optimizer, cfg: SupervisedStepConfig, step: int, total: int) -> float:
    """Set the learning rate of optimizer step ``step`` (0-based) of ``total`` (warmup, then lr_schedule)."""
    lr = lr_at(step, base=cfg.learning_rate, warmup=cfg.warmup_steps, total=total, schedule=cfg.lr_schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def optimizer_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                   max_grad_norm: float | None) -> torch.Tensor:
    """Clip the gradients' global L2 norm to ``max_grad_norm`` (None: measure it only), take the optimizer
    step and zero the gradients; returns the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def log_due(cfg: SupervisedStepConfig, done: int, total: int) -> bool:
    """Whether the step that makes ``done`` of ``total`` writes a metrics line (every log_every, and the last)."""
    return done % cfg.log_every == 0 or done == total


def optim_record(lr: float, grad_norm: torch.Tensor, epoch: float) -> dict[str, float]:
    """The keys every supervised step's metrics line has besides its losses: the optimizer's and the data's."""
    return {"optim/lr": lr, "optim/grad_norm": grad_norm_value(grad_norm), "data/epoch": epoch}


def step_done(bar: tqdm, loss: float) -> None:
    """One more step on the progress bar, with its loss."""
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)


def checkpoint_due(cfg: SupervisedStepConfig, done: int, total: int) -> bool:
    """Whether the step that makes ``done`` of ``total`` ends with a checkpoint (every checkpoint_every, but
    not the last: the finished run writes its outputs instead)."""
    return bool(cfg.checkpoint_every) and done % cfg.checkpoint_every == 0 and done < total


def stop_early(step: str, cfg: SupervisedStepConfig, done: int, total: int, *, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer, world: World = SINGLE) -> StepResult:
    """A run stopped by max_steps_this_run after ``done`` of ``total`` steps: the checkpoint a re-run resumes
    from, and the partial result."""
    save_step_checkpoint(cfg, done, model=model, optimizer=optimizer, world=world)
    return collect_result(step, Path(cfg.output_dir), {}, {"steps_done": done, "steps": total}, complete=False)


# -- the outputs -------------------------------------------------------------------------------------------


def save_policy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: SupervisedStepConfig,
                world: World = SINGLE, *, lora: bool = False) -> Path:
    """policy/ under output_dir: the trained LM as an ordinary Hugging Face directory in float32, LoRA merged
    into float32 base weights (merged into bfloat16 ones, small updates would round away). Rank 0 writes it;
    every process calls it (under fsdp the whole weights are gathered first)."""
    model.eval()
    lm = model.float().merge_and_unload() if lora else model
    return save_hf_dir(lm, tokenizer, Path(cfg.output_dir) / POLICY_DIRNAME, world)


def finish(step: str, cfg: SupervisedStepConfig, metrics: dict[str, Any], world: World = SINGLE) -> StepResult:
    """The config beside policy/ (saved before), summary.json (the mark of a finished run) and the checkpoints
    removed, by rank 0; every process returns the result once they are written (the others read it back)."""
    out = Path(cfg.output_dir)

    def write() -> StepResult:
        save_config(cfg, out / POLICY_DIRNAME, step=step)
        write_json(out / SUMMARY_FILENAME, {"step": step, "config": to_dict(cfg), "metrics": metrics})
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        return collect_result(step, out, {"policy": out / POLICY_DIRNAME}, metrics)

    result = on_main(world, write)
    return result if result is not None else finished_result(step, cfg)
