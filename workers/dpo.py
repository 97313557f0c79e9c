"""dpo: direct preference optimisation of a causal LM on a comparisons snapshot.

    python -m workers.dpo --config dpo.json [key=value ...]

DPO (Rafailov et al. 2023) trains the policy on the labelled comparisons
directly, without a preference model or sampling: each pair (A, B) is
encoded as ``prompt + response + EOS`` twice, the summed log-probability of
each response's tokens is taken under the policy (with gradients) and under
a frozen reference policy (``ref_model_path``, by default the starting
model), and the loss is ``workers.rl.preference.preference_loss`` (DPO's
sigmoid loss or IPO's squared one), ties kept with target 1/2 unless
``ties`` is ``drop``. The implicit reward of a response is
beta * (log pi - log pi_ref); the held-out accuracy is the share of decisive
held-out pairs whose preferred response has the higher implicit reward.

Outputs under ``output_dir``:

    policy/                     the trained model and tokenizer (Hugging Face, safetensors; LoRA merged)
    metrics.jsonl               one line per logged step
    summary.json                final metrics and the config
    ratchet_step_config.json    this config
    checkpoints/step-*/         while training; removed once policy/ is written

A killed run resumes from its newest checkpoint and ends with the same
weights as an uninterrupted one.
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

from formats.chat import prompt_token_ids, special_prefix
from workers.common.checkpoint import resume_or_start, save_step_checkpoint
from workers.common.config import ConfigError, WorkerError, cli, save_config, to_dict
from workers.common.distributed import refuse_distributed
from workers.common.data import Comparison, load_comparisons, split_comparisons
from workers.common.metrics import SUMMARY_FILENAME, StepResult, collect_result, finished_metrics, write_json
from workers.common.modeling import (
    check_model_dir,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    resolve_max_length,
    save_model_dir,
)
from workers.common.rollout import check_same_vocabulary
from workers.common.runtime import autocast, check_training_dtype, progress, resolve_device, resolve_dtype, set_threads, synchronize
from workers.common.schedule import DataOrder, adamw, lr_at
from workers.rl.preference import preference_loss
from workers.sft import Example, collate

STEP = "dpo"
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
class DPOConfig:
    """Config of the dpo step."""

    model_path: str
    """the causal LM directory (Hugging Face, safetensors) to train: the starting policy"""
    dataset_path: str
    """comparisons JSONL (a dataset snapshot): {"prompt", "response_a", "response_b", "choice", "strength"?} a line"""
    output_dir: str
    """where policy/, metrics, summary and checkpoints go"""
    ref_model_path: str | None = None
    """the frozen reference policy of the implicit reward (None: model_path, as in the paper)"""
    beta: float = 0.1
    """the implicit reward's scale beta: r = beta * (log pi - log pi_ref); larger keeps closer to the reference"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's loss (Rafailov et al. eq. 7); ipo: IPO's squared loss (Azar et al. eq. 17)"""
    label_smoothing: float = 0.0
    """conservative DPO: a decisive label is taken as right with probability 1 - label_smoothing (sigmoid only)"""
    ties: Literal["keep", "drop"] = "keep"
    """keep: ties train with target 1/2 (equal implicit rewards); drop: ties are left out of training"""
    seed: int = 0
    """seed of the data order"""
    batch_size: int = 32
    """comparison pairs per optimizer step (2 x batch_size sequences per forward pass)"""
    learning_rate: float = 1e-6
    """peak AdamW learning rate (the paper's 1e-6 for full fine-tuning: DPO's gradient does not shrink as
    the policy drifts, so SFT-sized rates overfit within an epoch; raise it with LoRA or tiny models)"""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """decay after warmup: none (the paper), linear to 0, or cosine to 0"""
    warmup_steps: int = 0
    """steps of linear warmup from 0 to learning_rate"""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (matrices only)"""
    max_grad_norm: float | None = 1.0
    """clip the gradient's global L2 norm to this (None: no clipping)"""
    num_epochs: float = 1.0
    """passes over the training pairs (fractions allowed); ignored when max_steps is set"""
    max_steps: int | None = None
    """total optimizer steps (None: from num_epochs)"""
    max_steps_this_run: int | None = None
    """stop (with a checkpoint) after this many steps in this invocation; a re-run resumes"""
    max_length: int | None = None
    """longest prompt + response in tokens, EOS included; longer pairs keep the end of the prompt
    (None: the model's position limit, at most 1024)"""
    heldout_fraction: float = 0.1
    """fraction of comparisons held out for the implicit-reward accuracy, chosen by hash of split_by"""
    split_by: Literal["prompt", "record"] = "prompt"
    """what the held-out split hashes: the prompt (no prompt in both splits) or the whole record"""
    eval_every: int = 0
    """steps between held-out evaluations (0: only at the end)"""
    lora_r: int = 0
    """LoRA rank (0: train every weight); with LoRA the reference is the policy with its adapters switched off"""
    lora_alpha: int = 16
    """LoRA alpha"""
    checkpoint_every: int = 200
    """steps between checkpoints (0: only when stopping early)"""
    keep_checkpoints: int = 1
    """checkpoints kept (newest)"""
    resume: bool = True
    """resume from the newest checkpoint in output_dir (False: discard checkpoints and start over)"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N"""
    dtype: str = "auto"
    """compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16 (trained weights stay float32;
    the reference and a LoRA policy's base weights are held in this dtype)"""
    num_threads: int | None = None
    """torch CPU threads (None: torch's default)"""
    log_every: int = 10
    """steps between metrics.jsonl lines"""
    progress: bool = True
    """show a progress bar on stderr"""

    @property
    def reference_path(self) -> str:
        """The reference policy's directory."""
        return self.ref_model_path or self.model_path

    def validate(self) -> None:
        """Raise ConfigError naming the offending values."""
        for name in ("batch_size", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 1")
        for name in ("max_steps", "max_steps_this_run", "num_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} ({value}) must be >= 1 or null")
        if not self.beta > 0:
            raise ConfigError(f"beta ({self.beta}) must be > 0")
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ConfigError(f"loss_type ({self.loss_type!r}) must be one of sigmoid, ipo")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing ({self.label_smoothing}) must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError(f"label_smoothing ({self.label_smoothing}) applies to loss_type sigmoid, not {self.loss_type}")
        if self.ties not in ("keep", "drop"):
            raise ConfigError(f"ties ({self.ties!r}) must be keep or drop")
        if self.split_by not in ("prompt", "record"):
            raise ConfigError(f"split_by ({self.split_by!r}) must be prompt or record")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate ({self.learning_rate}) must be > 0")
        for name in ("warmup_steps", "checkpoint_every", "weight_decay", "eval_every", "lora_r"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm ({self.max_grad_norm}) must be > 0 or null")
        if self.max_steps is None and not self.num_epochs > 0:
            raise ConfigError(f"num_epochs ({self.num_epochs}) must be > 0")
        if self.max_length is not None and self.max_length < 4:
            raise ConfigError(f"max_length ({self.max_length}) must be >= 4")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction ({self.heldout_fraction}) must be in [0, 1)")
        if self.lora_r and Path(self.reference_path).resolve() != Path(self.model_path).resolve():
            raise ConfigError(
                f"with LoRA (lora_r={self.lora_r}) the reference is the policy with its adapters off, so "
                f"ref_model_path ({self.ref_model_path}) must be null or model_path ({self.model_path})"
            )
        check_training_dtype(self.dtype)


# -- data ---------------------------------------------------------------------------


class Pair(NamedTuple):
    """One comparison as token ids."""

    a: Example
    """prompt + response_a + EOS; loss_from is the first response token"""
    b: Example
    """prompt + response_b + EOS"""
    target: float
    """labelled P(A preferred): 1, 0 or 0.5"""


def encode_pairs(comps: Sequence[Comparison], tokenizer, *, max_length: int) -> tuple[list[Pair], int]:
    """Encode comparisons; returns (pairs, how many prompts were cut from the left to fit max_length)."""
    if not comps:
        return [], 0
    prefix = special_prefix(tokenizer)
    eos = tokenizer.eos_token_id
    # Leading special tokens included; a prompt with messages goes through the chat template when there is one.
    p_ids = prompt_token_ids(tokenizer, [c.prompt for c in comps], [c.messages for c in comps])
    a_ids = tokenizer([c.response_a for c in comps], add_special_tokens=False)["input_ids"]
    b_ids = tokenizer([c.response_b for c in comps], add_special_tokens=False)["input_ids"]
    out, cut = [], 0
    for comp, p, ra, rb in zip(comps, p_ids, a_ids, b_ids):
        ra, rb = ra + [eos], rb + [eos]
        longest = max(len(ra), len(rb))
        if longest + len(prefix) + 1 > max_length:
            raise WorkerError(
                f"a response of {longest} tokens does not fit max_length ({max_length}) with a prompt; raise max_length"
            )
        if len(p) + longest > max_length:
            # One prompt cut for both responses: A and B must be scored in the same context.
            head = prefix if p[: len(prefix)] == prefix else []
            keep = max_length - longest - len(head)
            p = head + p[len(p) - keep :]
            cut += 1
        out.append(Pair(Example(p + ra, len(p)), Example(p + rb, len(p)), comp.target))
    return out, cut


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities [b] of the labelled tokens (labels != -100) for logits [b, n, vocab]."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    token_logps = torch.log_softmax(shift_logits, dim=-1).gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)


def pair_logps(
    policy: torch.nn.Module, reference: torch.nn.Module | None, pairs: Sequence[Pair], *, pad_id: int,
    device: torch.device, compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy_a, policy_b, ref_a, ref_b, target), each shape [b], for one micro-batch of pairs.

    A and B go through one forward pass of 2b sequences (the reference's under no grad);
    ``reference`` None: the policy (a peft LoRA model) with its adapters switched off.
    """
    ids, mask, labels = collate([p.a for p in pairs] + [p.b for p in pairs], pad_id=pad_id)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    target = torch.tensor([p.target for p in pairs], dtype=torch.float32, device=device)
    b = len(pairs)
    with autocast(device, compute_dtype):
        policy_logps = sequence_logps(policy(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels)
        with torch.no_grad():
            if reference is None:
                with policy.disable_adapter():
                    ref_logits = policy(input_ids=ids, attention_mask=mask, use_cache=False).logits
            else:
                ref_logits = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits
            ref_logps = sequence_logps(ref_logits, labels)
    return policy_logps[:b], policy_logps[b:], ref_logps[:b], ref_logps[b:], target


@torch.no_grad()
def heldout_accuracy(
    policy: torch.nn.Module, reference: torch.nn.Module | None, pairs: Sequence[Pair], *, batch_size: int, pad_id: int,
    device: torch.device, compute_dtype: torch.dtype,
) -> float | None:
    """Share of decisive pairs whose preferred response has the higher implicit reward (None: no decisive pair)."""
    decisive = [p for p in pairs if p.target != 0.5]
    if not decisive:
        return None
    right = 0
    for start in range(0, len(decisive), batch_size):
        chunk = decisive[start : start + batch_size]
        pa, pb, ra, rb, target = pair_logps(policy, reference, chunk, pad_id=pad_id, device=device, compute_dtype=compute_dtype)
        # beta > 0 scales both rewards alike, so the sign of the log-ratio gap decides.
        gap = torch.where(target > 0.5, 1.0, -1.0) * ((pa - ra) - (pb - rb))
        right += int((gap > 0).sum())
    return right / len(decisive)


def _number(value: torch.Tensor) -> float | None:
    """A stat as a JSON-safe float (None for nan: a batch without decisive pairs has no accuracy)."""
    x = float(value)
    return None if math.isnan(x) else x


# -- the step -------------------------------------------------------------------------


def run(cfg: DPOConfig) -> StepResult:
    """Train ``model_path`` by DPO on ``dataset_path``; write policy/ and return its checksums and metrics."""
    # 1. Setup: validate, machine, a finished earlier run, data.
    refuse_distributed(STEP)  # one process only: see workers.common.distributed
    cfg.validate()
    set_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    compute_dtype = resolve_dtype(cfg.dtype, device)
    out = Path(cfg.output_dir)
    check_model_dir(cfg.model_path, what="base model")
    if cfg.reference_path != cfg.model_path:
        check_model_dir(cfg.reference_path, what="reference policy")
        check_same_vocabulary(cfg.model_path, cfg.reference_path, "reference policy")
    max_length = resolve_max_length(cfg.max_length, cfg.model_path)
    finished = _finished_result(cfg, out)
    if finished is not None:
        return finished
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, step=STEP)
    tokenizer = load_tokenizer(cfg.model_path)
    comps = load_comparisons(cfg.dataset_path)
    if not comps:
        raise WorkerError(f"comparison dataset {cfg.dataset_path} is empty: there is nothing to train on")
    train_comps, heldout_comps = split_comparisons(comps, fraction=cfg.heldout_fraction, split_by=cfg.split_by)
    ties_in_train = sum(c.choice == "tie" for c in train_comps)
    if cfg.ties == "drop":
        train_comps = [c for c in train_comps if c.choice != "tie"]
    if not train_comps:
        raise WorkerError(
            f"no training pairs: {len(comps)} comparison(s), heldout_fraction {cfg.heldout_fraction}, ties {cfg.ties} "
            f"({ties_in_train} tie(s) in the train split); add data or lower heldout_fraction"
        )
    train, cut = encode_pairs(train_comps, tokenizer, max_length=max_length)
    heldout, _ = encode_pairs(heldout_comps, tokenizer, max_length=max_length)
    pad_id = tokenizer.pad_token_id
    # Derived sizes, computed once.
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * len(train) / cfg.batch_size))
    order = DataOrder(len(train), seed=cfg.seed)

    # 2. Policy (float32 master weights, or float32 LoRA adapters on compute_dtype base weights) and the
    #    frozen reference. Dropout is off in both: with it, log pi and log pi_ref would differ by noise and
    #    the implicit reward would not start at 0 when the policy is the reference.
    model = load_causal_lm(cfg.model_path, device=device, dtype=compute_dtype if cfg.lora_r else torch.float32)
    disable_dropout(model)
    reference = None
    if cfg.lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM"),
            autocast_adapter_dtype=True,
        )
    else:
        reference = load_causal_lm(cfg.reference_path, device=device, dtype=compute_dtype)
        disable_dropout(reference)
        reference.requires_grad_(False)
        reference.eval()
    model.train()
    optimizer, params = adamw(model, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    # 3. Resume from the newest checkpoint, or start clean.
    ckpt_root = out / "checkpoints"
    writer, start_step = resume_or_start(cfg, out, model=model, optimizer=optimizer,
                                         run_only_fields=RUN_ONLY_FIELDS)

    def evaluate() -> float | None:
        return heldout_accuracy(model, reference, heldout, batch_size=cfg.batch_size, pad_id=pad_id, device=device,
                                compute_dtype=compute_dtype)

    # 4. The loop: one optimizer step per batch of pairs.
    bar = progress(total_steps, desc="dpo", enabled=cfg.progress, initial=start_step)
    train_seconds, pairs_seen, loss_value, steps_this_run = 0.0, 0, float("nan"), 0
    accuracy: float | None = None
    for step in range(start_step, total_steps):
        if cfg.max_steps_this_run is not None and steps_this_run >= cfg.max_steps_this_run:
            save_step_checkpoint(cfg, step, model=model, optimizer=optimizer)
            bar.close()
            return collect_result(STEP, out, {}, {"steps_done": step, "steps": total_steps}, complete=False)
        t0 = time.perf_counter()
        lr = lr_at(step, base=cfg.learning_rate, warmup=cfg.warmup_steps, total=total_steps, schedule=cfg.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [train[i] for i in order.batch(step, cfg.batch_size)]
        # 4a. Summed response log-probs of A and B under the policy and the reference.
        logps = pair_logps(model, reference, batch, pad_id=pad_id, device=device, compute_dtype=compute_dtype)
        # 4b. DPO / IPO loss per pair (ties target 1/2), averaged over the batch.
        losses, stats = preference_loss(*logps, beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
        loss = losses.mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        train_seconds += time.perf_counter() - t0
        pairs_seen += len(batch)
        steps_this_run += 1
        loss_value = loss.item()
        done = step + 1
        # 4c. Held-out implicit-reward accuracy on schedule and after the last step.
        evaluated = (cfg.eval_every and done % cfg.eval_every == 0) or done == total_steps
        if evaluated:
            accuracy = evaluate()
        if done % cfg.log_every == 0 or done == total_steps or evaluated:
            record = {
                "step": done,
                "losses/dpo": loss_value,
                "rewards/a": _number(stats.reward_a),
                "rewards/b": _number(stats.reward_b),
                "rewards/accuracy": _number(stats.accuracy),
                "rewards/margin": _number(stats.margin),
                "optim/lr": lr,
                "optim/grad_norm": float(grad_norm),
                "data/epoch": order.epoch_of(done, cfg.batch_size),
                "charts/pairs_per_s": pairs_seen / train_seconds if train_seconds else None,
            }
            if evaluated:
                record["eval/heldout_accuracy"] = accuracy
            writer.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total_steps:
            save_step_checkpoint(cfg, done, model=model, optimizer=optimizer)
    bar.close()

    # 5. The policy directory (the durable output; LoRA merged into float32 base weights, since merged
    #    into bfloat16 ones small updates would round away), then the summary that marks the run finished.
    model.eval()
    lm = model.float().merge_and_unload() if cfg.lora_r else model
    policy_dir = save_model_dir(lm, tokenizer, out / POLICY_DIRNAME)
    save_config(cfg, policy_dir, step=STEP)
    metrics: dict[str, Any] = {
        "train/loss_last": loss_value,
        "train/steps": total_steps,
        "eval/heldout_accuracy": accuracy,
        "data/train_pairs": len(train),
        "data/heldout_pairs": len(heldout),
        "data/heldout_decisive_pairs": sum(p.target != 0.5 for p in heldout),
        "data/train_ties": sum(p.target == 0.5 for p in train),
        "data/ties_dropped": ties_in_train if cfg.ties == "drop" else 0,
        "data/truncated_prompts": cut,
        "perf/train_seconds": train_seconds,
        "charts/pairs_per_s": pairs_seen / train_seconds if train_seconds else None,
    }
    write_json(out / SUMMARY_FILENAME, {"step": STEP, "config": to_dict(cfg), "metrics": metrics})
    shutil.rmtree(ckpt_root, ignore_errors=True)
    return collect_result(STEP, out, {"policy": policy_dir}, metrics)


def _finished_result(cfg: DPOConfig, out: Path) -> StepResult | None:
    """The result of a finished run of the same config in ``out``; an error for a different config."""
    metrics = finished_metrics(out, cfg, step=STEP, ignore=RUN_ONLY_FIELDS)
    return None if metrics is None else collect_result(STEP, out, {"policy": out / POLICY_DIRNAME}, metrics)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workers.dpo --config FILE [key=value ...]``."""
    return cli(DPOConfig, run, argv, prog="workers.dpo", description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
