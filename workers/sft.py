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

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from formats.chat import hh_text, message_problems, prompt_token_ids, special_prefix
from workers.common.checkpoint import resume_or_start, save_step_checkpoint
from workers.common.config import WorkerError, cli
from workers.common.data import read_jsonl
from workers.common.distributed import (
    World, check_divisible, check_strategy, init_world, launched_world_size, shutdown, wrap,
)
from workers.common.metrics import StepResult
from workers.common.modeling import check_model_dir, load_tokenizer, resolve_max_length
from workers.common.runtime import autocast, progress, resolve_dtype, set_threads, synchronize
from workers.common.schedule import DataOrder, adamw
from workers.common.supervised_step import (
    RUN_ONLY_FIELDS, Example, check_supervised_config, checkpoint_due, collate, finish, finished_result, load_policy,
    log_due, optim_record, optimizer_step, save_policy, set_learning_rate, start_output, step_done, stop_early,
    this_run, total_steps,
)

STEP = "sft"


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
        check_supervised_config(self)
        check_strategy(self.parallel)
        check_divisible("batch_size", self.batch_size, launched_world_size())


# -- data ---------------------------------------------------------------------------


def load_examples(path: str, tokenizer, *, max_length: int, loss_on_prompt: bool) -> tuple[list[Example], int]:
    """Encode the dataset; returns (examples, how many prompts were cut from the left)."""
    prefix = special_prefix(tokenizer)
    prompts, messages, responses = [], [], []
    for lineno, obj in read_jsonl(path, what="SFT dataset"):
        if "messages" in obj:  # a chat prompt (formats.chat); its text is derived when the line has none
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
    check_model_dir(cfg.model_path, what="base model")
    max_length = resolve_max_length(cfg.max_length, cfg.model_path)
    if (finished := finished_result(STEP, cfg)) is not None:
        return finished
    world, device = init_world(cfg.parallel, cfg.device)
    try:
        return _train(cfg, world, device, max_length)
    finally:
        shutdown(world)


def _train(cfg: SFTConfig, world: World, device: torch.device, max_length: int) -> StepResult:
    """The run of one process: its share of every batch (all of it alone)."""
    compute_dtype = resolve_dtype(cfg.dtype, device)
    out = start_output(STEP, cfg, world)
    tokenizer = load_tokenizer(cfg.model_path)
    examples, cut = load_examples(cfg.dataset_path, tokenizer, max_length=max_length, loss_on_prompt=cfg.loss_on_prompt)
    # Derived sizes, computed once.
    steps_total = total_steps(cfg, len(examples))
    order = DataOrder(len(examples), seed=cfg.seed)

    # 2. Model and optimizer (float32 master weights; under torchrun wrapped for DDP or sharded by FSDP2 first).
    model = load_policy(cfg.model_path, device, compute_dtype, dropout=not cfg.disable_dropout)
    trained = wrap(model, world, device, compute_dtype=compute_dtype)
    optimizer, params = adamw(model, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    # 3. Resume from the newest checkpoint, or start clean.
    writer, start_step = resume_or_start(cfg, out, model=model, optimizer=optimizer,
                                         run_only_fields=RUN_ONLY_FIELDS, world=world)

    # 4. The loop: one optimizer step per batch, each process on its share of it.
    bar = progress(steps_total, desc=STEP, enabled=cfg.progress and world.main, initial=start_step)
    train_seconds, tokens, loss_value = 0.0, 0, float("nan")
    steps = this_run(start_step, steps_total, cfg.max_steps_this_run)
    for step in steps:
        t0 = time.perf_counter()
        lr = set_learning_rate(optimizer, cfg, step, steps_total)
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
        grad_norm = optimizer_step(optimizer, params, cfg.max_grad_norm)
        synchronize(device)
        train_seconds += time.perf_counter() - t0
        tokens += int(global_tokens)
        loss_value = float(world.sum(loss_sum.detach().double()) / global_tokens.double())
        done = step + 1
        if log_due(cfg, done, steps_total):
            writer.log({
                "step": done,
                "losses/nll": loss_value,
                **optim_record(lr, grad_norm, order.epoch_of(done, cfg.batch_size)),
                "perf/tokens_per_s": tokens / train_seconds if train_seconds else None,
            })
        step_done(bar, loss_value)
        if checkpoint_due(cfg, done, steps_total):
            save_step_checkpoint(cfg, done, model=model, optimizer=optimizer, world=world)
    bar.close()
    if steps.stop < steps_total:
        return stop_early(STEP, cfg, steps.stop, steps_total, model=model, optimizer=optimizer, world=world)

    # 5. The policy directory (the durable output, rank 0), then the summary that marks the run finished.
    save_policy(model, tokenizer, cfg, world)
    metrics: dict[str, Any] = {
        "train/loss_last": loss_value,
        "train/steps": steps_total,
        "data/examples": len(examples),
        "data/truncated_prompts": cut,
        "perf/train_seconds": train_seconds,
        "perf/tokens_per_s": tokens / train_seconds if train_seconds else None,
    }
    return finish(STEP, cfg, metrics, world)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workers.sft --config FILE [key=value ...]``."""
    return cli(SFTConfig, run, argv, prog="workers.sft", description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
