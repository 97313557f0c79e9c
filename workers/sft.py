"""sft: supervised fine-tuning of a causal LM on (prompt, response) pairs.

    python -m workers.sft --config sft.json [key=value ...]

The initial policy P0 of the loop (Bai et al. 2022 start PPO from a
context-distilled LM; the demo world starts from a tiny model trained
briefly on a mixed corpus). Each record is encoded as ``prompt + response +
EOS``; the loss is next-token cross-entropy on the response tokens (and on
the prompt's too with ``loss_on_prompt``), averaged over the batch's loss
tokens.

Outputs under ``output_dir``:

    policy/                     the trained model and tokenizer (Hugging Face, safetensors)
    metrics.jsonl               one line per logged step
    summary.json                final metrics and the config
    ratchet_step_config.json    this config
    checkpoints/step-*/         while training; removed once policy/ is written

A killed run resumes from its newest checkpoint and ends with the same
weights as an uninterrupted one.

Under ``torchrun --nproc_per_node N -m workers.sft`` each process takes an
equal share of every batch (``batch_size`` a multiple of N) with DDP or
FSDP2 (``parallel``; see ``workers.common.distributed``): the same steps as
one process, within float rounding; rank 0 writes the outputs.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from formats.chat import hh_text, message_problems, prompt_token_ids, special_prefix
from workers.common.checkpoint import resume_or_start, save_step_checkpoint
from workers.common.config import ConfigError, WorkerError, cli, save_config, to_dict
from workers.common.data import read_jsonl
from workers.common.distributed import (
    World, check_divisible, check_strategy, grad_norm_value, init_world, launched_world_size, save_hf_dir, shutdown,
    wrap,
)
from workers.common.metrics import SUMMARY_FILENAME, StepResult, collect_result, finished_metrics, write_json
from workers.common.modeling import (
    resolve_max_length,
    check_model_dir,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
)
from workers.common.runtime import autocast, check_training_dtype, progress, resolve_dtype, set_threads, synchronize
from workers.common.schedule import DataOrder, adamw, lr_at

STEP = "sft"
POLICY_DIRNAME = "policy"

# Fields that may differ between a run and the run that resumes it.
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


@dataclass(frozen=True)
class SFTConfig:
    """Config of the sft step."""

    model_path: str
    """the causal LM directory (Hugging Face, safetensors) to fine-tune"""
    dataset_path: str
    """JSONL, one {"prompt", "response"} a line (or {"messages", "response"}: a chat prompt)"""
    output_dir: str
    """where policy/, metrics, summary and checkpoints go"""
    seed: int = 0
    """seed of the data order and dropout"""
    batch_size: int = 32
    """sequences per optimizer step"""
    learning_rate: float = 1e-4
    """peak AdamW learning rate"""
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """decay after warmup: none, linear to 0, or cosine to 0"""
    warmup_steps: int = 0
    """steps of linear warmup from 0 to learning_rate"""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (matrices only)"""
    max_grad_norm: float | None = 1.0
    """clip the gradient's global L2 norm to this (None: no clipping)"""
    num_epochs: float = 1.0
    """passes over the data (fractions allowed); ignored when max_steps is set"""
    max_steps: int | None = None
    """total optimizer steps (None: from num_epochs)"""
    max_steps_this_run: int | None = None
    """stop (with a checkpoint) after this many steps in this invocation; a re-run resumes"""
    max_length: int | None = None
    """longest prompt + response in tokens, EOS included; longer records keep the end of the prompt
    (None: the model's position limit, at most 1024)"""
    loss_on_prompt: bool = False
    """also train on the prompt tokens (False: response tokens only, the usual SFT loss)"""
    disable_dropout: bool = False
    """turn off dropout while training"""
    checkpoint_every: int = 200
    """steps between checkpoints (0: only when stopping early)"""
    keep_checkpoints: int = 1
    """checkpoints kept (newest)"""
    resume: bool = True
    """resume from the newest checkpoint in output_dir (False: discard checkpoints and start over)"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N (under torchrun: auto, cuda or cpu; each process takes
    cuda:LOCAL_RANK)"""
    dtype: str = "auto"
    """compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16 (weights stay float32)"""
    parallel: str = "ddp"
    """under torchrun: ddp (each process holds the model) or fsdp (FSDP2: parameters, gradients and optimizer
    state sharded over the processes); one process ignores it"""
    num_threads: int | None = None
    """torch CPU threads (None: torch's default)"""
    log_every: int = 10
    """steps between metrics.jsonl lines"""
    progress: bool = True
    """show a progress bar on stderr"""

    def validate(self) -> None:
        """Raise ConfigError naming the offending values."""
        for name in ("batch_size", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 1")
        for name in ("max_steps", "max_steps_this_run", "num_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} ({value}) must be >= 1 or null")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate ({self.learning_rate}) must be > 0")
        if self.warmup_steps < 0 or self.checkpoint_every < 0 or self.weight_decay < 0:
            raise ConfigError(
                f"warmup_steps ({self.warmup_steps}), checkpoint_every ({self.checkpoint_every}) and "
                f"weight_decay ({self.weight_decay}) must be >= 0"
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm ({self.max_grad_norm}) must be > 0 or null")
        if self.max_steps is None and not self.num_epochs > 0:
            raise ConfigError(f"num_epochs ({self.num_epochs}) must be > 0")
        if self.max_length is not None and self.max_length < 4:
            raise ConfigError(f"max_length ({self.max_length}) must be >= 4")
        check_training_dtype(self.dtype)
        check_strategy(self.parallel)
        check_divisible("batch_size", self.batch_size, launched_world_size())


# -- data ---------------------------------------------------------------------------


class Example(NamedTuple):
    """One record as token ids."""

    input_ids: list[int]
    """prompt + response + EOS"""
    loss_from: int
    """index of the first token whose prediction is trained (the response's first token)"""


def load_examples(path: str, tokenizer, *, max_length: int, loss_on_prompt: bool) -> tuple[list[Example], int]:
    """Encode the dataset; returns (examples, how many prompts were cut from the left)."""
    prefix = special_prefix(tokenizer)
    prompts, messages, responses = [], [], []
    for lineno, obj in read_jsonl(path, what="SFT dataset"):
        if "messages" in obj:  # a chat prompt (workers.common.chat); its text is derived when the line has none
            problems = message_problems(obj["messages"])
            if problems:
                raise WorkerError(f"SFT dataset {path} line {lineno}: {problems[0]}")
            obj = {"prompt": hh_text(obj["messages"]), **obj}
        for key in ("prompt", "response"):
            if not isinstance(obj.get(key), str):
                raise WorkerError(f"SFT dataset {path} line {lineno}: field {key!r} must be a string")
        prompts.append(obj["prompt"])
        messages.append(obj.get("messages"))
        responses.append(obj["response"])
    if not prompts:
        raise WorkerError(f"SFT dataset {path} is empty: there is nothing to train on")
    # Leading special tokens included; a prompt with messages goes through the chat template when there is one.
    p_ids = prompt_token_ids(tokenizer, prompts, messages)
    r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    out, cut = [], 0
    for p, r in zip(p_ids, r_ids):
        r = r + [tokenizer.eos_token_id]
        if len(r) + len(prefix) + 1 > max_length:
            raise WorkerError(
                f"a response of {len(r)} tokens does not fit max_length ({max_length}) with a prompt; raise max_length"
            )
        if len(p) + len(r) > max_length:
            head = prefix if p[: len(prefix)] == prefix else []
            keep = max_length - len(r) - len(head)
            p = head + p[len(p) - keep :]
            cut += 1
        out.append(Example(p + r, 1 if loss_on_prompt else len(p)))
    return out, cut


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


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross-entropy, number of loss tokens) for logits [b, n, vocab] and labels [b, n]."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, (shift_labels != -100).sum()


# -- the step -------------------------------------------------------------------------


def run(cfg: SFTConfig) -> StepResult:
    """Fine-tune ``model_path`` on ``dataset_path``; write policy/ and return its checksums and metrics."""
    # 1. Setup: validate, machine, a finished earlier run, data.
    cfg.validate()
    set_threads(cfg.num_threads)
    out = Path(cfg.output_dir)
    check_model_dir(cfg.model_path, what="base model")
    max_length = resolve_max_length(cfg.max_length, cfg.model_path)
    finished = _finished_result(cfg, out)
    if finished is not None:
        return finished
    world, device = init_world(cfg.parallel, cfg.device)
    try:
        return _train(cfg, out, world, device, max_length)
    finally:
        shutdown(world)


def _train(cfg: SFTConfig, out: Path, world: World, device: torch.device, max_length: int) -> StepResult:
    """The run of one process: its share of every batch (all of it alone)."""
    compute_dtype = resolve_dtype(cfg.dtype, device)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out, step=STEP)
    tokenizer = load_tokenizer(cfg.model_path)
    examples, cut = load_examples(cfg.dataset_path, tokenizer, max_length=max_length, loss_on_prompt=cfg.loss_on_prompt)
    # Derived sizes, computed once.
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * len(examples) / cfg.batch_size))
    order = DataOrder(len(examples), seed=cfg.seed)

    # 2. Model and optimizer (float32 master weights; under torchrun wrapped for DDP or sharded by FSDP2 first).
    model = load_causal_lm(cfg.model_path, device=device, dtype=torch.float32)
    if cfg.disable_dropout:
        disable_dropout(model)
    model.train()
    trained = wrap(model, world, device, compute_dtype=compute_dtype)
    optimizer, params = adamw(model, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    # 3. Resume from the newest checkpoint, or start clean.
    ckpt_root = out / "checkpoints"
    writer, start_step = resume_or_start(cfg, out, model=model, optimizer=optimizer,
                                         run_only_fields=RUN_ONLY_FIELDS, world=world)

    # 4. The loop: one optimizer step per batch, each process on its share of it.
    bar = progress(total_steps, desc="sft", enabled=cfg.progress and world.main, initial=start_step)
    train_seconds, tokens, loss_value, steps_this_run = 0.0, 0, float("nan"), 0
    for step in range(start_step, total_steps):
        if cfg.max_steps_this_run is not None and steps_this_run >= cfg.max_steps_this_run:
            save_step_checkpoint(cfg, step, model=model, optimizer=optimizer, world=world)
            bar.close()
            return collect_result(STEP, out, {}, {"steps_done": step, "steps": total_steps}, complete=False)
        t0 = time.perf_counter()
        lr = lr_at(step, base=cfg.learning_rate, warmup=cfg.warmup_steps, total=total_steps, schedule=cfg.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = order.batch(step, cfg.batch_size)[world.share(cfg.batch_size)]
        ids, mask, labels = collate([examples[i] for i in batch], pad_id=tokenizer.pad_token_id)
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        with autocast(device, compute_dtype):
            logits = trained(input_ids=ids, attention_mask=mask).logits
        loss_sum, n_tokens = token_loss(logits, labels)
        # The mean over the whole batch's loss tokens: the processes' gradients are averaged, so each
        # divides its sum by the global count over the number of processes.
        global_tokens = world.sum(n_tokens.float()).clamp(min=1).to(device)
        (loss_sum / (global_tokens / world.size)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        train_seconds += time.perf_counter() - t0
        tokens += int(global_tokens)
        steps_this_run += 1
        loss_value = float(world.sum(loss_sum.detach().double()) / global_tokens.double())
        done = step + 1
        if done % cfg.log_every == 0 or done == total_steps:
            writer.log({
                "step": done,
                "losses/nll": loss_value,
                "optim/lr": lr,
                "optim/grad_norm": grad_norm_value(grad_norm),
                "data/epoch": order.epoch_of(done, cfg.batch_size),
                "perf/tokens_per_s": tokens / train_seconds if train_seconds else None,
            })
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total_steps:
            save_step_checkpoint(cfg, done, model=model, optimizer=optimizer, world=world)
    bar.close()

    # 5. The policy directory (the durable output, rank 0), then the summary that marks the run finished.
    model.eval()
    policy_dir = save_hf_dir(model, tokenizer, out / POLICY_DIRNAME, world)
    if not world.main:
        world.barrier()  # rank 0 writes the summary
        return collect_result(STEP, out, {"policy": policy_dir}, finished_metrics(out, cfg, step=STEP, ignore=RUN_ONLY_FIELDS))
    save_config(cfg, policy_dir, step=STEP)
    metrics: dict[str, Any] = {
        "train/loss_last": loss_value,
        "train/steps": total_steps,
        "data/examples": len(examples),
        "data/truncated_prompts": cut,
        "perf/train_seconds": train_seconds,
        "perf/tokens_per_s": tokens / train_seconds if train_seconds else None,
    }
    write_json(out / SUMMARY_FILENAME, {"step": STEP, "config": to_dict(cfg), "metrics": metrics})
    shutil.rmtree(ckpt_root, ignore_errors=True)
    world.barrier()
    return collect_result(STEP, out, {"policy": policy_dir}, metrics)


def _finished_result(cfg: SFTConfig, out: Path) -> StepResult | None:
    """The result of a finished run of the same config in ``out``; an error for a different config."""
    metrics = finished_metrics(out, cfg, step=STEP, ignore=RUN_ONLY_FIELDS)
    return None if metrics is None else collect_result(STEP, out, {"policy": out / POLICY_DIRNAME}, metrics)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workers.sft --config FILE [key=value ...]``."""
    return cli(SFTConfig, run, argv, prog="workers.sft", description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
