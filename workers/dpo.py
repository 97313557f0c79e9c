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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from formats.chat import prompt_token_ids, special_prefix
from workers.common.checkpoint import resume_or_start, save_step_checkpoint
from workers.common.config import ConfigError, WorkerError, check_at_least, cli
from workers.common.distributed import refuse_distributed
from workers.common.data import Comparison, load_comparisons, split_comparisons
from workers.common.metrics import StepResult
from workers.common.modeling import check_model_dir, load_tokenizer, resolve_max_length
from workers.common.rollout import check_same_vocabulary
from workers.common.runtime import autocast, progress, resolve_device, resolve_dtype, set_threads, synchronize
from workers.common.schedule import DataOrder, adamw
from workers.common.supervised_step import (
    RUN_ONLY_FIELDS, Example, check_supervised_config, checkpoint_due, collate, finish, finished_result, load_policy,
    load_reference, log_due, optim_record, optimizer_step, reference_logits, save_policy, set_learning_rate,
    start_output, step_done, stop_early, this_run, total_steps,
)
from workers.rl.preference import PreferenceStats, preference_loss

STEP = "dpo"


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
        check_supervised_config(self)
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
        check_at_least(self, ("eval_every", "lora_r"), 0)
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction ({self.heldout_fraction}) must be in [0, 1)")
        if self.lora_r and Path(self.reference_path).resolve() != Path(self.model_path).resolve():
            raise ConfigError(
                f"with LoRA (lora_r={self.lora_r}) the reference is the policy with its adapters off, so "
                f"ref_model_path ({self.ref_model_path}) must be null or model_path ({self.model_path})"
            )


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
            ref_logps = sequence_logps(reference_logits(policy, reference, ids, mask), labels)
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


def _reward_record(stats: PreferenceStats) -> dict[str, float | None]:
    """The rewards/* keys of a step's metrics line: the batch's mean implicit rewards, accuracy and margin."""
    return {
        "rewards/a": _number(stats.reward_a),
        "rewards/b": _number(stats.reward_b),
        "rewards/accuracy": _number(stats.accuracy),
        "rewards/margin": _number(stats.margin),
    }


class DPOData(NamedTuple):
    """The encoded pairs of a run."""

    train: list[Pair]
    """the pairs trained on (ties left out with ties drop)"""
    heldout: list[Pair]
    """the held-out pairs of the implicit-reward accuracy"""
    truncated_prompts: int
    """training pairs whose prompt was cut from the left to fit max_length"""
    ties_in_train: int
    """ties in the train split, before ties drop"""


def load_pairs(cfg: DPOConfig, tokenizer: PreTrainedTokenizerBase, max_length: int) -> DPOData:
    """The comparisons split into train and held-out pairs (by hash of split_by) and encoded; an error when
    nothing is left to train on."""
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
    return DPOData(train, heldout, cut, ties_in_train)


# -- the step -------------------------------------------------------------------------


def run(cfg: DPOConfig) -> StepResult:
    """Train ``model_path`` by DPO on ``dataset_path``; write policy/ and return its checksums and metrics."""
    # 1. Setup: validate, machine, inputs, a finished earlier run.
    refuse_distributed(STEP)  # one process only: see workers.common.distributed
    cfg.validate()
    set_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    check_model_dir(cfg.model_path, what="base model")
    if cfg.reference_path != cfg.model_path:
        check_model_dir(cfg.reference_path, what="reference policy")
        check_same_vocabulary(cfg.model_path, cfg.reference_path, "reference policy")
    max_length = resolve_max_length(cfg.max_length, cfg.model_path)
    if (finished := finished_result(STEP, cfg)) is not None:
        return finished
    return _train(cfg, device, max_length)


def _train(cfg: DPOConfig, device: torch.device, max_length: int) -> StepResult:
    """The run itself: data, models, the loop and the outputs."""
    # 2. Data; derived sizes, computed once.
    compute_dtype = resolve_dtype(cfg.dtype, device)
    start_output(STEP, cfg)
    tokenizer = load_tokenizer(cfg.model_path)
    pad_id = tokenizer.pad_token_id
    data = load_pairs(cfg, tokenizer, max_length)
    steps_total = total_steps(cfg, len(data.train))
    order = DataOrder(len(data.train), seed=cfg.seed)

    # 3. Policy (float32 master weights, or float32 LoRA adapters on compute_dtype base weights) and the
    #    frozen reference (with LoRA, the policy with its adapters off). Dropout is off in both: with it,
    #    log pi and log pi_ref would differ by noise and the implicit reward would not start at 0 when the
    #    policy is the reference.
    model = load_policy(cfg.model_path, device, compute_dtype, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
    reference = None if cfg.lora_r else load_reference(cfg.reference_path, device, compute_dtype)
    optimizer, params = adamw(model, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    # 4. Resume from the newest checkpoint, or start clean.
    writer, start_step = resume_or_start(cfg, Path(cfg.output_dir), model=model, optimizer=optimizer,
                                         run_only_fields=RUN_ONLY_FIELDS)

    def evaluate() -> float | None:
        return heldout_accuracy(model, reference, data.heldout, batch_size=cfg.batch_size, pad_id=pad_id,
                                device=device, compute_dtype=compute_dtype)

    # 5. The loop: one optimizer step per batch of pairs.
    bar = progress(steps_total, desc=STEP, enabled=cfg.progress, initial=start_step)
    train_seconds, pairs_seen, loss_value = 0.0, 0, float("nan")
    accuracy: float | None = None
    steps = this_run(start_step, steps_total, cfg.max_steps_this_run)
    for step in steps:
        t0 = time.perf_counter()
        lr = set_learning_rate(optimizer, cfg, step, steps_total)
        batch = [data.train[i] for i in order.batch(step, cfg.batch_size)]
        # 5a. Summed response log-probs of A and B under the policy and the reference.
        logps = pair_logps(model, reference, batch, pad_id=pad_id, device=device, compute_dtype=compute_dtype)
        # 5b. DPO / IPO loss per pair (ties target 1/2), averaged over the batch.
        losses, stats = preference_loss(*logps, beta=cfg.beta, loss_type=cfg.loss_type,
                                        label_smoothing=cfg.label_smoothing)
        loss = losses.mean()
        loss.backward()
        grad_norm = optimizer_step(optimizer, params, cfg.max_grad_norm)
        synchronize(device)
        train_seconds += time.perf_counter() - t0
        pairs_seen += len(batch)
        loss_value = loss.item()
        done = step + 1
        # 5c. Held-out implicit-reward accuracy on schedule and after the last step.
        evaluated = (cfg.eval_every and done % cfg.eval_every == 0) or done == steps_total
        if evaluated:
            accuracy = evaluate()
        if log_due(cfg, done, steps_total) or evaluated:
            writer.log({
                "step": done,
                "losses/dpo": loss_value,
                **_reward_record(stats),
                **optim_record(lr, grad_norm, order.epoch_of(done, cfg.batch_size)),
                "charts/pairs_per_s": pairs_seen / train_seconds if train_seconds else None,
                **({"eval/heldout_accuracy": accuracy} if evaluated else {}),
            })
        step_done(bar, loss_value)
        if checkpoint_due(cfg, done, steps_total):
            save_step_checkpoint(cfg, done, model=model, optimizer=optimizer)
    bar.close()
    if steps.stop < steps_total:
        return stop_early(STEP, cfg, steps.stop, steps_total, model=model, optimizer=optimizer)

    # 6. The policy directory (the durable output; LoRA merged into float32 base weights), then the summary
    #    that marks the run finished.
    save_policy(model, tokenizer, cfg, lora=bool(cfg.lora_r))
    metrics: dict[str, Any] = {
        "train/loss_last": loss_value,
        "train/steps": steps_total,
        "eval/heldout_accuracy": accuracy,
        "data/train_pairs": len(data.train),
        "data/heldout_pairs": len(data.heldout),
        "data/heldout_decisive_pairs": sum(p.target != 0.5 for p in data.heldout),
        "data/train_ties": sum(p.target == 0.5 for p in data.train),
        "data/ties_dropped": data.ties_in_train if cfg.ties == "drop" else 0,
        "data/truncated_prompts": data.truncated_prompts,
        "perf/train_seconds": train_seconds,
        "charts/pairs_per_s": pairs_seen / train_seconds if train_seconds else None,
    }
    return finish(STEP, cfg, metrics)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workers.dpo --config FILE [key=value ...]``."""
    return cli(DPOConfig, run, argv, prog="workers.dpo", description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
