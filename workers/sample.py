"""sample: K responses to every prompt of a prompt set, from one or more policies.

    python -m workers.sample --config sample.json [key=value ...]

Batched generation with left padding and a KV cache
(``workers.common.generation``), each token drawn by inverse-CDF sampling
with a uniform number that depends only on (seed, policy, prompt id, sample
index, token position). So a response does not depend on which other rows
share its batch, on the batch size or on a resume: the same config gives the
same samples.

Output under ``output_dir``: ``samples.jsonl``, one record per response:

    prompt_id, policy, sample_index, prompt, [messages,] response,
    prompt_tokens, response_tokens, finish_reason ("eos" | "length"),
    logprob            sum of the response tokens' log-probs under the policy (temperature 1, full vocabulary)
    sampling_logprob   the same under the distribution actually sampled (temperature, top-p); 0 for greedy

``messages`` is there for a chat prompt (a prompt-set line with messages):
its prompt was encoded with the policy's chat template when it has one
(``formats.chat``), and the messages go on to the comparison tasks.
Then ``metrics.jsonl`` (a line per batch), ``summary.json`` (tokens/s and
lengths per policy) and ``ratchet_step_config.json``. Batches are appended as they finish; a killed
run resumes after the last complete batch.

A prompt longer than ``max_prompt_tokens`` (by default the policy's
positions less ``max_new_tokens``) is cut from the left, as the PM trainer
cuts one (``workers.common.pm.keep_prompt_end``): its BOS and its end, where
the dialogue's last turn and a chat template's generation prompt are, stay;
``samples/prompts_cut`` counts the prompts cut.

Under ``torchrun --nproc_per_node N`` the batches are split over the
processes, one each per round of N, and rank 0 appends each round's batches
in order: the same file as one process writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from formats.chat import prompt_token_ids
from workers.common.config import CONFIG_FILENAME, ConfigError, WorkerError, cli, diff_configs, save_config, to_dict
from workers.common.data import Prompt, load_prompts
from workers.common.generation import generate, row_seed, row_uniforms, stop_ids
from workers.common.metrics import METRICS_FILENAME, SUMMARY_FILENAME, MetricsWriter, StepResult, collect_result, write_json
from workers.common.modeling import check_model_dir, load_causal_lm, load_tokenizer, max_positions, model_config
from workers.common.pm import keep_prompt_end, special_prefix
from workers.common.distributed import World, init_world, shutdown
from workers.common.runtime import progress, resolve_dtype, set_threads, synchronize

STEP = "sample"
SAMPLES_FILENAME = "samples.jsonl"
PARTIAL_FILENAME = "samples.jsonl.partial"
RUN_ONLY_FIELDS = {"output_dir", "progress", "num_threads", "device", "max_batches_this_run"}


@dataclass(frozen=True)
class SampleConfig:
    """Config of the sample step."""

    policies: dict[str, str]
    """policy label (its version, e.g. "policy-v3") -> model directory; each prompt is sampled from each policy"""
    prompts_path: str
    """prompt set JSONL, one {"id", "prompt"} or {"id", "messages"} a line"""
    output_dir: str
    """where samples.jsonl, summary.json and the config go"""
    num_samples: int = 4
    """responses per prompt and policy (K)"""
    max_new_tokens: int = 128
    """longest response in tokens (EOS included)"""
    temperature: float = 1.0
    """softmax temperature; 0 means greedy decoding"""
    top_p: float = 1.0
    """nucleus sampling: sample from the smallest set of tokens holding this much probability"""
    max_prompt_tokens: int | None = None
    """a longer prompt keeps its BOS and its last tokens, this many in all (None: the policy's positions less
    max_new_tokens, so that every prompt fits)"""
    batch_size: int = 32
    """sequences generated together"""
    seed: int = 0
    """seed of every sampled token (with the policy, prompt id, sample index and position)"""
    max_batches_this_run: int | None = None
    """stop after this many batches in this invocation; a re-run resumes after them"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N"""
    dtype: str = "auto"
    """weights dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16"""
    attn_implementation: str | None = None
    """attention kernel passed to from_pretrained (None: the model's default)"""
    num_threads: int | None = None
    """torch CPU threads (None: torch's default)"""
    progress: bool = True
    """show a progress bar on stderr"""

    def validate(self) -> None:
        """Raise ConfigError naming the offending values."""
        if not self.policies:
            raise ConfigError("policies ({}) must name at least one policy: {\"label\": \"model dir\"}")
        for label in self.policies:
            if not label or label != label.strip():
                raise ConfigError(f"policies: label {label!r} must be a non-empty string without surrounding spaces")
        for name in ("num_samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.max_batches_this_run is not None and self.max_batches_this_run < 1:
            raise ConfigError(f"max_batches_this_run ({self.max_batches_this_run}) must be >= 1 or null")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"max_prompt_tokens ({self.max_prompt_tokens}) must be >= 1 or null")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads ({self.num_threads}) must be >= 1 or null")
        if self.temperature < 0:
            raise ConfigError(f"temperature ({self.temperature}) must be >= 0 (0 is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p ({self.top_p}) must be in (0, 1]")


# -- the step -------------------------------------------------------------------------


@dataclass
class _PolicyStats:
    """Generated tokens and generation time of this invocation, per policy."""

    tokens: int = 0
    seconds: float = 0.0


class _Row(NamedTuple):
    policy: str
    prompt: Prompt
    sample_index: int


def _plan(cfg: SampleConfig, prompts: list[Prompt]) -> list[list[_Row]]:
    """Batches of rows: policy by policy, prompt by prompt, K samples of a prompt adjacent."""
    batches = []
    for label in cfg.policies:
        rows = [_Row(label, p, k) for p in prompts for k in range(cfg.num_samples)]
        batches.extend(rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size))
    return batches


class _Encoded(NamedTuple):
    """One policy's prompts as token ids."""

    ids: dict[str, list[int]]
    """token ids by ``json.dumps(prompt id)``, cut to ``max_tokens``"""
    max_tokens: int | None
    """the longest prompt kept (None: no limit, the model's config names no positions)"""
    cut: int
    """prompts that were longer and lost their beginning"""


def _prompt_limit(cfg: SampleConfig, positions: int | None, label: str) -> int | None:
    """``max_prompt_tokens``, or when unset what the policy's positions leave after ``max_new_tokens``."""
    if cfg.max_prompt_tokens is not None:
        return cfg.max_prompt_tokens
    if positions is None:
        return None
    if positions - cfg.max_new_tokens < 1:
        raise WorkerError(
            f"max_new_tokens ({cfg.max_new_tokens}) leaves no room for a prompt in policy {label}'s {positions} positions"
        )
    return positions - cfg.max_new_tokens


def _encode_prompts(cfg: SampleConfig, tokenizer, prompts: list[Prompt], positions: int | None, label: str) -> _Encoded:
    """Each prompt's token ids (``prompt_token_ids``: a chat prompt through the policy's chat template), a longer
    one cut to its BOS and its end (``keep_prompt_end``), checked against the policy's positions."""
    prefix = special_prefix(tokenizer)
    limit = _prompt_limit(cfg, positions, label)
    encoded = prompt_token_ids(tokenizer, [p.text for p in prompts], [p.messages for p in prompts])
    out, cut = {}, 0
    for prompt, ids in zip(prompts, encoded):
        if limit is not None and len(ids) > limit:
            # A chat template writes its own BOS, or none: keep the prefix only where the prompt has it.
            ids = keep_prompt_end(ids, limit, keep_prefix=len(prefix) if ids[: len(prefix)] == prefix else 0)
            cut += 1
        if not ids:
            raise WorkerError(
                f"prompt {prompt.id!r} is empty and policy {label}'s tokenizer adds no BOS token; "
                "there is nothing to condition on"
            )
        if positions is not None and len(ids) + cfg.max_new_tokens > positions:
            raise WorkerError(
                f"prompt {prompt.id!r} has {len(ids)} tokens; with max_new_tokens {cfg.max_new_tokens} that exceeds "
                f"policy {label}'s {positions} positions; set max_prompt_tokens to at most "
                f"{positions - cfg.max_new_tokens}, or leave it null to cut prompts to that"
            )
        out[json.dumps(prompt.id)] = ids
    return _Encoded(out, limit, cut)


def _encode_all(cfg: SampleConfig, prompts: list[Prompt]) -> tuple[dict[str, Any], dict[str, _Encoded]]:
    """Every policy's tokenizer and encoded prompts, by label: all tokenized and length-checked before any
    generation."""
    tokenizers, encoded = {}, {}
    for label, path in cfg.policies.items():
        tokenizers[label] = load_tokenizer(path)
        encoded[label] = _encode_prompts(cfg, tokenizers[label], prompts, max_positions(model_config(path)), label)
    return tokenizers, encoded


def _completed_rows(partial: Path, batches: list[list[_Row]]) -> int:
    """How many leading batches ``partial`` holds completely; the file is cut back to them."""
    if not partial.exists():
        return 0
    lines = partial.read_bytes().split(b"\n")
    valid = []
    for line in lines:
        try:
            json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            break
        valid.append(line)
    done_batches, rows = 0, 0
    for batch in batches:
        if rows + len(batch) > len(valid):
            break
        rows += len(batch)
        done_batches += 1
    with open(partial, "wb") as fh:
        fh.write(b"".join(line + b"\n" for line in valid[:rows]))
    return done_batches


def _sample_batch(
    cfg: SampleConfig,
    label: str,
    batch: list[_Row],
    model: torch.nn.Module,
    tokenizer,
    encoded: _Encoded,
    st: _PolicyStats,
    device: torch.device,
) -> list[str]:
    """Generate one batch; return its JSONL lines and add to the policy's stats."""
    prompt_ids = [encoded.ids[json.dumps(row.prompt.id)] for row in batch]
    uniforms = None
    if cfg.temperature > 0:
        uniforms = torch.stack(
            [row_uniforms(row_seed(cfg.seed, label, row.prompt.id, row.sample_index), cfg.max_new_tokens) for row in batch]
        )
    t0 = time.perf_counter()
    gens = generate(
        model,
        prompt_ids,
        uniforms=uniforms,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        eos_id=stop_ids(model, tokenizer),
        pad_id=tokenizer.pad_token_id,
    )
    synchronize(device)
    st.seconds += time.perf_counter() - t0
    lines = []
    for row, ids, gen in zip(batch, prompt_ids, gens):
        body = gen.tokens[:-1] if gen.finish_reason == "eos" else gen.tokens
        record = {
            "prompt_id": row.prompt.id,
            "policy": label,
            "sample_index": row.sample_index,
            "prompt": row.prompt.text,
            **({"messages": list(row.prompt.messages)} if row.prompt.messages else {}),
            "response": tokenizer.decode(body, skip_special_tokens=True),
            "prompt_tokens": len(ids),
            "response_tokens": len(gen.tokens),
            "finish_reason": gen.finish_reason,
            "logprob": gen.logprob,
            "sampling_logprob": gen.sampling_logprob,
        }
        lines.append(json.dumps(record, ensure_ascii=False))
        st.tokens += len(gen.tokens)
    return lines


def run(cfg: SampleConfig) -> StepResult:
    """Sample ``num_samples`` responses per prompt from each policy; write samples.jsonl."""
    # 1. Setup: validate, machine, inputs, and what an earlier run already did.
    cfg.validate()
    set_threads(cfg.num_threads)
    for label, path in cfg.policies.items():
        check_model_dir(path, what=f"policy {label!r}")
    out = Path(cfg.output_dir)
    final, partial = out / SAMPLES_FILENAME, out / PARTIAL_FILENAME
    previous = out / CONFIG_FILENAME
    if previous.is_file():
        saved = json.loads(previous.read_text(encoding="utf-8")).get("config", {})
        diffs = diff_configs(saved, to_dict(cfg), ignore=RUN_ONLY_FIELDS)
        if diffs and (final.exists() or partial.exists()):
            raise WorkerError(
                f"output_dir {out} holds samples of a different config ({'; '.join(diffs)}); use a new output_dir"
            )
    if final.exists():  # finished before (if killed before its summary, the file still has it all)
        summary_path = out / SUMMARY_FILENAME
        if summary_path.is_file():
            metrics = json.loads(summary_path.read_text(encoding="utf-8"))["metrics"]
        else:
            metrics = _summarize(final, {}, _encode_all(cfg, load_prompts(cfg.prompts_path))[1])
            write_json(summary_path, {"step": STEP, "config": to_dict(cfg), "metrics": metrics})
        return collect_result(STEP, out, {"samples": final}, metrics)
    prompts = load_prompts(cfg.prompts_path)
    tokenizers, encoded = _encode_all(cfg, prompts)
    world, device = init_world("ddp", cfg.device)
    try:
        return _sample_all(cfg, world, device, prompts, tokenizers, encoded)
    finally:
        shutdown(world)


def _sample_all(cfg: SampleConfig, world: World, device: torch.device, prompts: list[Prompt], tokenizers: dict,
                encoded: dict[str, _Encoded]) -> StepResult:
    """The run of one process: batch by batch (under torchrun, in rounds of one batch per process, which rank 0
    appends in order), then the summary."""
    out = Path(cfg.output_dir)
    final, partial = out / SAMPLES_FILENAME, out / PARTIAL_FILENAME
    dtype = resolve_dtype(cfg.dtype, device)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out, step=STEP)
    batches = _plan(cfg, prompts)
    # Rank 0 cuts its partial file back to whole batches; every process resumes after them.
    done = world.gather_lists([_completed_rows(partial, batches) if world.main else None])[0]

    # 2. Generate policy by policy, appending each finished batch.
    stats = {label: _PolicyStats() for label in cfg.policies}
    total_rows = sum(len(b) for b in batches)
    bar = progress(total_rows, desc="sample", enabled=cfg.progress and world.main,
                   initial=sum(len(b) for b in batches[:done]), unit="resp")
    budget = cfg.max_batches_this_run if cfg.max_batches_this_run is not None else len(batches)
    todo = batches[done : done + budget]
    writer = MetricsWriter(out / METRICS_FILENAME, enabled=world.main)
    writer.rewind(after_step=done)  # lines of batches that were not saved
    with open(partial, "ab") if world.main else contextlib.nullcontext() as sink:
        for label in cfg.policies:
            mine = [b for b in todo if b[0].policy == label]
            if not mine:
                continue
            model = load_causal_lm(
                cfg.policies[label], device=device, dtype=dtype, attn_implementation=cfg.attn_implementation
            )
            for first in range(0, len(mine), world.size):
                own = first + world.rank
                result = []
                if own < len(mine):
                    st = _PolicyStats()
                    lines = _sample_batch(cfg, label, mine[own], model, tokenizers[label], encoded[label], st, device)
                    result = [(lines, st.tokens, st.seconds)]
                rounds = world.gather_lists(result)  # this round's batches, in order
                stats[label].seconds += max(seconds for _, _, seconds in rounds)  # the processes ran at once
                for (lines, tokens, seconds), batch in zip(rounds, mine[first:]):
                    stats[label].tokens += tokens
                    done += 1
                    if sink is not None:
                        sink.write(("\n".join(lines) + "\n").encode("utf-8"))
                        sink.flush()
                        os.fsync(sink.fileno())
                    writer.log({"step": done, "policy": label, "responses": len(batch), "perf/generated_tokens": tokens,
                                "perf/tokens_per_s": tokens / seconds if seconds else None})
                    bar.update(len(batch))
            del model  # free this policy before loading the next
    bar.close()
    if done < len(batches):
        return collect_result(STEP, out, {}, {"batches_done": done, "batches": len(batches)}, complete=False)
    if world.main:
        os.replace(partial, final)

    # 3. Summary: throughput of this invocation, lengths over the whole file.
    world.barrier()
    metrics = _summarize(final, stats, encoded)
    if world.main:
        write_json(out / SUMMARY_FILENAME, {"step": STEP, "config": to_dict(cfg), "metrics": metrics})
    world.barrier()
    return collect_result(STEP, out, {"samples": final}, metrics)


def _summarize(path: Path, stats: dict[str, _PolicyStats], encoded: dict[str, _Encoded]) -> dict[str, Any]:
    per_policy: dict[str, dict[str, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        agg = per_policy.setdefault(rec["policy"], {"responses": 0, "tokens": 0, "eos": 0, "logprob": 0.0})
        agg["responses"] += 1
        agg["tokens"] += rec["response_tokens"]
        agg["eos"] += rec["finish_reason"] == "eos"
        agg["logprob"] += rec["logprob"]
    metrics: dict[str, Any] = {}
    tokens = sum(s.tokens for s in stats.values())
    seconds = sum(s.seconds for s in stats.values())
    metrics["samples/responses"] = sum(a["responses"] for a in per_policy.values())
    # Prompts cut to fit, counted once per policy that sampled them (each policy's tokenizer and positions).
    metrics["samples/prompts_cut"] = sum(e.cut for e in encoded.values())
    metrics["perf/generated_tokens"] = tokens
    metrics["perf/generate_seconds"] = seconds
    metrics["perf/tokens_per_s"] = tokens / seconds if seconds else None
    for label, agg in per_policy.items():
        n = agg["responses"]
        metrics[f"samples/{label}/responses"] = n
        metrics[f"samples/{label}/mean_response_tokens"] = agg["tokens"] / n
        metrics[f"samples/{label}/eos_fraction"] = agg["eos"] / n
        metrics[f"samples/{label}/mean_logprob"] = agg["logprob"] / n
        if label in encoded:
            metrics[f"samples/{label}/prompts_cut"] = encoded[label].cut
            metrics[f"samples/{label}/max_prompt_tokens"] = encoded[label].max_tokens
        st = stats.get(label)
        if st is not None and st.seconds:
            metrics[f"perf/{label}/tokens_per_s"] = st.tokens / st.seconds
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workers.sample --config FILE [key=value ...]``."""
    return cli(SampleConfig, run, argv, prog="workers.sample", description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
