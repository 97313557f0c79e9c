"""train_pm: train a preference model on comparisons (Bradley-Terry, Bai et al. 2022 sec. 2).

    python -m workers.train_pm --config train_pm.json [key=value ...]

A PM is the base LM's trunk plus a scalar head read at the response's last
token (``workers.common.pm``). Each comparison is one packed row,
``[prompt | A | B]``, so the shared prompt is encoded once per comparison
(see ``workers.common.pm``). The dataset splits into train / held-out by a
hash of each comparison's prompt; with ``two_pms`` the dataset first splits into two
halves and a PM is trained on each: the "train PM" (``pm``) that PPO
optimises against and the "test PM" (``test_pm``) the gate checks it with.

Steady on small data (a few hundred comparisons a week):

- ``select_by="val_loss"`` keeps the weights with the lowest validation
  log-loss, evaluated every ``eval_every`` steps (default once per pass), so
  more epochs cannot overfit past the best point; the validation comparisons
  are a hashed share of the train split (``validation_fraction``), never the
  held-out split, whose accuracy stays an unbiased report.
- ``ensemble_size`` K > 1 makes the train PM an ensemble: K members with
  their own seeds, each on a bootstrap resample of the train split and
  selected on its out-of-bag comparisons. Its score is the members' mean; the
  members' standard deviation is the spread that PPO's conservative reward
  subtracts (Coste et al. 2023, "Reward Model Ensembles Help Mitigate
  Overoptimization"). The test PM (``test_ensemble_size``) is trained on the
  other half, disjoint from every member's data.

Outputs under ``output_dir``:

    pm/ (and test_pm/)          PM directories (see workers.common.score), loadable with load_pm;
                                an ensemble is member 0's directory with the others in members/<i>/
    metrics.jsonl               one line per logged step, tagged with the PM (or member) name
    summary.json                final metrics and the config
    ratchet_step_config.json    this config
    members/<pm>/<i>/           finished ensemble members, until the ensemble directory is written
    checkpoints/<pm>/step-*/    while training (and best-*.safetensors, the best weights so far);
                                removed once the PM directory is written

A killed run resumes from its newest checkpoint (and the best weights it
knew of) and ends with the same weights as an uninterrupted one.

Under ``torchrun --nproc_per_node N -m workers.train_pm`` each process takes
an equal share of every micro-batch (``micro_batch_size``, or ``batch_size``,
a multiple of N) with DDP or FSDP2 (``parallel``; see
``workers.common.distributed``): the same steps as one process, within float
rounding. Validation and held-out scoring are not split (every process scores
the whole, small, set); rank 0 writes the outputs. The PMs of one run train
one after another there (``parallel_pms`` 1).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from workers.common.checkpoint import latest_checkpoint, load_checkpoint, read_checkpoint_state, save_checkpoint
from workers.common.config import (
    ConfigError, WorkerError, check_at_least, check_at_least_or_null, cli, diff_configs, save_config, to_dict,
)
from workers.common.data import Comparison, half_of, is_heldout, load_comparisons, split_comparisons
from workers.common.distributed import (
    World, accumulate, check_divisible, check_strategy, gathered_state, init_world, launched_world_size,
    load_full_state_dict, on_main, shutdown, unwrap, wrap,
)
from workers.common.metrics import (
    SUMMARY_FILENAME,
    finished_metrics,
    MetricsWriter,
    StepResult,
    collect_result,
    pairwise_calibration,
    write_json,
)
from workers.common.modeling import (
    resolve_max_length,
    ATTN_IMPLEMENTATIONS,
    check_model_dir,
    disable_dropout,
    load_tokenizer,
    load_trunk,
    replace_dir,
    staging_dir,
)
from workers.common.pm import (
    PreferenceModel,
    TokenLayout,
    bradley_terry_loss,
    check_pair_packing,
    pack_pairs,
    pad_sequences,
)
from workers.common.runtime import autocast, progress, resolve_dtype, seed_everything, set_threads, synchronize
from workers.common.schedule import DataOrder, adamw
from workers.common.score import PM_SPEC_FILENAME, is_pm_dir, load_head, read_pm_spec, save_pm
from workers.common.stopping import stop_requested
from workers.common.supervised_step import RUN_ONLY_FIELDS as SUPERVISED_RUN_ONLY_FIELDS
from workers.common.supervised_step import (
    check_supervised_config, checkpoint_due, log_due, optim_record, optimizer_step, set_learning_rate, step_done,
    total_steps,
)

STEP = "train_pm"
EVALUATIONS = 5
"""validation evaluations per PM when eval_every is None (each costs a forward pass over the validation set)"""

RUN_ONLY_FIELDS = SUPERVISED_RUN_ONLY_FIELDS | {"parallel_pms", "eval_batch_size"}
"""config fields that do not change what a run computes (a resume or a re-run may change them)"""


@dataclass(frozen=True)
class TrainPMConfig:
    """Config of the train_pm step."""

    model_path: str
    """the base causal LM directory (Hugging Face, safetensors) whose trunk the PM is built on"""
    dataset_path: str
    """comparisons JSONL, one {"prompt", "response_a", "response_b", "choice"} a line (a store snapshot)"""
    output_dir: str
    """where the PM directories, metrics, summary and checkpoints go"""
    warm_start_path: str | None = None
    """an earlier PM directory whose trunk and head initialise this one (None: the base model and a new head)"""
    eval_dataset_path: str | None = None
    """a fixed held-out comparisons JSONL; when set, all of dataset_path trains and heldout_fraction is unused"""
    heldout_fraction: float = 0.1
    """fraction of comparisons held out for evaluation, chosen by hash of split_by"""
    split_by: Literal["prompt", "record"] = "prompt"
    """hash key of the train/held-out and half splits: the prompt (no prompt in both) or the whole comparison"""
    two_pms: bool = False
    """train two PMs on the two halves of the dataset: pm (the train PM) and test_pm (the test PM)"""
    ensemble_size: int = 1
    """members of the train PM (pm/): PMs from different seeds, each on its own bootstrap resample of the train
    split; the PM's score is the members' mean and their standard deviation its spread (Coste et al. 2023)"""
    test_ensemble_size: int = 1
    """members of the test PM (test_pm/, with two_pms), trained the same way on the other half"""
    bootstrap: bool = True
    """members of an ensemble (size > 1) train on bootstrap resamples of the train split (False: each on the whole
    split; only their seeds differ)"""
    select_by: Literal["last", "val_loss"] = "val_loss"
    """the weights a PM keeps: the last step's, or those with the lowest validation log-loss of the evaluations
    made every eval_every steps (a small dataset overfits before its last step)"""
    validation_fraction: float = 0.1
    """share of the train split kept out of training to select by (val_loss, by hash of split_by); a bootstrap
    member selects on its out-of-bag comparisons instead"""
    eval_every: int | None = None
    """optimizer steps between validation evaluations (None: once per pass over the training comparisons, and at
    most EVALUATIONS times in a PM's run)"""
    early_stop_patience: int | None = None
    """stop a PM after this many validation evaluations without a new best (None: run every step)"""
    parallel_pms: int = 1
    """PMs and ensemble members trained at once, in threads of this process (torch runs its ops outside the GIL),
    sharing num_threads between them; each trains exactly as it would alone (needs disable_dropout: dropout
    draws from the process-wide generator)"""
    seed: int = 0
    """seed of the head init, data order and dropout (the second PM uses seed + 1)"""
    batch_size: int = 32
    """comparisons per optimizer step"""
    micro_batch_size: int | None = None
    """comparisons per forward pass (gradient accumulation); None means batch_size"""
    eval_batch_size: int = 32
    """comparisons per forward pass when evaluating"""
    learning_rate: float = 1e-5
    """peak AdamW learning rate"""
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    """decay after warmup: none, linear to 0, or cosine to 0"""
    warmup_steps: int = 0
    """steps of linear warmup from 0 to learning_rate"""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (matrices only; biases and norms never decay)"""
    adam_beta1: float = 0.9
    """AdamW beta1"""
    adam_beta2: float = 0.999
    """AdamW beta2"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    max_grad_norm: float | None = 1.0
    """clip the gradient's global L2 norm to this (None: no clipping)"""
    num_epochs: float = 1.0
    """passes over the training comparisons (fractions allowed); ignored when max_steps is set"""
    max_steps: int | None = None
    """total optimizer steps per PM (None: from num_epochs)"""
    max_steps_this_run: int | None = None
    """stop (with a checkpoint) after this many steps in this invocation; a re-run resumes"""
    max_length: int | None = None
    """longest prompt + response in tokens, EOS included (None: the model's position limit, at most 1024)"""
    truncation: Literal["left", "drop"] = "left"
    """over-long pairs: keep the end of the prompt (left) or drop the comparison (drop)"""
    append_eos: bool = True
    """append EOS to each response; the score is read at the response's last token"""
    margin: float = 0.0
    """required score gap for decisive labels in the loss (0: plain Bradley-Terry)"""
    margin_per_strength: float = 0.0
    """more required gap per unit of a comparison's strength (the rater's scale: 1 slightly, 2 better, 3 much
    better), as Llama 2 sets the margin from its rating scale (Touvron et al. 2023, sec. 3.2.2); 0: off;
    comparisons without a strength get ``margin`` only"""
    head_init_std: float | None = None
    """std of the new head's weights (None: the model's initializer_range, else 0.02)"""
    disable_dropout: bool = True
    """turn off dropout in the trunk while training"""
    pair_mode: Literal["packed", "concat"] = "packed"
    """packed: one row [prompt|A|B] per comparison (prompt encoded once); concat: two full sequences"""
    checkpoint_every: int = 200
    """steps between checkpoints (0: only when stopping early)"""
    keep_checkpoints: int = 1
    """checkpoints kept per PM (newest)"""
    resume: bool = True
    """resume from the newest checkpoint in output_dir (False: discard checkpoints and start over)"""
    calibration_bins: int = 10
    """equal-width bins of the reliability diagram and ECE"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N (under torchrun: auto, cuda or cpu; each process takes
    cuda:LOCAL_RANK)"""
    dtype: str = "auto"
    """compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16 (weights stay float32)"""
    parallel: str = "ddp"
    """under torchrun: ddp (each process holds the PM) or fsdp (FSDP2: parameters, gradients and optimizer state
    sharded over the processes); one process ignores it"""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """attention kernel of the trunk (both accept the packed comparison mask)"""
    num_threads: int | None = None
    """torch CPU threads (None: torch's default)"""
    log_every: int = 1
    """steps between metrics.jsonl lines"""
    progress: bool = True
    """show a progress bar on stderr"""

    def validate(self) -> None:
        """Raise ConfigError naming the offending values."""
        check_supervised_config(self)
        check_at_least(self, ("eval_batch_size", "calibration_bins", "ensemble_size", "test_ensemble_size",
                              "parallel_pms"), 1)
        check_at_least_or_null(self, ("micro_batch_size", "eval_every", "early_stop_patience"))
        check_at_least(self, ("margin", "margin_per_strength"), 0)
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be divisible by micro_batch_size ({self.micro_batch_size})"
            )
        for name in ("heldout_fraction", "validation_fraction", "adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be in [0, 1)")
        if not self.adam_eps > 0:
            raise ConfigError(f"adam_eps ({self.adam_eps}) must be > 0")
        if self.parallel_pms > 1 and not self.disable_dropout:
            raise ConfigError(
                f"parallel_pms ({self.parallel_pms}) needs disable_dropout: dropout draws from the process-wide "
                "random generator, so PMs trained at once would not train as they would alone"
            )
        if self.early_stop_patience is not None and self.select_by != "val_loss":
            raise ConfigError(
                f"early_stop_patience ({self.early_stop_patience}) needs select_by 'val_loss' (it is {self.select_by!r})"
            )
        if self.head_init_std is not None and not self.head_init_std > 0:
            raise ConfigError(f"head_init_std ({self.head_init_std}) must be > 0 or null")
        check_strategy(self.parallel)
        if (world_size := launched_world_size()) > 1:
            check_divisible("micro_batch_size" if self.micro_batch_size else "batch_size",
                            self.micro_batch_size or self.batch_size, world_size)
            if self.parallel_pms > 1:
                raise ConfigError(
                    f"parallel_pms ({self.parallel_pms}) trains PMs in threads of one process; under torchrun "
                    f"({world_size} processes) the PMs train one after another: set parallel_pms to 1"
                )
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"attn_implementation ({self.attn_implementation!r}) must be one of {ATTN_IMPLEMENTATIONS}")


# -- data ---------------------------------------------------------------------------


class EncodedPair(NamedTuple):
    """One comparison as token ids, fitted to max_length."""

    prompt: list[int]
    """prompt tokens (leading special tokens included)"""
    response_a: list[int]
    """response A tokens (EOS appended)"""
    response_b: list[int]
    """response B tokens (EOS appended)"""
    target: float
    """labelled P(A preferred): 1, 0 or 0.5"""
    source: str | None
    """metadata.source, for per-source accuracy"""
    strength: float | None = None
    """how much better the chosen response is, as the rater said (None: not given)"""


def margin_of(pair: EncodedPair, cfg: TrainPMConfig) -> float:
    """The score gap the loss asks of a decisive comparison: ``margin`` plus ``margin_per_strength`` times its
    strength (ties get none whatever this says: ``bradley_terry_loss`` zeroes their margin)."""
    return cfg.margin + cfg.margin_per_strength * (pair.strength or 0.0)


@dataclass
class EncodeStats:
    """What fitting to max_length did to a split."""

    truncated_prompts: int = 0
    truncated_responses: int = 0
    dropped: int = 0


def encode(comps: Sequence[Comparison], layout: TokenLayout, *, truncation: str) -> tuple[list[EncodedPair], EncodeStats]:
    """Tokenize comparisons with the PM's token layout; cut or drop over-long ones."""
    stats = EncodeStats()
    prompts = layout.prompts([c.prompt for c in comps], [c.messages for c in comps])  # chat template if any
    responses_a = layout.responses([c.response_a for c in comps])
    responses_b = layout.responses([c.response_b for c in comps])
    out = []
    for comp, p, a, b in zip(comps, prompts, responses_a, responses_b):
        too_long = len(p) + max(len(a), len(b)) > layout.max_length
        if too_long and truncation == "drop":
            stats.dropped += 1
            continue
        p, (a, b), cut_prompt, cut_response = layout.fit(p, [a, b])
        stats.truncated_prompts += cut_prompt
        stats.truncated_responses += cut_response
        out.append(EncodedPair(p, a, b, comp.target, comp.source, comp.strength))
    return out, stats


# -- the step -------------------------------------------------------------------------


def run(cfg: TrainPMConfig) -> StepResult:
    """Train the PM(s) described by ``cfg``; return checksums of the outputs and held-out metrics."""
    # 1. Setup: validate, resolve the machine, read the data.
    cfg.validate()
    set_threads(cfg.num_threads)
    out = Path(cfg.output_dir)
    source_dir = Path(cfg.warm_start_path or cfg.model_path)
    check_model_dir(cfg.model_path, what="base model")
    if cfg.warm_start_path is not None:
        check_model_dir(cfg.warm_start_path, what="warm-start preference model")
        read_pm_spec(cfg.warm_start_path)
    max_length = resolve_max_length(cfg.max_length, source_dir)

    finished = _finished_result(cfg, out)
    if finished is not None:
        return finished
    world, device = init_world(cfg.parallel, cfg.device)
    try:
        return _train_all(cfg, out, world, device, source_dir, max_length)
    finally:
        shutdown(world)


def _train_all(cfg: TrainPMConfig, out: Path, world: World, device: torch.device, source_dir: Path,
               max_length: int) -> StepResult:
    """The run of one process: every PM of the config in turn (or parallel_pms at once), then the outputs."""
    compute_dtype = resolve_dtype(cfg.dtype, device)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out, step=STEP)

    comps = load_comparisons(cfg.dataset_path)
    if not comps:
        raise WorkerError(f"comparison dataset {cfg.dataset_path} is empty: there is nothing to train on")
    fixed_eval = load_comparisons(cfg.eval_dataset_path) if cfg.eval_dataset_path else None
    jobs = _plan_jobs(cfg, comps, fixed_eval)

    tokenizer = load_tokenizer(source_dir)
    layout = TokenLayout(tokenizer, max_length=max_length, append_eos=cfg.append_eos)
    writer = MetricsWriter(out / "metrics.jsonl", enabled=world.main)

    # 2. Train each PM (one, or the train/test pair) and each of its members, skipping what is already written;
    #    parallel_pms of them at once.
    names = list(dict.fromkeys(job.name for job in jobs))
    targets = {
        job.label: (out / job.name if job.members == 1 else out / "members" / job.name / str(job.member)) for job in jobs
    }
    todo = [job for job in jobs if not _written(out / job.name, cfg) and not _written(targets[job.label], cfg)]
    workers = min(cfg.parallel_pms, max(len(todo), 1))
    if workers > 1 and cfg.num_threads is not None:
        set_threads(max(1, cfg.num_threads // workers))  # the cores are shared among the PMs training at once

    def train(index_job: tuple[int, _Job]) -> dict[str, Any] | None:
        index, job = index_job
        return _train_one(cfg, job, targets[job.label], layout=layout, device=device, compute_dtype=compute_dtype,
                          writer=writer, check_packing=index == 0, world=world)

    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="train_pm") as pool:
            trained = list(pool.map(train, enumerate(todo)))
    else:
        trained = []
        for item in enumerate(todo):
            trained.append(train(item))
            if trained[-1] is None:
                break
    stopped = [job.label for job, result in zip(todo, trained) if result is None]
    if stopped:  # stopped early by max_steps_this_run, or asked to stop (stop_requested)
        return collect_result(STEP, out, {}, {"stopped_in": stopped[0]}, complete=False)
    if not world.main:
        world.barrier()  # rank 0 writes the ensembles and the summary
        return _finished_result(cfg, out)

    outputs: dict[str, Path] = {}
    metrics: dict[str, Any] = {}
    for name in names:
        pm_jobs = [job for job in jobs if job.name == name]
        final = out / name
        if len(pm_jobs) == 1 or _written(final, cfg):
            pm_metrics = read_pm_spec(final)["metrics"]
        else:
            pm_metrics = _ensemble(cfg, pm_jobs, [targets[j.label] for j in pm_jobs], final, layout=layout, device=device,
                                   compute_dtype=compute_dtype)
        outputs[name] = final
        prefix = "" if name == "pm" else f"{name}/"
        metrics.update({f"{prefix}{k}": v for k, v in pm_metrics.items()})

    # 3. The summary marks the run finished; a re-run with the same config returns it.
    write_json(out / SUMMARY_FILENAME, {"step": STEP, "config": to_dict(cfg), "metrics": metrics})
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    world.barrier()
    return collect_result(STEP, out, outputs, metrics)


def _written(pm_dir: Path, cfg: TrainPMConfig) -> bool:
    """Whether ``pm_dir`` holds a PM this config already trained (a re-run reuses it)."""
    return is_pm_dir(pm_dir) and read_pm_spec(pm_dir).get("run_config") == _comparable(cfg)


def _comparable(cfg: TrainPMConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(cfg).items() if k not in RUN_ONLY_FIELDS}


def _finished_result(cfg: TrainPMConfig, out: Path) -> StepResult | None:
    """The result of a finished run of the same config in ``out``; an error for a different config."""
    metrics = finished_metrics(out, cfg, step=STEP, ignore=RUN_ONLY_FIELDS)
    if metrics is None:
        return None
    names = ["pm", "test_pm"] if cfg.two_pms else ["pm"]
    return collect_result(STEP, out, {n: out / n for n in names}, metrics)


@dataclass(frozen=True)
class _Job:
    """One PM to train: a whole PM, or one member of an ensemble PM."""

    name: str
    """the PM it belongs to: pm or test_pm"""
    member: int
    """its index in the ensemble (0 for a single PM)"""
    members: int
    """the ensemble's size (1: a single PM)"""
    seed: int
    """seed of its head, data order and dropout"""
    train: list[Comparison]
    """what it trains on (a bootstrap resample, with repeats, for an ensemble member)"""
    validation: list[Comparison]
    """what select_by val_loss selects on (out-of-bag or the validation split; empty with select_by last)"""
    heldout: list[Comparison]
    """the PM's held-out split (reported, never trained or selected on)"""
    unique_train: int
    """distinct comparisons in train"""

    @property
    def label(self) -> str:
        """``pm``, or ``pm/member-2`` for a member of an ensemble: checkpoints, metrics lines, progress."""
        return self.name if self.members == 1 else f"{self.name}/member-{self.member}"


def _plan_jobs(cfg: TrainPMConfig, comps: list[Comparison], fixed_eval: list[Comparison] | None) -> list[_Job]:
    """Which PMs (and ensemble members) to train on which comparisons; errors for splits that cannot train or evaluate.

    1. Split into halves (``two_pms``): the train PM's and the test PM's data never overlap.
    2. Each half into train and held-out (by hash), or the fixed held-out set.
    3. Each member: a bootstrap resample of the train split (ensembles), selecting on its out-of-bag
       comparisons; otherwise the whole train split less a validation share (``select_by`` val_loss).
    """
    halves = [comps]
    names = ["pm"]
    if cfg.two_pms:
        halves = [[c for c in comps if half_of(c, split_by=cfg.split_by) == h] for h in (0, 1)]
        names = ["pm", "test_pm"]
    jobs = []
    for index, (name, part) in enumerate(zip(names, halves)):
        if fixed_eval is not None:
            train, heldout = part, fixed_eval
        else:
            train, heldout = split_comparisons(part, fraction=cfg.heldout_fraction, split_by=cfg.split_by)
        where = f" (the {'first' if index == 0 else 'second'} half, for {name})" if cfg.two_pms else ""
        if not train:
            raise WorkerError(
                f"no training comparisons{where}: {len(part)} comparison(s), all held out "
                f"(heldout_fraction {cfg.heldout_fraction}); add data or lower heldout_fraction"
            )
        if all(c.choice == "tie" for c in train):
            raise WorkerError(
                f"the training comparisons{where} are all ties ({len(train)} of them): one class only, "
                "so there is no preference to learn; a PM needs comparisons with choice 'a' or 'b'"
            )
        if cfg.heldout_fraction > 0 and fixed_eval is None and not heldout:
            raise WorkerError(
                f"the held-out split{where} is empty: {len(part)} comparison(s) and heldout_fraction "
                f"{cfg.heldout_fraction} selected none; add data, raise heldout_fraction, set it to 0 to train "
                "without evaluation, or give eval_dataset_path"
            )
        size = cfg.ensemble_size if name == "pm" else cfg.test_ensemble_size
        for member in range(size):
            # Member 0 keeps the seed a single PM had (the test PM: seed + 1); later members step far from it.
            seed = cfg.seed + index + 1000 * member
            member_train, validation = _member_data(cfg, train, name=name, index=index, member=member, size=size)
            if not member_train:
                raise WorkerError(
                    f"no training comparisons left{where} after validation_fraction {cfg.validation_fraction} "
                    f"took all {len(train)}; add data or lower validation_fraction"
                )
            if cfg.select_by == "val_loss" and not validation:
                raise WorkerError(
                    f"select_by val_loss has no validation comparisons{where}: {len(train)} training comparison(s) "
                    f"and validation_fraction {cfg.validation_fraction} selected none; add data, raise "
                    "validation_fraction, or use select_by last"
                )
            if all(c.choice == "tie" for c in member_train):
                raise WorkerError(f"the training comparisons of {name} member {member} are all ties")
            jobs.append(_Job(
                name=name, member=member, members=size, seed=seed, train=member_train, validation=validation,
                heldout=heldout, unique_train=len({id(c) for c in member_train}),
            ))
    return jobs


def _member_data(
    cfg: TrainPMConfig, train: list[Comparison], *, name: str, index: int, member: int, size: int
) -> tuple[list[Comparison], list[Comparison]]:
    """(what a PM or member trains on, what it selects on)."""
    if size > 1 and cfg.bootstrap:
        # A resample of the train split with replacement, seeded by (seed, PM, member); the comparisons it
        # never drew (about 37%) are its out-of-bag validation set.
        draws = np.random.default_rng([cfg.seed, index, member, 7919]).integers(0, len(train), size=len(train))
        drawn = set(draws.tolist())
        out_of_bag = [c for i, c in enumerate(train) if i not in drawn]
        return [train[i] for i in draws], out_of_bag if cfg.select_by == "val_loss" else []
    if cfg.select_by != "val_loss":
        return list(train), []
    kept, validation = [], []
    for comp in train:
        selected = is_heldout(comp, fraction=cfg.validation_fraction, split_by=cfg.split_by, salt="validation")
        (validation if selected else kept).append(comp)
    return kept, validation


_LOADING = threading.Lock()
"""transformers' from_pretrained switches process-wide state while it loads (weight init patched out, modules
made on the meta device): PMs training at once (parallel_pms) build, load and save their modules one at a time"""


def _build_pm(cfg: TrainPMConfig, *, seed: int, device: torch.device) -> PreferenceModel:
    """Trunk and head from the base model (new head) or a warm-start PM; float32 master weights."""
    source = cfg.warm_start_path or cfg.model_path
    with _LOADING:
        trunk = load_trunk(source, device=device, dtype=torch.float32, attn_implementation=cfg.attn_implementation)
        hidden = trunk.config.hidden_size
        if cfg.warm_start_path is not None:
            head = load_head(cfg.warm_start_path, hidden_size=hidden, device=device, dtype=torch.float32)
        else:
            std = cfg.head_init_std or getattr(trunk.config, "initializer_range", None) or 0.02
            head = PreferenceModel.new_head(hidden, std=std, seed=seed).to(device)
        pm = PreferenceModel(trunk, head)
    if cfg.disable_dropout:
        disable_dropout(pm)
    return pm


def _optimizer(cfg: TrainPMConfig, pm: PreferenceModel) -> torch.optim.Optimizer:
    optimizer, _ = adamw(pm, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                         betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    return optimizer


def _forward(pm: PreferenceModel, items: Sequence[EncodedPair], *, pair_mode: str, pad_id: int, scorer=None):
    """(r_A, r_B, real tokens, padded tokens) of a micro-batch; ``scorer`` is the training pass of a wrapped
    PM (``wrap``: the method for the pair mode, through DDP), None the PM's own method."""
    if pair_mode == "packed":
        batch = pack_pairs([(it.prompt, it.response_a, it.response_b) for it in items], pad_id=pad_id)
        r_a, r_b = (scorer or pm.score_pairs)(batch)
        real = int((batch.segments >= 0).sum())
        return r_a, r_b, real, batch.input_ids.numel()
    seqs = [it.prompt + it.response_a for it in items] + [it.prompt + it.response_b for it in items]
    batch = pad_sequences(seqs, pad_id=pad_id)
    scores = (scorer or pm.score_sequences)(batch)
    return scores[: len(items)], scores[len(items) :], int(batch.attention_mask.sum()), batch.input_ids.numel()


def _train_one(
    cfg: TrainPMConfig,
    job: _Job,
    target: Path,
    *,
    layout: TokenLayout,
    device: torch.device,
    compute_dtype: torch.dtype,
    writer: MetricsWriter,
    check_packing: bool = True,
    world: World,
) -> dict[str, Any] | None:
    """Train, select, evaluate and save one PM (or member) at ``target``; None when stopped by max_steps_this_run.

    ``check_packing`` checks the packed layout on the model first (once per run: it depends on the
    architecture and the attention kernel, not on the weights)."""
    ckpt_root = Path(cfg.output_dir) / "checkpoints" / job.label

    # 1. Tokenize; derived sizes, computed once.
    data = _encode_job(cfg, job, layout)
    steps_total = total_steps(cfg, len(data.train))
    eval_every = cfg.eval_every or max(math.ceil(len(data.train) / cfg.batch_size), math.ceil(steps_total / EVALUATIONS))
    order = DataOrder(len(data.train), seed=job.seed)

    # 2. Model and optimizer; the packed layout is checked on this very model.
    pm = _build_pm(cfg, seed=job.seed, device=device)
    if cfg.pair_mode == "packed" and check_packing:
        _check_packing(pm, layout, compute_dtype)
    pm.train()
    method = "score_pairs" if cfg.pair_mode == "packed" else "score_sequences"
    scorer = wrap(pm, world, device, compute_dtype=compute_dtype, method=method)
    optimizer = _optimizer(cfg, pm)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    # 3. Resume from the newest checkpoint (with the best weights it knew of), or start clean.
    start_step, best = _resume(cfg, job, ckpt_root, pm=pm, optimizer=optimizer, writer=writer, world=world)

    # 4. The loop: one optimizer step per batch of comparisons; validation every eval_every steps.
    bar = progress(steps_total, desc=f"train_pm {job.label}", enabled=cfg.progress and world.main, initial=start_step)
    tally = _Tally()
    loss_value = float("nan")
    steps_this_run = 0
    last_step = start_step
    for step in range(start_step, steps_total):
        if best.stale >= (cfg.early_stop_patience or math.inf):
            break  # early stop: no new best in early_stop_patience evaluations
        if (cfg.max_steps_this_run is not None and steps_this_run >= cfg.max_steps_this_run) or stop_requested():
            _checkpoint(cfg, job, step, pm, optimizer, best, world)
            bar.close()
            return None
        t0, c0 = time.perf_counter(), time.process_time()
        lr = set_learning_rate(optimizer, cfg, step, steps_total)
        # 4a. Forward and backward passes a micro-batch at a time, then the optimizer step.
        batch = [data.train[i] for i in order.batch(step, cfg.batch_size)]
        sums = _backward_batch(cfg, batch, pm, scorer, pad_id=layout.pad_id, tally=tally, world=world, device=device,
                               compute_dtype=compute_dtype)
        grad_norm = optimizer_step(optimizer, params, cfg.max_grad_norm)
        synchronize(device)
        sums = _summed(sums, world)
        tally.seconds += time.perf_counter() - t0
        tally.cpu_seconds += time.process_time() - c0
        tally.comparisons += cfg.batch_size
        steps_this_run += 1
        loss_value = sums["loss"] / cfg.batch_size
        done = last_step = step + 1

        # 4b. Validation log-loss on schedule and after the last step (select_by val_loss).
        record = {}
        if cfg.select_by == "val_loss" and (done % eval_every == 0 or done == steps_total):
            record, best = _validate(cfg, pm, data.validation, best, done, ckpt_root, layout=layout, world=world,
                                     device=device, compute_dtype=compute_dtype)
        if log_due(cfg, done, steps_total) or record:
            writer.log({
                "pm": job.label,
                "step": done,
                "losses/bt": loss_value,
                **_train_record(sums, cfg.batch_size),
                **optim_record(lr, grad_norm, order.epoch_of(done, cfg.batch_size)),
                "perf/comparisons_per_s": tally.comparisons / tally.seconds,
                **record,
            })
        step_done(bar, loss_value)
        if checkpoint_due(cfg, done, steps_total):
            _checkpoint(cfg, job, done, pm, optimizer, best, world)
    bar.close()

    # 5. The selected weights, held-out evaluation, then the PM directory (the durable output, rank 0).
    if cfg.select_by == "val_loss" and best.step:
        _load_best(pm, _best_path(ckpt_root, best.step), device=device, world=world)
    results = heldout_metrics(
        *score_pairs(pm, data.heldout, layout=layout, batch_size=cfg.eval_batch_size, pair_mode=cfg.pair_mode,
                     device=device, compute_dtype=compute_dtype),
        data.heldout, n_bins=cfg.calibration_bins,
    )
    results.update(_train_metrics(cfg, job, data, tally, loss_value=loss_value, steps=steps_total,
                                  steps_run=last_step, best=best))
    _save_pm_dir(cfg, job, pm, target, results, ckpt_root, layout=layout, world=world)
    return results


class _Encoded(NamedTuple):
    """A PM's (or member's) comparisons, tokenized and fitted to max_length."""

    train: list[EncodedPair]
    """what it trains on"""
    validation: list[EncodedPair]
    """what select_by val_loss selects on"""
    heldout: list[EncodedPair]
    """its held-out split, reported"""
    train_stats: EncodeStats
    """what fitting did to the train split"""
    heldout_stats: EncodeStats
    """what fitting did to the held-out split"""


def _encode_job(cfg: TrainPMConfig, job: _Job, layout: TokenLayout) -> _Encoded:
    """The job's comparisons tokenized; an error when truncation left nothing to train or select on."""
    train, train_stats = encode(job.train, layout, truncation=cfg.truncation)
    validation, _ = encode(job.validation, layout, truncation=cfg.truncation)
    heldout, heldout_stats = encode(job.heldout, layout, truncation=cfg.truncation)
    if not train:
        raise WorkerError(
            f"every training comparison for {job.label} is longer than max_length ({layout.max_length}) and "
            "truncation=drop dropped it; raise max_length or use truncation=left"
        )
    if all(it.target == 0.5 for it in train):
        raise WorkerError(f"the training comparisons for {job.label} left after truncation are all ties")
    if cfg.select_by == "val_loss" and not validation:
        raise WorkerError(f"every validation comparison for {job.label} was dropped by truncation=drop")
    return _Encoded(train, validation, heldout, train_stats, heldout_stats)


def _check_packing(pm: PreferenceModel, layout: TokenLayout, compute_dtype: torch.dtype) -> None:
    """WorkerError unless the packed layout scores A and B on this model as two separate sequences would."""
    probe = [i for i in range(len(layout.tokenizer)) if i not in layout.tokenizer.all_special_ids][:10]
    try:
        check_pair_packing(pm, token_ids=probe, atol=1e-3 if compute_dtype == torch.float32 else 5e-2)
    except ValueError as exc:
        raise WorkerError(str(exc)) from None


def _resume(cfg: TrainPMConfig, job: _Job, ckpt_root: Path, *, pm: PreferenceModel, optimizer: torch.optim.Optimizer,
            writer: MetricsWriter, world: World) -> tuple[int, Best]:
    """The first step and the best evaluation so far: from the newest checkpoint under ``ckpt_root`` (the PM
    and optimizer loaded from it; refused when it was written with another config), or 0 and none, seeded
    with the job's seed (``resume=False`` discards the checkpoints first). The job's metrics lines after that
    step are dropped."""
    latest = latest_checkpoint(ckpt_root) if cfg.resume else None
    if not cfg.resume and world.main:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    world.barrier()
    if latest is None:
        writer.clear(where={"pm": job.label})
        seed_everything(job.seed)
        return 0, Best()
    saved = read_checkpoint_state(latest).get("config", {})
    diffs = diff_configs(saved, to_dict(cfg), ignore=RUN_ONLY_FIELDS)
    if diffs:
        raise WorkerError(
            f"checkpoint {latest} was written with a different config ({'; '.join(diffs)}); "
            "run with the same config to resume it, or resume=false to start over"
        )
    state = load_checkpoint(latest, model=pm, optimizer=optimizer, world=world)
    writer.rewind(after_step=state["step"], where={"pm": job.label})
    return state["step"], Best(**state.get("best", {}))


@dataclass
class _Tally:
    """What a PM's optimizer steps in this invocation took and went through, for its perf/* metrics."""

    seconds: float = 0.0
    """wall-clock seconds of the steps"""
    cpu_seconds: float = 0.0
    """this process's CPU seconds in them"""
    comparisons: int = 0
    """comparisons trained on (every process's)"""
    real_tokens: int = 0
    """tokens of those comparisons (this process's shares)"""
    padded_tokens: int = 0
    """tokens of their padded rows (this process's shares)"""


def _backward_batch(cfg: TrainPMConfig, batch: list[EncodedPair], pm: PreferenceModel, scorer, *, pad_id: int,
                    tally: _Tally, world: World, device: torch.device,
                    compute_dtype: torch.dtype) -> defaultdict[str, float]:
    """The forward and backward passes of one batch, ``micro_batch_size`` comparisons at a time, each process
    on its share of each (the gradients accumulate; they are reduced over the processes on the last); this
    process's sums of the batch's loss, correct decisive comparisons, margins, decisive count and rewards."""
    micro = cfg.micro_batch_size or cfg.batch_size
    sums: defaultdict[str, float] = defaultdict(float)
    for start in range(0, cfg.batch_size, micro):
        chunk = batch[start : start + micro][world.share(micro)]  # this process's share of the micro-batch
        targets = torch.tensor([it.target for it in chunk], device=device)
        margins = torch.tensor([margin_of(it, cfg) for it in chunk], device=device)
        with accumulate(scorer, world, sync=start + micro >= cfg.batch_size):
            with autocast(device, compute_dtype):
                r_a, r_b, real, padded = _forward(pm, chunk, pair_mode=cfg.pair_mode, pad_id=pad_id, scorer=scorer)
            losses, stats = bradley_terry_loss(r_a, r_b, targets, margin=margins)
            # Mean over the whole batch, whatever the micro-batching; the processes' gradients are averaged.
            (losses.sum() * world.size / cfg.batch_size).backward()
        sums["loss"] += losses.detach().sum().item()
        n_dec = stats.num_decisive.item()
        if n_dec:
            sums["correct"] += stats.accuracy.item() * n_dec
            sums["margin"] += stats.margin.item() * n_dec
        sums["decisive"] += n_dec
        sums["reward"] += stats.mean_reward.item() * len(chunk)
        tally.real_tokens += real
        tally.padded_tokens += padded
    return sums


def _summed(sums: defaultdict[str, float], world: World) -> defaultdict[str, float]:
    """A batch's statistics (``_backward_batch``) summed over every process's share."""
    if not world.distributed:
        return sums
    keys = sorted(sums)
    totals = world.sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
    return defaultdict(float, zip(keys, totals.tolist()))


def _train_record(sums: defaultdict[str, float], batch_size: int) -> dict[str, float | None]:
    """The train/* keys of a step's metrics line: the batch's accuracy and margin over its decisive
    comparisons, and its mean reward."""
    return {
        "train/accuracy": sums["correct"] / sums["decisive"] if sums["decisive"] else None,
        "train/margin": sums["margin"] / sums["decisive"] if sums["decisive"] else None,
        "train/reward_mean": sums["reward"] / batch_size,
    }


def _validate(cfg: TrainPMConfig, pm: PreferenceModel, validation: list[EncodedPair], best: Best, done: int,
              ckpt_root: Path, *, layout: TokenLayout, world: World, device: torch.device,
              compute_dtype: torch.dtype) -> tuple[dict[str, Any], Best]:
    """The val/* keys after step ``done`` and the best evaluation so far; a new best's weights are written
    beside the checkpoints, so a resumed run still has them."""
    val = heldout_metrics(*score_pairs(pm, validation, layout=layout, batch_size=cfg.eval_batch_size,
                                       pair_mode=cfg.pair_mode, device=device, compute_dtype=compute_dtype),
                          validation, n_bins=cfg.calibration_bins)
    record = {"val/loss": val["heldout/log_loss"], "val/accuracy": val["heldout/accuracy"]}
    if val["heldout/log_loss"] < best.loss:
        _save_best(pm, ckpt_root, done, world)
        return record, Best(step=done, loss=val["heldout/log_loss"], stale=0)
    return record, Best(step=best.step, loss=best.loss, stale=best.stale + 1)


def _load_best(pm: PreferenceModel, path: Path, *, device: torch.device, world: World) -> None:
    """The best weights (``_save_best``) back into the PM, every process (under fsdp, into its shards)."""
    if world.sharded:
        load_full_state_dict(pm, load_file(str(path)), world)
    else:
        load_model(unwrap(pm), str(path), device=str(device))


def _train_metrics(cfg: TrainPMConfig, job: _Job, data: _Encoded, tally: _Tally, *, loss_value: float, steps: int,
                   steps_run: int, best: Best) -> dict[str, Any]:
    """The train/*, data/* and perf/* keys of a trained PM's metrics (beside its held-out ones)."""
    val_loss = cfg.select_by == "val_loss"
    return {
        "train/loss_last": loss_value,
        "train/steps": steps,
        "train/steps_run": steps_run,
        "train/selected_step": best.step if val_loss else steps_run,
        "train/best_val_loss": best.loss if val_loss else None,
        "data/train_comparisons": len(data.train),
        "data/unique_train_comparisons": job.unique_train,
        "data/validation_comparisons": len(data.validation),
        "data/heldout_comparisons": len(data.heldout),
        "data/truncated_prompts": data.train_stats.truncated_prompts + data.heldout_stats.truncated_prompts,
        "data/truncated_responses": data.train_stats.truncated_responses + data.heldout_stats.truncated_responses,
        "data/dropped": data.train_stats.dropped + data.heldout_stats.dropped,
        "perf/train_seconds": tally.seconds,
        "perf/train_cpu_seconds": tally.cpu_seconds,
        "perf/comparisons_per_s": tally.comparisons / tally.seconds if tally.seconds else None,
        "perf/tokens_per_s": tally.real_tokens / tally.seconds if tally.seconds else None,
        "perf/pad_fraction": 1 - tally.real_tokens / tally.padded_tokens if tally.padded_tokens else None,
    }


def _save_pm_dir(cfg: TrainPMConfig, job: _Job, pm: PreferenceModel, target: Path, results: dict[str, Any],
                 ckpt_root: Path, *, layout: TokenLayout, world: World) -> None:
    """The PM directory at ``target`` with its spec and metrics, then its checkpoints removed: rank 0 writes,
    every process calls it (under fsdp the whole weights are gathered first)."""
    spec = {
        "append_eos": cfg.append_eos,
        "max_length": layout.max_length,
        "base_model": str(Path(cfg.model_path).resolve()),
        "warm_start": str(Path(cfg.warm_start_path).resolve()) if cfg.warm_start_path else None,
        "name": job.name,
        "metrics": results,
        "run_config": _comparable(cfg),
    }
    if job.members > 1:
        spec["member"] = job.member
    pm.eval()
    state = gathered_state(pm, world)

    def write() -> None:
        with _LOADING:
            save_pm(pm, layout.tokenizer, target, spec=spec, config=cfg, step=STEP, state_dict=state)
        shutil.rmtree(ckpt_root, ignore_errors=True)

    on_main(world, write)


@dataclass(frozen=True)
class Best:
    """The best validation evaluation so far (select_by val_loss)."""

    step: int = 0
    """the step its weights are from (0: none yet)"""
    loss: float = math.inf
    """its validation log-loss"""
    stale: int = 0
    """evaluations since, without a new best (early stopping counts these)"""


def _best_path(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"best-{step:08d}.safetensors"


def _checkpointed_best(ckpt_root: Path) -> int | None:
    """The best step the newest checkpoint recorded (its weights file must survive)."""
    latest = latest_checkpoint(ckpt_root)
    return read_checkpoint_state(latest).get("best", {}).get("step") if latest is not None else None


def _drop_best_files(ckpt_root: Path, *, keep: set[int | None]) -> None:
    for path in ckpt_root.glob("best-*.safetensors"):
        if int(path.stem.split("-")[1]) not in keep:
            path.unlink(missing_ok=True)


def _save_best(pm: PreferenceModel, ckpt_root: Path, step: int, world: World) -> None:
    """The best weights so far beside the checkpoints (rank 0 writes them; under fsdp every process gathers)."""
    path = _best_path(ckpt_root, step)
    state = gathered_state(pm, world)

    def write() -> None:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if state is None:
            save_model(unwrap(pm), str(path))
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        _drop_best_files(ckpt_root, keep={step, _checkpointed_best(ckpt_root)})

    on_main(world, write)


def _checkpoint(cfg: TrainPMConfig, job: _Job, step: int, pm: PreferenceModel, optimizer, best: Best,
                world: World) -> None:
    root = Path(cfg.output_dir) / "checkpoints" / job.label
    save_checkpoint(
        root,
        step,
        model=pm,
        optimizer=optimizer,
        state={"config": to_dict(cfg), "pm": job.label, "data_position": step * cfg.batch_size,
               "best": dataclasses.asdict(best)},
        keep=cfg.keep_checkpoints,
        world=world,
    )
    on_main(world, lambda: _drop_best_files(root, keep={best.step}))


@torch.no_grad()
def score_pairs(
    pm: PreferenceModel,
    items: Sequence[EncodedPair],
    *,
    layout: TokenLayout,
    batch_size: int,
    pair_mode: str = "packed",
    device: torch.device,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_A, r_B) of every comparison, float32 on the CPU, the PM in eval mode meanwhile."""
    if not items:
        return torch.zeros(0), torch.zeros(0)
    was_training = pm.training
    pm.eval()
    r_a_all, r_b_all = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        with autocast(device, compute_dtype):
            r_a, r_b, _, _ = _forward(pm, chunk, pair_mode=pair_mode, pad_id=layout.pad_id)
        r_a_all.append(r_a.float().cpu())
        r_b_all.append(r_b.float().cpu())
    pm.train(was_training)
    return torch.cat(r_a_all), torch.cat(r_b_all)


def heldout_metrics(r_a: torch.Tensor, r_b: torch.Tensor, items: Sequence[EncodedPair], *, n_bins: int = 10) -> dict[str, Any]:
    """Held-out accuracy, log-loss, ECE, reliability bins and per-source accuracy of scores (r_A, r_B).

    P(A preferred) = sigmoid(r_A - r_B). Accuracy counts decisive labels;
    log-loss is the Bradley-Terry loss (a tie's target is 1/2); calibration
    bins P(A preferred) against the labelled outcome (a tie counts 1/2), each
    pair in both orders (``pairwise_calibration``).
    """
    if not items:
        return {"heldout/count": 0}
    targets = torch.tensor([it.target for it in items])
    losses, stats = bradley_terry_loss(r_a, r_b, targets)
    probs = torch.sigmoid(r_a - r_b)
    ece, bins = pairwise_calibration(probs.tolist(), targets.tolist(), n_bins=n_bins)
    decisive = targets != 0.5
    correct = ((probs > 0.5) == (targets > 0.5)) & decisive
    by_source: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for it, ok, dec in zip(items, correct.tolist(), decisive.tolist()):
        if it.source is not None and dec:
            by_source[it.source][0] += ok
            by_source[it.source][1] += 1
    rewards = torch.cat([r_a, r_b])
    return {
        "heldout/count": len(items),
        "heldout/decisive": int(decisive.sum()),
        "heldout/accuracy": stats.accuracy.item() if stats.num_decisive > 0 else None,
        "heldout/log_loss": losses.mean().item(),
        "heldout/ece": ece,
        "heldout/reliability": [dataclasses.asdict(b) for b in bins],
        "heldout/accuracy_by_source": {s: {"accuracy": c / n, "count": n} for s, (c, n) in sorted(by_source.items())},
        "heldout/reward_mean": rewards.mean().item(),
        "heldout/reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
    }


def evaluate(
    pm: PreferenceModel,
    items: Sequence[EncodedPair],
    *,
    layout: TokenLayout,
    batch_size: int,
    n_bins: int = 10,
    pair_mode: str = "packed",
    device: torch.device,
    compute_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """``heldout_metrics`` of one PM on ``items``."""
    r_a, r_b = score_pairs(pm, items, layout=layout, batch_size=batch_size, pair_mode=pair_mode, device=device,
                           compute_dtype=compute_dtype)
    return heldout_metrics(r_a, r_b, items, n_bins=n_bins)


def _ensemble(
    cfg: TrainPMConfig,
    jobs: list[_Job],
    member_dirs: list[Path],
    final: Path,
    *,
    layout: TokenLayout,
    device: torch.device,
    compute_dtype: torch.dtype,
) -> dict[str, Any]:
    """Score the held-out split with every member, then write the ensemble PM directory at ``final``.

    The directory is member 0's PM directory with the others under
    ``members/<i>/`` and listed in ``ratchet_pm.json``; its metrics are the
    ensemble's (the members' mean score), with the spread of the members.
    """
    heldout, _ = encode(jobs[0].heldout, layout, truncation=cfg.truncation)
    scores_a, scores_b = [], []
    for path in member_dirs:
        member = _load_member(path, device=device)
        r_a, r_b = score_pairs(member, heldout, layout=layout, batch_size=cfg.eval_batch_size,
                               pair_mode=cfg.pair_mode, device=device, compute_dtype=compute_dtype)
        scores_a.append(r_a)
        scores_b.append(r_b)
        del member
    r_a, r_b = torch.stack(scores_a), torch.stack(scores_b)  # [K, n]
    results = heldout_metrics(r_a.mean(0), r_b.mean(0), heldout, n_bins=cfg.calibration_bins)
    member_metrics = [read_pm_spec(path)["metrics"] for path in member_dirs]
    accuracies = [m["heldout/accuracy"] for m in member_metrics if m.get("heldout/accuracy") is not None]
    results.update({
        "ensemble/size": len(member_dirs),
        "ensemble/heldout_spread": float(torch.cat([r_a, r_b], dim=1).std(0).mean()) if heldout else None,
        "ensemble/member_accuracy_min": min(accuracies) if accuracies else None,
        "ensemble/member_accuracy_max": max(accuracies) if accuracies else None,
        "ensemble/member_log_loss": [m.get("heldout/log_loss") for m in member_metrics],
        "train/steps": sum(m["train/steps_run"] for m in member_metrics),
        "data/train_comparisons": sum(m["data/unique_train_comparisons"] for m in member_metrics) / len(member_metrics),
        "data/heldout_comparisons": len(heldout),
        "perf/train_seconds": sum(m.get("perf/train_seconds") or 0.0 for m in member_metrics),
    })
    tmp = staging_dir(final)
    try:
        shutil.copytree(member_dirs[0], tmp, copy_function=os.link, dirs_exist_ok=True)
        for i, path in enumerate(member_dirs[1:], start=1):
            shutil.copytree(path, tmp / "members" / str(i), copy_function=os.link)
        spec = read_pm_spec(tmp)
        spec.update({"metrics": results, "members": [f"members/{i}" for i in range(1, len(member_dirs))],
                     "member_metrics": member_metrics})
        spec.pop("member", None)
        write_json(tmp / PM_SPEC_FILENAME, spec)  # atomic: a new file, so member 0's own spec is untouched
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(member_dirs[0].parent, ignore_errors=True)
    if not any(member_dirs[0].parent.parent.iterdir()):
        member_dirs[0].parent.parent.rmdir()  # members/ held only this PM's
    return results


def _load_member(path: Path, *, device: torch.device) -> PreferenceModel:
    trunk = load_trunk(path, device=device, dtype=torch.float32)
    head = load_head(path, hidden_size=trunk.config.hidden_size, device=device, dtype=torch.float32)
    return PreferenceModel(trunk, head).eval()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workers.train_pm --config FILE [key=value ...]``."""
    return cli(TrainPMConfig, run, argv, prog="workers.train_pm", description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
