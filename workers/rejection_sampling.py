"""rejection_sampling: expert iteration against a PM (best of n samples, then SFT on the winners).

    python -m workers.rejection_sampling --config rejection_sampling.json [key=value ...]

Each of ``rounds`` rounds (expert iteration, Anthony et al. 2017; Llama 2's
rejection sampling fine-tuning, Touvron et al. 2023 sec. 3.2.3):

1. take ``prompts_per_round`` prompts (a seeded stream of shuffles of the
   prompt set, nothing dropped at the end of a pass) and sample ``n``
   responses to each from the CURRENT policy;
2. score them with the PM; with an ensemble the score is conservative, the
   members' mean minus ``ensemble_penalty`` times their standard deviation
   (Coste et al. 2023), less ``missing_eos_penalty`` for a response that ran
   out of tokens;
3. keep each prompt's best response (``workers.best_of_n.pick_best``), or,
   with ``min_margin``, only a best that beats its prompt's mean score by at
   least that much;
4. run ``sft_steps_per_round`` optimizer steps of supervised fine-tuning on
   the round's winners (with ``keep_winners``, on every round's winners so
   far): next-token cross-entropy on the response tokens, EOS included when
   it was sampled, plus ``kl_coef`` times KL(policy || reference) taken
   token by token from the full next-token distributions at temperature 1
   (the distribution the cross-entropy trains; the reference frozen), both
   averaged over the winners' response tokens.

The KL to the reference of each round's samples (the k1 estimate summed over
a response's tokens, at the sampling temperature, as ppo reports it) is
logged as ``policy/kl``. With ``lora_r > 0`` only LoRA adapters train and
the reference is the policy with its adapters switched off.

Outputs under ``output_dir``:

    policy/                     the trained model and tokenizer (Hugging Face, safetensors; LoRA merged)
    winners.jsonl               every round's winners: round, prompt, response, score, its prompt's mean score
    metrics.jsonl               one line per round
    summary.json                the last round's metrics and the config
    ratchet_step_config.json    this config
    checkpoints/step-*/         after each round (every ``checkpoint_every``); removed once policy/ is written

A checkpoint holds the model, the optimizer, the rounds done and the winners
so far; every random draw is seeded from (seed, round, prompt slot, sample),
so a killed and resumed run ends with the same weights, bit for bit, as an
uninterrupted one.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from workers.best_of_n import pick_best
from workers.common.checkpoint import latest_checkpoint, read_checkpoint_state, resume_or_start, save_checkpoint
from workers.common.config import ConfigError, cli, save_config, to_dict
from workers.common.distributed import refuse_distributed
from workers.common.data import Prompt, load_prompts
from workers.common.generation import row_seed
from workers.common.metrics import StepResult, atomic_write_text, collect_result
from workers.common.modeling import load_tokenizer
from workers.common.policy_step import (
    ConservativeReward, check_inputs, check_policy_config, conservative_reward, finish, finished_result, load_models,
    log_progress, policy_metrics, sample_uniforms, save_policy, setup_machine, this_run,
)
from workers.common.rollout import encode_prompts, pm_member_scores, pm_scores, sample_with_kl
from workers.common.runtime import autocast, progress, seed_everything, synchronize
from workers.common.schedule import DataOrder, adamw
from workers.common.supervised_step import Example, collate, optimizer_step, reference_logits
from workers.rl.kl import sqrt_kl

STEP = "rejection_sampling"
RUN_ONLY_FIELDS = {"output_dir", "max_rounds_this_run", "progress", "num_threads", "checkpoint_every", "resume", "device"}
"""config fields that do not change what a run computes (a resume or a re-run may change them)"""


@dataclass(frozen=True)
class RejectionSamplingConfig:
    """Config of the rejection_sampling step."""

    policy_path: str
    """the policy to start from (the deployed policy, or the initial one): a Hugging Face causal LM directory"""
    reference_path: str
    """the frozen reference policy of the KL anchor and of the reported KL (the initial policy)"""
    pm_path: str
    """the preference model that scores responses (the train PM)"""
    prompts_path: str
    """prompt set JSONL, one {"id", "prompt"} a line"""
    output_dir: str
    """where the trained policy (policy/), winners, metrics, summary, checkpoints and the config go"""
    test_pm_path: str | None = None
    """a held-out PM scored alongside (metrics only), to see over-optimisation"""
    rounds: int = 4
    """rounds of sample, select and fine-tune"""
    prompts_per_round: int = 64
    """prompts sampled per round (one winner at most each)"""
    n: int = 8
    """responses sampled per prompt (the N of best-of-N)"""
    response_length: int = 32
    """longest response in tokens (EOS included)"""
    max_prompt_tokens: int | None = None
    """keep only the last this-many prompt tokens; None: prompts must fit as they are"""
    temperature: float = 1.0
    """sampling temperature (the reported KL is taken at this temperature)"""
    min_margin: float | None = None
    """keep a prompt's best response only when its score beats the mean score of the prompt's n responses
    by at least this (None: keep every prompt's best)"""
    ensemble_penalty: float = 0.0
    """lambda of the conservative score for an ensemble PM: the members' mean score minus lambda times their
    standard deviation (Coste et al. 2023, uncertainty-weighted optimisation; 0: the mean)"""
    missing_eos_penalty: float | None = None
    """subtracted from the score of a response that ran out of tokens before EOS"""
    sft_steps_per_round: int = 8
    """optimizer steps of fine-tuning on the winners per round"""
    batch_size: int = 16
    """winners per optimizer step (the winners are reshuffled for each pass)"""
    learning_rate: float = 1e-5
    """AdamW learning rate (constant; the optimizer state carries over from round to round)"""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (matrices only)"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    keep_winners: bool = False
    """fine-tune on the winners of every round so far (False: on this round's only)"""
    kl_coef: float = 0.0
    """weight of the KL anchor, KL(policy || reference) per winner token from the full distributions (0: none)"""
    lora_r: int = 0
    """LoRA rank (0: train every weight); with LoRA the reference is the adapter switched off"""
    lora_alpha: int = 16
    """LoRA alpha"""
    pm_batch_size: int = 32
    """responses per PM forward pass"""
    generation_batch_size: int = 64
    """responses generated together"""
    checkpoint_every: int = 1
    """rounds between checkpoints (a run stopped by max_rounds_this_run always writes one)"""
    max_rounds_this_run: int | None = None
    """stop after this many rounds in this invocation; a re-run resumes after them"""
    resume: bool = True
    """resume from the newest checkpoint in output_dir (False: discard checkpoints and start over)"""
    seed: int = 0
    """seed of the prompt order, the sampled tokens and the fine-tuning order"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N"""
    dtype: str = "auto"
    """compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16. Trained weights (the policy,
    or its LoRA adapters) stay float32 and are saved so; the frozen reference, PMs and a LoRA policy's base
    weights are held in this dtype"""
    num_threads: int | None = None
    """torch CPU threads (None: torch's default)"""
    progress: bool = True
    """show a progress bar on stderr"""

    def validate(self) -> None:
        """Raise ConfigError naming the offending values."""
        for name in ("rounds", "prompts_per_round", "sft_steps_per_round", "batch_size", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.n < 2:
            raise ConfigError(f"n ({self.n}) must be >= 2: the best of one response is no selection")
        for name in ("max_rounds_this_run", "num_threads", "max_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} ({value}) must be >= 1 or null")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm ({self.max_grad_norm}) must be > 0")
        for name in ("weight_decay", "kl_coef", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 0")
        for name in ("min_margin", "missing_eos_penalty"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} ({value}) must be >= 0 or null")
        check_policy_config(self)


# -- the fine-tuning loss -------------------------------------------------------------


class AnchoredSFTStats(NamedTuple):
    """Detached statistics of one ``anchored_sft_loss`` (scalars)."""

    nll: torch.Tensor
    """mean next-token cross-entropy over the loss tokens"""
    kl: torch.Tensor
    """mean KL(policy || reference) over the loss tokens"""
    tokens: torch.Tensor
    """number of loss tokens"""


def anchored_sft_loss(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, AnchoredSFTStats]:
    """SFT loss with a KL anchor: mean over loss tokens of -log pi(y_t) + kl_coef * KL(pi || pi_ref).

    Args:
        logits: the policy's logits, shape [b, n, vocab]
        ref_logits: the frozen reference's logits, shape [b, n, vocab]
        labels: token ids [b, n], -100 where no loss is taken; position t + 1 is predicted at t

    The KL at each position is exact, from the two next-token distributions:
    sum_v pi(v) * (log pi(v) - log pi_ref(v)), so it is never negative and
    needs no sample.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    mask = (targets != -100).float()
    tokens = mask.sum().clamp(min=1)
    nll = -(logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum() / tokens
    kl = ((logp.exp() * (logp - ref_logp)).sum(-1) * mask).sum() / tokens
    loss = nll + kl_coef * kl
    return loss, AnchoredSFTStats(nll=nll.detach(), kl=kl.detach(), tokens=mask.sum().detach())


# -- the step -------------------------------------------------------------------------


def _sample(model: torch.nn.Module, reference: torch.nn.Module | None, prompts: list[list[int]],
            uniforms: torch.Tensor, cfg: RejectionSamplingConfig, *, eos_id: int,
            pad_id: int) -> tuple[list[list[int]], torch.Tensor]:
    """One response to each of ``prompts`` (row i drawn with ``uniforms[i]``), generation_batch_size rows at a
    time, and each response's KL to the reference [rows] (called under no_grad and autocast)."""
    responses: list[list[int]] = []
    kls = []
    for start in range(0, len(prompts), cfg.generation_batch_size):
        stop = start + cfg.generation_batch_size
        chunk_responses, chunk_kls = sample_with_kl(
            model, reference, prompts[start:stop], uniforms=uniforms[start:stop],
            max_new_tokens=cfg.response_length, temperature=cfg.temperature, eos_id=eos_id, pad_id=pad_id,
        )
        responses += chunk_responses
        kls.append(chunk_kls.float().cpu())
    return responses, torch.cat(kls)


def _pick_winners(scores: torch.Tensor, order: list[int], responses: list[list[int]], r: int,
                  cfg: RejectionSamplingConfig) -> list[dict[str, Any]]:
    """Round ``r``'s winners: each prompt slot's best of its n responses under ``scores`` [P * n] (row
    slot * n + s), kept when it beats the slot's mean score by min_margin (always, with min_margin None)."""
    best = pick_best(scores.view(cfg.prompts_per_round, cfg.n))
    kept = torch.ones(cfg.prompts_per_round, dtype=torch.bool)
    if cfg.min_margin is not None:
        kept = best.score - best.mean >= cfg.min_margin
    return [
        {
            "round": r + 1, "prompt_index": order[slot], "sample": int(best.index[slot]),
            "response_ids": responses[slot * cfg.n + int(best.index[slot])],
            "score": float(best.score[slot]), "mean_score": float(best.mean[slot]),
        }
        for slot in range(cfg.prompts_per_round) if kept[slot]
    ]


def _sft_round(model: torch.nn.Module, reference: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
               params: list[torch.nn.Parameter], train_set: list[Example], r: int, cfg: RejectionSamplingConfig, *,
               pad_id: int, device: torch.device, compute_dtype: torch.dtype) -> dict[str, Any]:
    """Round ``r``'s fine-tuning: ``sft_steps_per_round`` optimizer steps of ``anchored_sft_loss`` on
    ``train_set``, its batches drawn in an order seeded by the round, so they do not depend on where a run
    was resumed; the round's mean losses and gradient norm (None without winners)."""
    stats, grad_norms = [], []
    if train_set:
        sft_order = DataOrder(len(train_set), seed=row_seed(cfg.seed, f"{STEP}-sft", r, 0))
        for step in range(cfg.sft_steps_per_round):
            batch = [train_set[i] for i in sft_order.batch(step, cfg.batch_size)]
            ids, mask, labels = collate(batch, pad_id=pad_id)
            ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
            with autocast(device, compute_dtype):  # forward and loss; backward outside, as autocast asks
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                ref_logits = reference_logits(model, reference, ids, mask)
                loss, step_stats = anchored_sft_loss(logits, ref_logits, labels, cfg.kl_coef)
            loss.backward()
            grad_norms.append(optimizer_step(optimizer, params, cfg.max_grad_norm).detach())
            stats.append(step_stats)
    return {
        "losses/sft": float(torch.stack([s.nll for s in stats]).mean()) if stats else None,
        "losses/kl": float(torch.stack([s.kl for s in stats]).mean()) if stats else None,
        "optim/grad_norm": float(torch.stack(grad_norms).mean()) if grad_norms else None,
    }


def _round_metrics(scores: ConservativeReward, new: list[dict[str, Any]], train_examples: int, kl: torch.Tensor,
                   ended: torch.Tensor, responses: list[list[int]], training: dict[str, Any],
                   test_scores: torch.Tensor | None, *, episodes: int, episodes_per_s: float) -> dict[str, Any]:
    """The metrics line of a round: the rs/* keys, ``training``'s (``_sft_round``) and the common policy/*
    keys. ``rs/mean_score`` is the mean selection score (missing-EOS penalty in)."""
    mean_kl = float(kl.mean())
    record = {
        "rs/winner_score": float(torch.tensor([w["score"] for w in new]).mean()) if new else None,
        "rs/mean_score": float(scores.reward.mean()),
        "rs/winners": len(new),
        "rs/train_examples": train_examples,
        "rs/kl": mean_kl,
        "rs/eos_fraction": float(ended.float().mean()),
        "rs/response_length": sum(len(x) for x in responses) / len(responses),
        "rs/episodes": episodes,
        **training,
        **policy_metrics(scores, mean_kl, episodes, test_scores),
        "policy/sqrt_kl": sqrt_kl(mean_kl),
        "charts/episodes_per_s": episodes_per_s,
    }
    if test_scores is not None:
        record["rs/reward_test_pm"] = record["policy/reward_test_pm"]
    return record


def _write_winners(path: Path, winners: list[dict[str, Any]], prompts: list[Prompt],
                   tokenizer: PreTrainedTokenizerBase) -> None:
    """Every round's winners as JSONL: round, prompt id and text, response text, sample, score, mean score."""
    texts = tokenizer.batch_decode([w["response_ids"] for w in winners], skip_special_tokens=True)
    lines = [
        {"round": w["round"], "prompt_id": prompts[w["prompt_index"]].id, "prompt": prompts[w["prompt_index"]].text,
         "response": text, "sample": w["sample"], "score": w["score"], "mean_score": w["mean_score"]}
        for w, text in zip(winners, texts)
    ]
    atomic_write_text(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))


def run(cfg: RejectionSamplingConfig) -> StepResult:
    """Rounds of best-of-n selection under the PM and fine-tuning on the winners; resumes from the newest checkpoint."""
    refuse_distributed(STEP)  # one process only: see workers.common.distributed
    cfg.validate()
    # 0. Setup: derived sizes, a finished earlier run, device, models, data.
    episodes_per_round = cfg.prompts_per_round * cfg.n
    out = Path(cfg.output_dir)
    final_dir = out / "policy"
    if (done := finished_result(STEP, cfg, RUN_ONLY_FIELDS)) is not None:
        return done
    check_inputs(cfg)
    device, compute_dtype = setup_machine(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, step=STEP)

    tokenizer = load_tokenizer(cfg.policy_path)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = load_prompts(cfg.prompts_path)
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_tokens=cfg.max_prompt_tokens)
    prompt_order = DataOrder(len(prompts), seed=cfg.seed)

    # Float32 master weights (or float32 LoRA adapters on compute_dtype base weights), dropout off so
    # the policy's samples, its log-probs and its loss carry no noise the seed does not fix.
    seed_everything(cfg.seed)  # LoRA's adapter initialisation draws from the global generator
    model, reference, pm, test_pm = load_models(cfg, device, compute_dtype, lora_dropout=0.0)
    optimizer, params = adamw(model, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    # Resume: the model, the optimizer, the rounds done and the winners so far.
    checkpoints = out / "checkpoints"
    metrics, start_round = resume_or_start(cfg, out, model=model, optimizer=optimizer, run_only_fields=RUN_ONLY_FIELDS)
    winners: list[dict[str, Any]] = []
    if start_round:
        winners = read_checkpoint_state(latest_checkpoint(checkpoints))["winners"]

    bar = progress(cfg.rounds, desc="rejection_sampling", enabled=cfg.progress, initial=start_round, unit="round")
    last: dict[str, Any] = {}
    rounds = this_run(start_round, cfg.rounds, cfg.max_rounds_this_run)
    for r in rounds:
        started = time.perf_counter()
        model.eval()
        # 1. n samples for each of the round's prompts from the current policy, and each one's KL to the
        #    reference; the random numbers of sample s in prompt slot i come from (seed, round, i, s).
        order = prompt_order.batch(r, cfg.prompts_per_round)
        row_prompts = [prompt_ids[order[slot]] for slot in range(cfg.prompts_per_round) for _ in range(cfg.n)]
        uniforms = sample_uniforms(cfg.seed, STEP, r, cfg.prompts_per_round, cfg.n, cfg.response_length)
        with torch.no_grad(), autocast(device, compute_dtype):
            responses, kl = _sample(model, reference, row_prompts, uniforms, cfg, eos_id=eos_id, pad_id=pad_id)

            # 2. PM scores; the selection score is conservative for an ensemble and pays for a missing EOS.
            members = pm_member_scores(pm, row_prompts, responses, cfg.pm_batch_size)  # [K, P * n]
            test_scores = pm_scores(test_pm, row_prompts, responses, cfg.pm_batch_size) if test_pm else None
        ended = torch.tensor([len(x) > 0 and x[-1] == eos_id for x in responses])
        scores = conservative_reward(members, ended, ensemble_penalty=cfg.ensemble_penalty,
                                     missing_eos_penalty=cfg.missing_eos_penalty)

        # 3. Each prompt's best of n, kept when it beats the prompt's mean by min_margin.
        new = _pick_winners(scores.reward, order, responses, r, cfg)
        winners += new

        # 4. Fine-tune on the winners (this round's, or every round's with keep_winners).
        model.train()
        train_set = [
            Example(prompt_ids[w["prompt_index"]] + w["response_ids"], len(prompt_ids[w["prompt_index"]]))
            for w in (winners if cfg.keep_winners else new)
        ]
        training = _sft_round(model, reference, optimizer, params, train_set, r, cfg, pad_id=pad_id, device=device,
                              compute_dtype=compute_dtype)
        synchronize(device)  # the round's time includes its queued GPU work

        # 5. Metrics (the step's namespace and the common policy/* keys) and a checkpoint.
        elapsed = time.perf_counter() - started
        last = _round_metrics(scores, new, len(train_set), kl, ended, responses, training, test_scores,
                              episodes=(r + 1) * episodes_per_round, episodes_per_s=episodes_per_round / elapsed)
        log_progress(metrics, bar, r + 1, last)
        last_of_run = r + 1 == rounds.stop  # a run stopped by max_rounds_this_run resumes from here
        if r + 1 < cfg.rounds and ((r + 1) % cfg.checkpoint_every == 0 or last_of_run):
            save_checkpoint(
                checkpoints, r + 1, model=model, optimizer=optimizer,
                state={"config": to_dict(cfg), "round": r + 1, "winners": winners},
            )
    bar.close()
    rounds_done = start_round + len(rounds)
    if rounds_done < cfg.rounds:
        return collect_result(STEP, out, {}, {**last, "rs/rounds_done": rounds_done, "rs/rounds": cfg.rounds},
                              complete=False)

    # 6. The winners, then the policy as an ordinary Hugging Face directory in float32 (LoRA merged into
    #    float32 base weights: merged into bfloat16 ones, small updates would round away), then the
    #    summary that marks the run finished.
    _write_winners(out / "winners.jsonl", winners, prompts, tokenizer)
    model.eval()
    save_policy(model, tokenizer, final_dir, lora=bool(cfg.lora_r))
    save_config(cfg, final_dir, step=STEP)
    return finish(STEP, cfg, {**last, "rs/rounds": cfg.rounds, "rs/winners_total": len(winners)})


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workers.rejection_sampling --config FILE [key=value ...]``."""
    return cli(RejectionSamplingConfig, run, argv, prog="workers.rejection_sampling",
               description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
