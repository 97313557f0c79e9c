"""The preference model and its Bradley-Terry loss (pure torch; no I/O).

A preference model (PM) is a causal LM's trunk (``AutoModel``: the
transformer without its LM head) plus a scalar head; a sequence's score is
the head applied to the last hidden state of its last real token (the EOS
appended to the response), as in Bai et al. 2022, sec. 2.

Bradley-Terry: P(A preferred to B) = sigmoid(r_A - r_B). With the labelled
probability t (1 for A, 0 for B, 1/2 for a tie) the loss per comparison is

    -t * logsigmoid(d - m) - (1 - t) * logsigmoid(-d - m),   d = r_A - r_B,

where the margin m (default 0) applies to decisive labels only, so a tie is
``-0.5 * logsigmoid(d) - 0.5 * logsigmoid(-d)``, minimised at d = 0.

Both responses share their prompt, and in HH-style data the prompt is most
of the tokens. ``pack_pairs`` lays each comparison out once,
``[prompt | response A | response B]``, and ``pair_attention_mask`` lets B
attend to the prompt and itself but not to A; B's position ids restart where
the prompt ends. So the prompt is encoded once per comparison instead of
twice (the concatenated batch of TRL and most trainers). Rows are as long as
the longest comparison of the batch and shorter comparisons share a row
(first-fit decreasing), isolated from each other by the same mask, so little
compute goes to padding. Every score equals that of a separate forward pass
over prompt + response (``check_pair_packing`` verifies this on the loaded
model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from formats.chat import prompt_token_ids, special_prefix
from workers.common.modeling import causal_mask_4d

# segment ids in a packed row
PAD, PROMPT, RESPONSE_A, RESPONSE_B = -1, 0, 1, 2


# -- loss --------------------------------------------------------------------------


class PairStats(NamedTuple):
    """Detached statistics of a batch of comparisons (scalars, float tensors)."""

    accuracy: torch.Tensor
    """fraction of decisive (non-tie) comparisons where the preferred response scores higher; nan if none"""
    num_decisive: torch.Tensor
    """number of decisive comparisons"""
    margin: torch.Tensor
    """mean r_preferred - r_other over decisive comparisons; nan if none"""
    mean_reward: torch.Tensor
    """mean of all scores (r_A and r_B)"""


def bradley_terry_loss(
    r_a: torch.Tensor, r_b: torch.Tensor, target: torch.Tensor, *, margin: float | torch.Tensor = 0.0
) -> tuple[torch.Tensor, PairStats]:
    """Per-comparison Bradley-Terry losses and detached stats.

    Args:
        r_a: scores of response A, shape [b]
        r_b: scores of response B, shape [b]
        target: labelled P(A preferred), shape [b]: 1.0 (A), 0.0 (B) or 0.5 (tie)
        margin: required score gap for decisive labels, scalar or shape [b]

    Returns:
        (losses of shape [b], PairStats). Sum or average the losses as the
        caller's batching needs.
    """
    d = r_a.float() - r_b.float()
    t = target.to(d)
    m = torch.as_tensor(margin, dtype=d.dtype, device=d.device) * (2 * t - 1).abs()  # 0 for ties
    losses = -t * F.logsigmoid(d - m) - (1 - t) * F.logsigmoid(-d - m)
    with torch.no_grad():
        decisive = t != 0.5
        n = decisive.sum()
        signed = torch.where(t > 0.5, d, -d)[decisive]  # r_preferred - r_other
        nan = torch.tensor(float("nan"), device=d.device)
        stats = PairStats(
            accuracy=(signed > 0).float().mean() if n > 0 else nan,
            num_decisive=n.float(),
            margin=signed.mean() if n > 0 else nan,
            mean_reward=torch.cat([r_a.detach(), r_b.detach()]).float().mean(),
        )
    return losses, stats


# -- token layout ------------------------------------------------------------------


def fit_pair(
    prompt: Sequence[int], responses: Sequence[Sequence[int]], *, max_length: int, keep_prefix: int = 0
) -> tuple[list[int], list[list[int]], bool, bool]:
    """Cut a prompt and its responses so that prompt + each response fits ``max_length`` tokens.

    A response longer than ``max_length - keep_prefix - 1`` keeps its first
    tokens and its last one (the EOS the score is read at). The prompt then
    keeps its ``keep_prefix`` leading special tokens (BOS) and as many of its
    last tokens as fit next to the longest response: the end of a dialogue
    is what the response answers (``keep_prompt_end``). Returns (prompt, responses,
    prompt_truncated, response_truncated).
    """
    limit = max_length - keep_prefix - 1
    if limit < 1:
        raise ValueError(f"max_length ({max_length}) leaves no room for a response after {keep_prefix} prefix token(s)")
    cut_responses = []
    response_truncated = False
    for r in responses:
        r = list(r)
        if len(r) > limit:
            r = r[: limit - 1] + r[-1:]
            response_truncated = True
        cut_responses.append(r)
    budget = max_length - max(len(r) for r in cut_responses)
    prompt_truncated = len(prompt) > budget
    return keep_prompt_end(prompt, budget, keep_prefix=keep_prefix), cut_responses, prompt_truncated, response_truncated


def keep_prompt_end(prompt: Sequence[int], budget: int, *, keep_prefix: int = 0) -> list[int]:
    """``prompt`` cut from the left to at most ``budget`` tokens: its ``keep_prefix`` leading special tokens
    (BOS) and as many of its last tokens as fit; unchanged when it fits.

    The end of a dialogue is what a response answers, and where a chat
    template puts its generation prompt (``<|assistant|>``), so that is what
    stays. ``fit_pair`` (the PM trainer) and ``sample`` cut prompts with it.
    """
    if budget < 1:
        raise ValueError(f"budget ({budget}) must be >= 1")
    prompt = list(prompt)
    if len(prompt) <= budget:
        return prompt
    head = prompt[: min(keep_prefix, budget)]
    tail_len = budget - len(head)
    return head + (prompt[len(prompt) - tail_len :] if tail_len > 0 else [])


class PairBatch(NamedTuple):
    """Comparisons packed into rows: each ``[prompt | response A | response B]``, several to a row."""

    input_ids: torch.Tensor
    """token ids, shape [r, n]"""
    position_ids: torch.Tensor
    """positions, shape [r, n]; each comparison starts at 0, and its response B restarts where its prompt ends"""
    segments: torch.Tensor
    """segment of each token, shape [r, n]: PROMPT, RESPONSE_A, RESPONSE_B or PAD"""
    groups: torch.Tensor
    """which comparison of its row each token belongs to, shape [r, n]; -1 for padding"""
    row: torch.Tensor
    """the row of each comparison, shape [b] (input order)"""
    index_a: torch.Tensor
    """column of each comparison's last response-A token, shape [b]"""
    index_b: torch.Tensor
    """column of each comparison's last response-B token, shape [b]"""


def pack_pairs(
    pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]], *, pad_id: int, pack_rows: bool = True
) -> PairBatch:
    """Pack ``(prompt, response_a, response_b)`` token lists into a ``PairBatch`` (CPU tensors).

    Rows are as long as the longest comparison. With ``pack_rows``, shorter
    comparisons share a row (first-fit decreasing, deterministic), so most
    of what would be padding does work; the attention mask keeps the
    comparisons in a row from seeing each other. Each response must have at
    least one token (the EOS the score is read at).
    """
    lengths = [len(p) + len(a) + len(r) for p, a, r in pairs]
    for i, (_, a, r) in enumerate(pairs):
        if not a or not r:
            raise ValueError(f"comparison {i} has an empty response; append EOS so each response has a token")
    n = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    if pack_rows:
        for i in sorted(range(len(pairs)), key=lambda i: (-lengths[i], i)):
            for r, free in enumerate(room):
                if lengths[i] <= free:
                    rows[r].append(i)
                    room[r] -= lengths[i]
                    break
            else:
                rows.append([i])
                room.append(n - lengths[i])
    else:
        rows = [[i] for i in range(len(pairs))]
    input_ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), n), dtype=torch.long)
    segments = torch.full((len(rows), n), PAD, dtype=torch.long)
    groups = torch.full((len(rows), n), -1, dtype=torch.long)
    row = torch.empty(len(pairs), dtype=torch.long)
    index_a = torch.empty(len(pairs), dtype=torch.long)
    index_b = torch.empty(len(pairs), dtype=torch.long)
    for r, members in enumerate(rows):
        col = 0
        for g, i in enumerate(members):
            p, a, b = pairs[i]
            lp, la, lb = len(p), len(a), len(b)
            end = col + lp + la + lb
            input_ids[r, col:end] = torch.tensor([*p, *a, *b], dtype=torch.long)
            position_ids[r, col : col + lp + la] = torch.arange(lp + la)
            position_ids[r, col + lp + la : end] = torch.arange(lp, lp + lb)
            segments[r, col : col + lp] = PROMPT
            segments[r, col + lp : col + lp + la] = RESPONSE_A
            segments[r, col + lp + la : end] = RESPONSE_B
            groups[r, col:end] = g
            row[i] = r
            index_a[i] = col + lp + la - 1
            index_b[i] = end - 1
            col = end
    return PairBatch(input_ids, position_ids, segments, groups, row, index_a, index_b)


def pair_attention_mask(batch: PairBatch, *, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The 4D attention mask of packed comparisons, shape [r, 1, n, n].

    Query i sees key j iff j <= i, both belong to the same comparison, and
    not (i in B and j in A). Every position also sees itself, so no softmax
    row is empty (padding rows are never read). Boolean (True = attend) for
    SDPA; with ``additive_dtype`` an additive float mask (0 or the dtype's
    minimum) for eager attention, which adds the mask to the scores.
    """
    segments, groups = batch.segments, batch.groups
    n = segments.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=segments.device).tril()
    q_seg, k_seg = segments[:, :, None], segments[:, None, :]
    same = (groups[:, :, None] == groups[:, None, :]) & (groups[:, None, :] >= 0)
    allowed = causal & same & ~((q_seg == RESPONSE_B) & (k_seg == RESPONSE_A))
    allowed |= torch.eye(n, dtype=torch.bool, device=segments.device)
    allowed = allowed[:, None]
    if additive_dtype is None:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=additive_dtype, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(additive_dtype).min)


class SequenceBatch(NamedTuple):
    """Whole sequences (prompt + response), right-padded."""

    input_ids: torch.Tensor
    """token ids, shape [b, n]"""
    attention_mask: torch.Tensor
    """1 for real tokens, 0 for padding, shape [b, n]"""
    last_index: torch.Tensor
    """column of each sequence's last token, shape [b]"""


def pad_sequences(seqs: Sequence[Sequence[int]], *, pad_id: int) -> SequenceBatch:
    """Right-pad token lists into a ``SequenceBatch`` (CPU tensors)."""
    n = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            raise ValueError(f"sequence {i} is empty")
        input_ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        attention_mask[i, : len(s)] = 1
    last = attention_mask.sum(1) - 1
    return SequenceBatch(input_ids, attention_mask, last)


# -- the model ---------------------------------------------------------------------


class PreferenceModel(nn.Module):
    """A transformer trunk plus a scalar head read at a chosen token."""

    def __init__(self, trunk: nn.Module, head: nn.Linear):
        super().__init__()
        self.trunk = trunk
        self.head = head

    @staticmethod
    def new_head(hidden_size: int, *, std: float, seed: int, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A fresh head: N(0, std) weights from a private generator seeded with ``seed``, no bias."""
        head = nn.Linear(hidden_size, 1, bias=False, dtype=dtype)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * std)
        return head

    @property
    def device(self) -> torch.device:
        """Where the parameters are."""
        return self.head.weight.device

    def _uses_boolean_mask(self) -> bool:
        return getattr(self.trunk.config, "_attn_implementation", "eager") == "sdpa"

    def score_hidden(self, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Scores (float32, shape [b]) of ``hidden`` [r, n, h] at positions (``rows``, ``cols``), each [b]."""
        return self.head(hidden[rows, cols]).squeeze(-1).float()

    def pair_hidden(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states of response A and response B, each shape [b, h], from one forward pass."""
        batch = PairBatch(*(t.to(self.device) for t in batch))
        additive = None if self._uses_boolean_mask() else self.head.weight.dtype
        mask = pair_attention_mask(batch, additive_dtype=additive)
        out = self.trunk(
            input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, use_cache=False
        )
        hidden = out.last_hidden_state
        return hidden[batch.row, batch.index_a], hidden[batch.row, batch.index_b]

    def sequence_hidden(self, batch: SequenceBatch) -> torch.Tensor:
        """Last hidden state of each right-padded sequence, shape [b, h].

        The causal mask is passed ready-made (``causal_mask_4d``): building it
        inside transformers costs more than a small trunk's forward pass.
        """
        device = self.device
        ids = batch.input_ids.to(device)
        positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
        mask = causal_mask_4d(batch.attention_mask.to(device), self.trunk)
        out = self.trunk(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        return out.last_hidden_state[torch.arange(ids.shape[0], device=device), batch.last_index.to(device)]

    def score_pairs(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_A, r_B), each shape [b] (float32), from one forward pass over packed comparisons."""
        h_a, h_b = self.pair_hidden(batch)
        return self.head(h_a).squeeze(-1).float(), self.head(h_b).squeeze(-1).float()

    def score_sequences(self, batch: SequenceBatch) -> torch.Tensor:
        """Scores (shape [b], float32) of right-padded whole sequences at their last token."""
        return self.head(self.sequence_hidden(batch)).squeeze(-1).float()


@torch.no_grad()
def check_pair_packing(pm: PreferenceModel, *, token_ids: Sequence[int], atol: float = 1e-3) -> float:
    """Verify that packed comparisons give the hidden states of separate forward passes; return the largest gap.

    Three probe comparisons, two of them sharing a row, against each
    prompt + response run alone. Raises ``ValueError`` when the model
    ignores custom 4D attention masks or position ids (``pair_mode=concat``
    is then the way to train it).
    """
    ids = list(token_ids)
    if len(ids) < 10:
        raise ValueError(f"check_pair_packing needs 10 token ids, got {len(ids)}")
    p, a, b = ids[:5], ids[5:8], ids[8:10]
    probes = [(p, a, b), (p[:2], b, a), (p[:1], a[:1], b[:1])]
    was_training = pm.training
    pm.eval()
    try:
        batch = pack_pairs(probes, pad_id=ids[0])
        h_a, h_b = pm.pair_hidden(batch)
        ref = pm.sequence_hidden(pad_sequences([q + r for q, x, y in probes for r in (x, y)], pad_id=ids[0]))
    finally:
        pm.train(was_training)
    got = torch.stack([h_a, h_b], dim=1).flatten(0, 1)
    gap = (got.float() - ref.float()).abs().max().item()
    if not gap <= atol * max(1.0, ref.abs().max().item()):
        raise ValueError(
            f"packed comparisons differ from separate forward passes by {gap:.3g} on this model "
            f"({type(pm.trunk).__name__}); it does not honour a custom 4D attention mask and position ids. "
            "Train it with pair_mode=concat"
        )
    return gap


# -- text to tokens ----------------------------------------------------------------


class TokenLayout:
    """How a PM turns (prompt, response) texts into tokens; training and scoring share it.

    The prompt is encoded with the tokenizer's leading special tokens (BOS,
    when the tokenizer adds one), or with its chat template when the prompt
    carries messages (``formats.chat``), and the response without
    any, plus EOS when ``append_eos``; the score is read at the response's
    last token. Separate encoding is what lets two responses share the
    prompt's tokens.
    """

    def __init__(self, tokenizer, *, max_length: int, append_eos: bool):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.append_eos = append_eos
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.prefix = special_prefix(tokenizer)

    def prompts(
        self, texts: Sequence[str], messages: Sequence[Sequence[dict[str, str]] | None] | None = None
    ) -> list[list[int]]:
        """Token ids of prompts (leading special tokens included); a prompt with ``messages`` goes through
        the tokenizer's chat template when it has one (``formats.chat.prompt_token_ids``)."""
        if not texts:
            return []
        return prompt_token_ids(self.tokenizer, list(texts), messages)

    def responses(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of responses (EOS appended when configured; never empty)."""
        if not texts:
            return []
        encoded = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        out = []
        for ids in encoded:
            if self.append_eos or not ids:
                ids = ids + [self.eos_id]
            out.append(ids)
        return out

    def fit(self, prompt: list[int], responses: list[list[int]]) -> tuple[list[int], list[list[int]], bool, bool]:
        """``fit_pair`` with this layout's length and prefix."""
        return fit_pair(prompt, responses, max_length=self.max_length, keep_prefix=len(self.prefix))

