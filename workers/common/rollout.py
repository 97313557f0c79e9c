"""Shared pieces of the steps that sample and score a policy (ppo, evaluate, best_of_n):
prompt encoding (``formats.chat``'s rule), the padded rollout layout,
per-token log-probs of the policy and of the reference, the KL of sampled
responses, PM scores of token ids, a gold scoring function, and the
same-tokenizer check.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch

from formats.chat import prompt_token_ids
from workers.common.config import WorkerError
from workers.common.data import Prompt
from workers.common.generation import generate
from workers.common.modeling import causal_mask_4d, load_tokenizer
from workers.common.pm import pad_sequences, special_prefix
from workers.common.score import LoadedPM, member_scores


def encode_prompts(tokenizer, prompts: Sequence[Prompt], *, max_prompt_tokens: int | None) -> list[list[int]]:
    """Token ids of each prompt (``prompt_token_ids``: the chat template for a prompt with messages when the
    tokenizer has one); leading special tokens kept, and the last ``max_prompt_tokens`` when set."""
    prefix = special_prefix(tokenizer)
    encoded = prompt_token_ids(tokenizer, [p.text for p in prompts], [p.messages for p in prompts])
    out = []
    for p, ids in zip(prompts, encoded):
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            head = prefix if ids[: len(prefix)] == prefix else []
            ids = head + ids[len(ids) - max(max_prompt_tokens - len(head), 1) :]
        if not ids:
            raise WorkerError(f"prompt {p.id!r} is empty and the tokenizer adds no BOS token")
        out.append(ids)
    return out


class Rollout:
    """A rollout's padded tensors (b episodes, p prompt positions, r response positions)."""

    def __init__(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, response_length: int, pad_id: int):
        b = len(prompts)
        p = max(len(x) for x in prompts)
        r = response_length
        self.query_responses = torch.full((b, p + r), pad_id, dtype=torch.long)
        """prompt (left-padded) then response (right-padded); shape [b, p + r]"""
        self.attention_mask = torch.zeros((b, p + r), dtype=torch.long)
        self.response_mask = torch.zeros((b, r), dtype=torch.float32)
        """1 for response tokens up to and including EOS; shape [b, r]"""
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            self.query_responses[i, p - len(prompt) : p] = torch.tensor(list(prompt), dtype=torch.long)
            self.query_responses[i, p : p + len(response)] = torch.tensor(list(response), dtype=torch.long)
            self.attention_mask[i, p - len(prompt) : p + len(response)] = 1
            self.response_mask[i, : len(response)] = 1
        self.position_ids = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.context_length = p

    def to(self, device: torch.device) -> Rollout:
        for name in ("query_responses", "attention_mask", "response_mask", "position_ids"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def response_logprobs(logits: torch.Tensor, tokens: torch.Tensor, context_length: int, temperature: float) -> torch.Tensor:
    """Log-probs [b, r] of the response tokens: position t is predicted by the logits at context_length - 1 + t."""
    r = tokens.shape[1] - context_length
    step_logits = logits[:, context_length - 1 : context_length - 1 + r].float() / temperature
    targets = tokens[:, context_length:]
    return torch.log_softmax(step_logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def causal_lm_logprobs(model: torch.nn.Module, rollout: Rollout, temperature: float) -> torch.Tensor:
    """Log-probs [b, r] of the rollout's response tokens under the causal LM ``model``."""
    logits = model(
        input_ids=rollout.query_responses, attention_mask=causal_mask_4d(rollout.attention_mask, model),
        position_ids=rollout.position_ids, use_cache=False,
    ).logits
    return response_logprobs(logits, rollout.query_responses, rollout.context_length, temperature)


def reference_logprobs(
    policy: torch.nn.Module, reference: torch.nn.Module | None, rollout: Rollout, temperature: float
) -> torch.Tensor:
    """Log-probs [b, r] of the rollout's response tokens under the reference policy of the KL penalty.

    ``reference`` None: the reference is ``policy`` (a peft LoRA model) with its adapters switched off,
    so no second copy of the network is held.
    """
    if reference is None:
        with policy.disable_adapter():
            return causal_lm_logprobs(policy, rollout, temperature)
    return causal_lm_logprobs(reference, rollout, temperature)


@torch.no_grad()
def sample_with_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    prompts: Sequence[Sequence[int]],
    *,
    uniforms: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_id: int,
    pad_id: int,
) -> tuple[list[list[int]], torch.Tensor]:
    """One response per prompt from ``policy`` (row i drawn with ``uniforms[i]``) and each response's
    KL(policy || reference): the k1 estimate summed over its tokens, shape [b] on the policy's device.

    The KL is taken at ``temperature``, on the policy's own samples (see ``reference_logprobs`` for
    ``reference`` None).
    """
    generations = generate(
        policy, prompts, uniforms=uniforms, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=1.0, eos_id=eos_id, pad_id=pad_id,
    )
    responses = [g.tokens for g in generations]
    device = next(policy.parameters()).device
    rollout = Rollout(prompts, responses, response_length=max_new_tokens, pad_id=pad_id).to(device)
    logprobs = causal_lm_logprobs(policy, rollout, temperature)
    ref_logprobs = reference_logprobs(policy, reference, rollout, temperature)
    return responses, ((logprobs - ref_logprobs) * rollout.response_mask).sum(1)


def entropy_of(logits: torch.Tensor, context_length: int, r: int, temperature: float) -> torch.Tensor:
    """Per-token entropy [b, r] of the policy over the response positions."""
    step = logits[:, context_length - 1 : context_length - 1 + r].float() / temperature
    logp = torch.log_softmax(step, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def check_same_vocabulary(policy_dir: str, other_dir: str, what: str) -> None:
    """Refuse a reference or PM whose tokenizer is not the policy's: token ids would mean different text."""
    a, b = load_tokenizer(policy_dir), load_tokenizer(other_dir)
    if a.get_vocab() != b.get_vocab() or a.eos_token_id != b.eos_token_id or special_prefix(a) != special_prefix(b):
        raise WorkerError(
            f"the {what} at {other_dir} has a different tokenizer from the policy at {policy_dir} "
            f"(vocabulary {len(b)} vs {len(a)} tokens, EOS {b.eos_token_id} vs {a.eos_token_id}, "
            f"leading special tokens {special_prefix(b)} vs {special_prefix(a)}); "
            "PPO scores and compares token ids, so all three must share one tokenizer"
        )


@torch.no_grad()
def pm_scores(pm: LoadedPM, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], batch_size: int) -> torch.Tensor:
    """The PM's score [b] of each (prompt tokens, response tokens): an ensemble's is its members' mean."""
    return pm_member_scores(pm, prompts, responses, batch_size).mean(0)


@torch.no_grad()
def pm_member_scores(
    pm: LoadedPM, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], batch_size: int
) -> torch.Tensor:
    """Each member's score [members, b] of each (prompt tokens, response tokens), laid out as the PM was trained."""
    layout = pm.layout
    seqs = []
    for prompt, response in zip(prompts, responses):
        response = list(response)
        if layout.append_eos and (not response or response[-1] != layout.eos_id):
            response = response + [layout.eos_id]
        if not response:
            response = [layout.eos_id]
        fitted_prompt, (fitted_response,), _, _ = layout.fit(list(prompt), [response])
        seqs.append(fitted_prompt + fitted_response)
    out = []
    for start in range(0, len(seqs), batch_size):
        out.append(member_scores(pm, pad_sequences(seqs[start : start + batch_size], pad_id=layout.pad_id)))
    return torch.cat(out, dim=1).cpu()


def load_gold(spec: str) -> Callable[[str, str], float]:
    """The gold scoring function named ``module:function``, called as function(prompt, response) -> float."""
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise WorkerError(f"gold function {spec!r} cannot be loaded: {exc}") from None
    if not callable(fn):
        raise WorkerError(f"gold {spec!r} is not callable")
    return fn
