"""Batched generation with left padding and a KV cache, and the seeded token draws it uses.

Written as a plain decode loop rather than ``model.generate``: the loop reads
each step's log-probabilities directly, drops finished rows from the batch and
the cache as they reach EOS, and draws each token by inverse-CDF sampling with
a uniform number the caller derives from a row's key (``row_seed`` of the
seed, policy, prompt id, sample index; ``row_uniforms`` per token position).
So a response does not depend on which other rows share its batch, on the
batch size or on a resume. The sample, ppo, evaluate and best_of_n steps
generate with it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from transformers import DynamicCache

from workers.common.modeling import causal_mask_4d, key_mask_4d


# -- token sampling (pure) ------------------------------------------------------------


def row_seed(seed: int, policy: str, prompt_id: Any, sample_index: int) -> int:
    """The 63-bit seed of one response's random numbers."""
    key = json.dumps([seed, policy, prompt_id, sample_index], separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


def row_uniforms(seed: int, n: int) -> torch.Tensor:
    """``n`` uniform numbers in [0, 1) (float64) from ``seed``: one per token position."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sample_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row by inverse CDF; return (tokens [n], log-prob under the sampled distribution [n]).

    Args:
        logits: next-token logits, shape [n, vocab]
        uniforms: one uniform in [0, 1) per row, shape [n] (float64)

    Top-p keeps the smallest set of most likely tokens whose mass reaches
    ``top_p`` (as transformers' TopPLogitsWarper). The CDF is summed in
    float64, so a token of zero probability is never drawn.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1).double()
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
    else:
        order = None
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    # first index whose CDF exceeds u * total: always a token of positive probability
    j = torch.searchsorted(cdf, uniforms[:, None].to(cdf) * total, right=True).clamp(max=probs.shape[-1] - 1)
    p = probs.gather(-1, j) / total
    tokens = j if order is None else order.gather(-1, j)
    return tokens.squeeze(-1), torch.log(p.squeeze(-1))


# -- generation -----------------------------------------------------------------------


class Generation(NamedTuple):
    """One generated response."""

    tokens: list[int]
    """response token ids (EOS included when generated)"""
    logprob: float
    """sum of token log-probs under the policy (temperature 1)"""
    sampling_logprob: float
    """sum of token log-probs under the sampled (tempered, top-p) distribution"""
    finish_reason: str
    """eos or length"""


def _accepts(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    uniforms: torch.Tensor | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_id: int | Sequence[int],
    pad_id: int,
) -> list[Generation]:
    """Generate one response per prompt with a KV cache; left padding, finished rows dropped.

    ``uniforms`` has shape [len(prompts), max_new_tokens] (None for greedy,
    ``temperature == 0``). ``eos_id`` may list several stop tokens (Llama 3
    chat models end turns with one and documents with another).
    """
    device = next(model.parameters()).device
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token to condition on")
    stop = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), dtype=torch.long, device=device)
    b = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    # Left padding: positions count real tokens only, so padding shifts nothing.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    # Ready-made 4-D masks: transformers' own mask construction costs more than a
    # small model's whole forward pass on a CPU.
    out = model(
        input_ids=ids, attention_mask=causal_mask_4d(mask, model), position_ids=positions, use_cache=True, **extra
    )
    cache = out.past_key_values
    if isinstance(cache, tuple):  # a model that still returns the legacy tuple cache
        cache = DynamicCache.from_legacy_cache(cache)
    logits = out.logits[:, -1, :]
    next_pos = mask.sum(-1)

    out_tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    logprob = torch.zeros(b, dtype=torch.float64, device=device)
    sampling_logprob = torch.zeros(b, dtype=torch.float64, device=device)
    hit_eos = torch.zeros(b, dtype=torch.bool, device=device)
    active = torch.arange(b, device=device)  # the batch rows still in the cache
    if uniforms is not None:
        uniforms = uniforms.to(device)

    for t in range(max_new_tokens):
        # 1. Choose the next token of every active row.
        logp = torch.log_softmax(logits.float(), dim=-1)
        if temperature == 0:
            token = logits.argmax(-1)
            token_sampling_lp = torch.zeros(len(active), dtype=torch.float64, device=device)
        else:
            token, token_sampling_lp = sample_tokens(logits, uniforms[active, t], temperature=temperature, top_p=top_p)
        # 2. Record it.
        out_tokens[active, t] = token
        lengths[active] += 1
        logprob[active] += logp.gather(-1, token[:, None]).squeeze(-1).double()
        sampling_logprob[active] += token_sampling_lp
        finished = torch.isin(token, stop)
        hit_eos[active[finished]] = True
        if t == max_new_tokens - 1 or bool(finished.all()):
            break
        # 3. Drop finished rows from the batch and the cache, then feed the new tokens.
        if bool(finished.any()):
            keep = (~finished).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            active, token, mask, next_pos = active[keep], token[keep], mask[keep], next_pos[keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=key_mask_4d(mask, model),
            position_ids=next_pos[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
        next_pos = next_pos + 1

    out_tokens, lengths = out_tokens.cpu(), lengths.cpu()
    return [
        Generation(
            tokens=out_tokens[i, : lengths[i]].tolist(),
            logprob=float(logprob[i]),
            sampling_logprob=float(sampling_logprob[i]),
            finish_reason="eos" if bool(hit_eos[i]) else "length",
        )
        for i in range(b)
    ]


def stop_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """The tokens that end a response: the tokenizer's EOS and the model's generation-config EOS id(s)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(int(i) for i in configured)
    return sorted(i for i in ids if i is not None)
