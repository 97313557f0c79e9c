"""What the steps that sample a policy and score it with a PM share: ppo, rloo, online_dpo, rejection_sampling.

Each of those steps trains a causal LM policy on its own samples, scored by a
preference model (the train PM, and optionally a held-out test PM), anchored to
a frozen reference policy. What they share lives here, as small functions each
step's ``run`` calls in its own order:

* ``check_policy_config``: the config checks every one of them makes (called at
  the end of each ``validate()``; each config still declares its own fields);
* ``finished_result``: the result of a finished run of the same config;
* ``check_inputs``: the model directories exist and share the policy's vocabulary;
* ``setup_machine``: CPU threads, the device and the compute dtype;
* ``load_models``: the trained policy (float32, or LoRA adapters on a frozen base
  in the compute dtype), the frozen reference (None with LoRA: the policy with its
  adapters off), the PM and the test PM, as a ``PolicyModels``;
* ``check_resume_config`` and ``resume_state``: a checkpoint written with another config
  is refused; the state of the newest one, with the model and optimizer loaded from it;
* ``prompt_order``: the seeded prompt order of ppo and rloo;
* ``this_run`` and ``checkpointed``: the rollouts (or rounds) this invocation runs,
  and how many the newest checkpoint holds;
* ``sample_uniforms``: the random numbers of a rollout's or round's samples, from
  (seed, step, rollout or round, prompt slot, sample);
* ``ScoredRollout``: the log-probs, entropy and PM scores of a rollout (ppo, rloo);
* ``conservative_reward``: the reward of an ensemble PM's scores (Coste et al. 2023),
  less a missing-EOS penalty;
* ``policy_metrics`` and ``log_progress``: the ``policy/*`` keys every policy step
  reports, and the metrics line and progress bar of a rollout or round;
* ``save_policy``, ``last_metrics`` and ``finish``: the trained policy as an
  ordinary Hugging Face directory, then summary.json, which marks the run finished.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.common.checkpoint import latest_checkpoint, load_checkpoint, read_checkpoint_state
from workers.common.config import ConfigError, WorkerError, diff_configs, to_dict
from workers.common.distributed import SINGLE, World
from workers.common.generation import row_seed, row_uniforms
from workers.common.metrics import (
    SUMMARY_FILENAME, MetricsWriter, StepResult, collect_result, finished_metrics, read_metrics, write_json,
)
from workers.common.modeling import check_model_dir, disable_dropout, load_causal_lm, save_model_dir
from workers.common.rollout import check_same_vocabulary
from workers.common.runtime import check_training_dtype, resolve_device, resolve_dtype, set_threads
from workers.common.score import LoadedPM, load_pm
from workers.common.stopping import stop_requested


class PolicyStepConfig(Protocol):
    """The fields every policy step's config has (each config dataclass declares and documents its own)."""

    @property
    def policy_path(self) -> str: ...
    @property
    def reference_path(self) -> str: ...
    @property
    def pm_path(self) -> str: ...
    @property
    def test_pm_path(self) -> str | None: ...
    @property
    def output_dir(self) -> str: ...
    @property
    def response_length(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def ensemble_penalty(self) -> float: ...
    @property
    def learning_rate(self) -> float: ...
    @property
    def lora_r(self) -> int: ...
    @property
    def lora_alpha(self) -> int: ...
    @property
    def pm_batch_size(self) -> int: ...
    @property
    def checkpoint_every(self) -> int: ...
    @property
    def device(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def num_threads(self) -> int | None: ...


class PolicyModels(NamedTuple):
    """The models of a policy step, loaded by ``load_models``."""

    policy: torch.nn.Module
    """the trained policy: every weight float32, or (with LoRA) a peft model of float32 adapters on frozen base
    weights in the compute dtype; dropout off"""
    reference: PreTrainedModel | None
    """the frozen reference policy in the compute dtype, dropout off; None with LoRA (the policy, adapters off)"""
    pm: LoadedPM
    """the train PM"""
    test_pm: LoadedPM | None
    """the held-out PM scored alongside for metrics, when test_pm_path is set"""


def check_policy_config(cfg: PolicyStepConfig) -> None:
    """The checks every policy step's ``validate()`` makes: ConfigError naming the offending values."""
    for name in ("response_length", "pm_batch_size", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} ({getattr(cfg, name)}) must be >= 1")
    if not cfg.learning_rate > 0:
        raise ConfigError(f"learning_rate ({cfg.learning_rate}) must be > 0")
    if not cfg.temperature > 0:
        raise ConfigError(f"temperature ({cfg.temperature}) must be > 0")
    for name in ("ensemble_penalty", "lora_r"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} ({getattr(cfg, name)}) must be >= 0")
    if cfg.lora_r and Path(cfg.reference_path).resolve() != Path(cfg.policy_path).resolve():
        raise ConfigError(
            f"with LoRA (lora_r={cfg.lora_r}) the reference is the policy with its adapters off, so "
            f"reference_path ({cfg.reference_path}) must be policy_path ({cfg.policy_path})"
        )
    check_training_dtype(cfg.dtype)


def finished_result(step: str, cfg: PolicyStepConfig, run_only_fields: set[str]) -> StepResult | None:
    """The result of a finished run of the same config in output_dir (its policy/ and summary.json), or None;
    a finished run of another config is refused (``finished_metrics``)."""
    out = Path(cfg.output_dir)
    final_dir = out / "policy"
    if final_dir.is_dir() and (done := finished_metrics(out, cfg, step=step, ignore=run_only_fields)) is not None:
        return collect_result(step, out, {"policy": final_dir}, done)
    return None


def check_inputs(cfg: PolicyStepConfig) -> None:
    """WorkerError unless the policy, reference and PM directories (and the test PM's) exist and share the
    policy's tokenizer and vocabulary."""
    check_model_dir(cfg.policy_path, what="policy")
    check_model_dir(cfg.reference_path, what="reference policy")
    check_model_dir(cfg.pm_path, what="preference model")
    check_same_vocabulary(cfg.policy_path, cfg.reference_path, "reference policy")
    check_same_vocabulary(cfg.policy_path, cfg.pm_path, "preference model")
    if cfg.test_pm_path:
        check_model_dir(cfg.test_pm_path, what="test preference model")
        check_same_vocabulary(cfg.policy_path, cfg.test_pm_path, "test preference model")


def setup_machine(cfg: PolicyStepConfig) -> tuple[torch.device, torch.dtype]:
    """Set torch's CPU threads; return the device and the compute dtype."""
    set_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    return device, resolve_dtype(cfg.dtype, device)


def load_models(cfg: PolicyStepConfig, device: torch.device, compute_dtype: torch.dtype, *,
                lora_dropout: float) -> PolicyModels:
    """The policy, the frozen reference and the PMs.

    Every trained weight is float32 (AdamW's updates at RL learning rates are below bfloat16's resolution),
    computed under autocast. With LoRA the frozen base weights are held in ``compute_dtype``, peft keeps the
    adapters in float32 (initialised from torch's global generator) and no reference is loaded. Dropout is
    off: with it log pi and log pi_ref would differ by noise the seed does not fix.
    """
    policy = load_causal_lm(cfg.policy_path, device=device, dtype=compute_dtype if cfg.lora_r else torch.float32)
    disable_dropout(policy)
    reference = None
    if cfg.lora_r:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(
            policy, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=lora_dropout, task_type="CAUSAL_LM"),
            autocast_adapter_dtype=True,
        )
    else:
        reference = load_causal_lm(cfg.reference_path, device=device, dtype=compute_dtype)
        disable_dropout(reference)
        reference.requires_grad_(False)
    pm = load_pm(cfg.pm_path, device=cfg.device, dtype=cfg.dtype)
    test_pm = load_pm(cfg.test_pm_path, device=cfg.device, dtype=cfg.dtype) if cfg.test_pm_path else None
    return PolicyModels(policy, reference, pm, test_pm)


def check_resume_config(checkpoint: Path, cfg: PolicyStepConfig, run_only_fields: set[str]) -> None:
    """WorkerError when ``checkpoint`` was written with another config (fields in ``run_only_fields`` aside)."""
    diffs = diff_configs(read_checkpoint_state(checkpoint).get("config", {}), to_dict(cfg), ignore=run_only_fields)
    if diffs:
        raise WorkerError(
            f"checkpoint {checkpoint} was written with a different config ({'; '.join(diffs)}); "
            "run with the same config to resume it, or use a new output_dir"
        )


def resume_state(checkpoints: Path, cfg: PolicyStepConfig, run_only_fields: set[str], *, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, world: World = SINGLE) -> dict[str, Any]:
    """The state saved with the newest checkpoint under ``checkpoints``, ``model`` and ``optimizer`` loaded from
    it (refused when it was written with another config: ``check_resume_config``); {} when there is none."""
    latest = latest_checkpoint(checkpoints)
    if latest is None:
        return {}
    check_resume_config(latest, cfg, run_only_fields)
    return load_checkpoint(latest, model=model, optimizer=optimizer, world=world)


def prompt_order(n_prompts: int, seed: int, start: int, count: int) -> list[int]:
    """Prompt indices for prompt slots [start, start + count): slot s is position s mod n of pass s // n over
    the prompt set, each pass a shuffle seeded with seed * 1_000_003 + pass."""
    out = []
    for slot in range(start, start + count):
        epoch, offset = divmod(slot, n_prompts)
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[offset]))
    return out


class RunRange:
    """The units (rollouts, rounds, steps) an invocation runs, ``start`` up to ``stop``; iterating stops
    early, before a unit, when ``stop_requested()`` (an operator cancelled the cycle), and ``stop`` then
    says where it stopped."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        for unit in range(self.start, self.stop):
            if stop_requested():
                self.stop = unit
                return
            yield unit

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def this_run(done: int, total: int, max_this_run: int | None) -> RunRange:
    """The rollouts (or rounds) this invocation runs: from ``done`` on, at most ``max_this_run`` of them
    (None: to ``total``), fewer if the step is asked to stop."""
    return RunRange(done, total if max_this_run is None else min(total, done + max_this_run))


def checkpointed(checkpoints: Path) -> int:
    """The rollouts (or rounds) done when the newest checkpoint under ``checkpoints`` was written; 0 with none."""
    latest = latest_checkpoint(checkpoints)
    return 0 if latest is None else int(latest.name.split("-")[1])


def sample_uniforms(seed: int, step: str, unit: int, prompts: int, samples: int, length: int) -> torch.Tensor:
    """The random numbers [prompts * samples, length] of ``samples`` responses to each of ``prompts`` prompt
    slots in rollout (or round) ``unit``: row slot * samples + s draws from (seed, step, [unit, slot], s), so a
    response does not depend on the batch it is sampled in, nor on where a run was resumed."""
    return torch.stack([
        row_uniforms(row_seed(seed, step, [unit, slot], s), length) for slot in range(prompts) for s in range(samples)
    ])


class ScoredRollout(NamedTuple):
    """What the policy, the reference and the PMs make of a rollout of b responses (r = response_length)."""

    logprobs: torch.Tensor
    """the policy's log-probs of the response tokens when they were sampled, shape [b, r]"""
    ref_logprobs: torch.Tensor
    """the reference's log-probs of the response tokens, shape [b, r]"""
    entropy: torch.Tensor
    """the policy's per-token entropy, averaged over the response tokens (a scalar)"""
    members: torch.Tensor
    """each PM member's score, shape [K, b] (K = 1 for a single PM)"""
    test_scores: torch.Tensor | None
    """the test PM's scores [b], when there is a test PM"""


class ConservativeReward(NamedTuple):
    """What a PM (an ensemble of K members, or one) says of b responses; every field has shape [b]."""

    mean: torch.Tensor
    """the members' mean score (a single PM's score)"""
    spread: torch.Tensor
    """the members' standard deviation (population, so 0 for a single PM)"""
    conservative: torch.Tensor
    """mean - ensemble_penalty * spread"""
    reward: torch.Tensor
    """conservative, less missing_eos_penalty where a response ran out of tokens before EOS"""


def conservative_reward(members: torch.Tensor, ended: torch.Tensor, *, ensemble_penalty: float,
                        missing_eos_penalty: float | None) -> ConservativeReward:
    """The reward of b responses from the members' scores [K, b] and whether each ended with EOS [b] (bool).

    Where the members disagree the policy has left the PM's data, so a response pays ``ensemble_penalty``
    times their standard deviation (Coste et al. 2023, uncertainty-weighted optimisation, with the spread
    in reward units rather than the variance); a response cut off before EOS pays ``missing_eos_penalty``.
    """
    mean = members.mean(0)
    spread = members.std(0, unbiased=False)
    conservative = mean - ensemble_penalty * spread
    if missing_eos_penalty is None:
        return ConservativeReward(mean, spread, conservative, conservative)
    return ConservativeReward(mean, spread, conservative,
                              torch.where(ended, conservative, conservative - missing_eos_penalty))


def policy_metrics(reward: ConservativeReward, kl: float, episodes: int,
                   test_scores: torch.Tensor | None) -> dict[str, float]:
    """The keys every policy step reports and the improve stage records: ``policy/reward`` (the members' mean
    score), ``policy/reward_spread``, ``policy/kl`` (the sampled responses' k1 KL to the reference, summed over
    a response's tokens, averaged over the responses), ``policy/episodes`` and, with a test PM,
    ``policy/reward_test_pm``."""
    out = {
        "policy/reward": float(reward.mean.mean()),
        "policy/reward_spread": float(reward.spread.mean()),
        "policy/kl": kl,
        "policy/episodes": episodes,
    }
    if test_scores is not None:
        out["policy/reward_test_pm"] = float(test_scores.mean())
    return out


def log_progress(metrics: MetricsWriter, bar: tqdm, step: int, record: Mapping[str, Any]) -> None:
    """Log the metrics line of rollout (or round) ``step`` and show its reward and KL on the progress bar."""
    metrics.log({"step": step, **record})
    bar.set_postfix({"reward": f"{record['policy/reward']:.3f}", "kl": f"{record['policy/kl']:.3f}"}, refresh=False)
    bar.update(1)


def save_policy(policy: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, final_dir: Path, *, lora: bool) -> Path:
    """The trained policy as an ordinary Hugging Face directory, in float32: LoRA merged into float32 base
    weights (merged into bfloat16 ones, small updates would round away)."""
    lm = policy.float().merge_and_unload() if lora else policy
    return save_model_dir(lm, tokenizer, final_dir)


def last_metrics(out: Path) -> dict[str, Any]:
    """The last line of ``out/metrics.jsonl`` without its step number."""
    summary = read_metrics(out / "metrics.jsonl")[-1]
    summary.pop("step", None)
    return summary


def finish(step: str, cfg: PolicyStepConfig, summary: Mapping[str, Any]) -> StepResult:
    """Write summary.json (the mark of a finished run), remove the checkpoints and return the result with
    its policy/ (saved before)."""
    out = Path(cfg.output_dir)
    write_json(out / SUMMARY_FILENAME, {"step": step, "config": to_dict(cfg), "metrics": dict(summary)})
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return collect_result(step, out, {"policy": out / "policy"}, summary)
