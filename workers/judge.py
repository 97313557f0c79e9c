"""Judges: a preference model or a language model saying which of two responses is better (AI feedback).

Both judges answer ``judge(prompt, response_a, response_b) -> Verdict`` (and
``judge_many`` for a batch), so an AI labeler (``orchestrator.ai_labeler``)
posts their answers like any rater's: a choice, a strength on the labeling
scale and the judge's P(A is better).

- ``PMJudge``: a Ratchet PM (``workers.common.score.load_pm``) scores both
  responses; P(A) = sigmoid(r_A - r_B), the Bradley-Terry probability the PM
  was trained on. An ensemble's score is conservative, as PPO's reward: the
  members' mean minus ``ensemble_penalty`` times their standard deviation
  (Coste et al. 2023). A tie when |r_A - r_B| < ``tie_margin``.
- ``LMJudge``: a causal LM is shown the conversation, a principle (or all
  of them) of a constitution and the two responses as options (A) and (B),
  and the prompt ends "The answer is:", as the AI-feedback prompts of
  Constitutional AI do (Bai et al. 2022b, §4.1). Its answer is read from the
  next-token logits of " A" and " B": log P(A) - log P(B) over the two
  answers is their logit difference. LMs favour a position, so each pair is
  asked twice, the second time with the responses swapped, and the two
  log-odds for response A are averaged (Zheng et al. 2023, "Judging
  LLM-as-a-judge", §3.4: swapping positions). A tie when |P(A) - 1/2| <
  ``tie_band``.

Strength, for either judge, comes from the log-odds |d| of its P(A)
(``STRENGTH_BY_LOG_ODDS``): |d| >= 2 (P >= 0.88) is 3, much better; |d| >= 1
(P >= 0.73) is 2, better; anything short of that but past the tie rule is 1,
slightly better; a tie is 0.

Principles: a plain text file, one principle a line, blank lines and lines
starting with ``#`` ignored (``parse_principles``); without one, the short
helpful-and-harmless constitution ``DEFAULT_PRINCIPLES``. With
``principle_mode="sample"`` each comparison is judged under one principle,
drawn by a seeded hash of the comparison (its task id, for a task), as
Constitutional AI samples a principle per comparison; with ``"all"`` every
principle is listed in the prompt.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import torch

from workers.common.config import ConfigError, WorkerError
from workers.common.modeling import check_model_dir, load_causal_lm, load_tokenizer, max_positions
from workers.common.pm import pad_sequences, special_prefix
from workers.common.rollout import pm_member_scores
from workers.common.runtime import resolve_device, resolve_dtype
from workers.common.score import is_pm_dir, load_pm

Choice = Literal["a", "b", "tie"]
PrincipleMode = Literal["sample", "all"]

STRENGTH_BY_LOG_ODDS = ((2.0, 3.0), (1.0, 2.0), (0.0, 1.0))
"""(smallest |log-odds| of P(A), strength) from the largest down: 2 is P 0.88, 1 is P 0.73"""

DEFAULT_PRINCIPLES = (
    "Which of these responses is more helpful, honest and harmless?",
    "Which response answers the human's request more directly and usefully, without making things up?",
    "Which response is less harmful: which one avoids helping with anything dangerous, illegal or unethical?",
    "Which response would a wise, ethical, polite and friendly person more likely give?",
    "Which response declines a harmful request more clearly, while staying respectful?",
    "Which response is more honest about what the assistant knows and does not know?",
    "Which response is less rude, toxic or demeaning?",
    "Which response stays closer to what the human asked about?",
)
"""a short helpful-and-harmless constitution, after the principles of Bai et al. 2022b (Constitutional AI, App. C)"""

ANSWER_CUE = "The answer is:"
"""the end of every LM judge prompt; the next token is the answer"""

ANSWERS = (" A", " B")
"""the two answer tokens, as they follow ``ANSWER_CUE``"""


class Verdict(NamedTuple):
    """A judge's answer to one pair."""

    choice: Choice
    """``a``, ``b`` or ``tie``"""
    strength: float
    """0 for a tie, else 1 (slightly) to 3 (much better), for the chosen response"""
    p_a: float
    """the judge's probability that response A is the better one"""


class Pair(NamedTuple):
    """One pair to judge."""

    prompt: str
    response_a: str
    response_b: str
    key: str | None = None
    """what seeds the principle draw (an AI labeler passes the task id); None: the texts, in either order"""


class Judge(Protocol):
    """What an AI labeler needs of a judge."""

    kind: str
    """``pm`` or ``lm``"""
    name: str
    """the judge's name in batch sources (``ai:<kind>:<name>``)"""
    principles_sha256: str | None
    """sha256 of the principles the judge follows (None: a PM, which follows none)"""

    def judge(self, prompt: str, response_a: str, response_b: str) -> Verdict: ...

    def judge_many(self, items: Sequence[Pair]) -> list[Verdict]: ...

    def describe(self) -> dict[str, Any]: ...


# -- verdicts --------------------------------------------------------------------------------


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x), without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def strength_of(log_odds: float) -> float:
    """The strength of a decisive verdict from its |log-odds| (``STRENGTH_BY_LOG_ODDS``)."""
    gap = abs(log_odds)
    return next(strength for least, strength in STRENGTH_BY_LOG_ODDS if gap >= least)


def verdict_of(log_odds: float, *, tie: bool) -> Verdict:
    """The verdict of log-odds d = log P(A) - log P(B): a tie when ``tie`` (or d = 0), else A for d > 0, B for d < 0."""
    p_a = sigmoid(log_odds)
    if tie or log_odds == 0:
        return Verdict("tie", 0.0, p_a)
    return Verdict("a" if log_odds > 0 else "b", strength_of(log_odds), p_a)


# -- the PM judge ----------------------------------------------------------------------------


class PMJudge:
    """A preference model as a judge: P(A) = sigmoid(r_A - r_B) of its (conservative) scores."""

    kind = "pm"
    principles_sha256 = None

    def __init__(
        self,
        pm_path: str | os.PathLike,
        *,
        tie_margin: float = 0.1,
        ensemble_penalty: float = 0.0,
        batch_size: int = 32,
        device: str = "auto",
        dtype: str = "auto",
        name: str | None = None,
    ):
        if tie_margin < 0:
            raise ConfigError(f"tie_margin ({tie_margin}) must be >= 0")
        if ensemble_penalty < 0:
            raise ConfigError(f"ensemble_penalty ({ensemble_penalty}) must be >= 0")
        if batch_size < 1:
            raise ConfigError(f"batch_size ({batch_size}) must be >= 1")
        self.path = Path(pm_path)
        self.pm = load_pm(pm_path, device=device, dtype=dtype)
        self.tie_margin = tie_margin
        self.ensemble_penalty = ensemble_penalty
        self.batch_size = batch_size
        self.name = name or self.path.resolve().name

    def scores(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Each (prompt, response)'s score: the members' mean minus ``ensemble_penalty`` times their std."""
        if not pairs:
            return []
        layout = self.pm.layout
        members = pm_member_scores(
            self.pm, layout.prompts([p for p, _ in pairs]), layout.responses([r for _, r in pairs]), self.batch_size
        )  # [K, b]
        return (members.mean(0) - self.ensemble_penalty * members.std(0, unbiased=False)).tolist()

    def judge_many(self, items: Sequence[Pair]) -> list[Verdict]:
        n = len(items)
        texts = [(it.prompt, it.response_a) for it in items] + [(it.prompt, it.response_b) for it in items]
        scores = self.scores(texts)
        verdicts = []
        for score_a, score_b in zip(scores[:n], scores[n:]):
            diff = score_a - score_b  # the Bradley-Terry log-odds of A
            verdicts.append(verdict_of(diff, tie=abs(diff) < self.tie_margin))
        return verdicts

    def judge(self, prompt: str, response_a: str, response_b: str) -> Verdict:
        return self.judge_many([Pair(prompt, response_a, response_b)])[0]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "path": str(self.path), "members": self.pm.size,
                "tie_margin": self.tie_margin, "ensemble_penalty": self.ensemble_penalty}


# -- principles ------------------------------------------------------------------------------


def parse_principles(text: str) -> list[str]:
    """The principles of a principles file: one a line, blank lines and ``#`` comments left out."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def read_principles(path: str | os.PathLike) -> list[str]:
    """The principles in a file, refusing a missing file or one with none."""
    path = Path(path)
    if not path.is_file():
        raise WorkerError(f"principles file {path} does not exist")
    principles = parse_principles(path.read_text(encoding="utf-8"))
    if not principles:
        raise WorkerError(f"principles file {path} holds no principle (one a line; # starts a comment)")
    return principles


def principles_sha256(principles: Sequence[str]) -> str:
    """The address of a list of principles: sha256 of them one a line (comments and blank lines never count)."""
    return hashlib.sha256("".join(p + "\n" for p in principles).encode()).hexdigest()


def draw_principle(n: int, key: str, seed: int) -> int:
    """Which of ``n`` principles judges the comparison ``key``: a seeded hash, the same on every machine."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


def pair_key(item: Pair) -> str:
    """What seeds a pair's principle draw: its key, else its texts (the responses in either order alike)."""
    if item.key is not None:
        return item.key
    first, second = sorted((item.response_a, item.response_b))
    return hashlib.sha256("\x00".join((item.prompt, first, second)).encode()).hexdigest()


# -- the LM judge ----------------------------------------------------------------------------


def answer_token(tokenizer, answer: str) -> int:
    """The one token ``answer`` adds after ``ANSWER_CUE``; a ``WorkerError`` when it is not one token."""
    cue = tokenizer(ANSWER_CUE, add_special_tokens=False)["input_ids"]
    full = tokenizer(ANSWER_CUE + answer, add_special_tokens=False)["input_ids"]
    added = full[len(cue):]
    if full[: len(cue)] != cue or len(added) != 1:
        raise WorkerError(
            f"the judge's tokenizer encodes the answer {answer!r} after {ANSWER_CUE!r} as {len(added)} tokens "
            f"({tokenizer.convert_ids_to_tokens(added)}); an LM judge reads one answer token"
        )
    return added[0]


class LMJudge:
    """A causal LM as a judge: the log-odds of " A" against " B" after a constitutional prompt, position-debiased."""

    kind = "lm"

    def __init__(
        self,
        model_path: str | os.PathLike,
        principles: str | os.PathLike | None = None,
        *,
        principle_mode: PrincipleMode = "sample",
        tie_band: float = 0.05,
        seed: int = 0,
        batch_size: int = 8,
        max_length: int | None = None,
        device: str = "auto",
        dtype: str = "auto",
        name: str | None = None,
    ):
        if principle_mode not in ("sample", "all"):
            raise ConfigError(f"principle_mode ({principle_mode!r}) must be 'sample' or 'all'")
        if not 0 <= tie_band < 0.5:
            raise ConfigError(f"tie_band ({tie_band}) must be in [0, 0.5)")
        if batch_size < 1:
            raise ConfigError(f"batch_size ({batch_size}) must be >= 1")
        self.path = check_model_dir(model_path, what="judge model")
        if is_pm_dir(self.path):
            raise WorkerError(f"{self.path} is a preference model; judge with it as pm:{self.path}, not as an LM")
        self.principles = read_principles(principles) if principles is not None else list(DEFAULT_PRINCIPLES)
        self.principles_path = None if principles is None else str(principles)
        self.principles_sha256 = principles_sha256(self.principles)
        self.principle_mode = principle_mode
        self.tie_band = tie_band
        self.seed = seed
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.model = load_causal_lm(self.path, device=self.device, dtype=resolve_dtype(dtype, self.device))
        self.tokenizer = load_tokenizer(self.path)
        self.prefix = special_prefix(self.tokenizer)
        self.answer_ids = tuple(answer_token(self.tokenizer, answer) for answer in ANSWERS)
        limit = max_positions(self.model.config)
        if max_length is not None and limit is not None and max_length > limit:
            raise ConfigError(f"max_length ({max_length}) exceeds the model's {limit} position embeddings")
        self.max_length = max_length or limit or 1024
        self.name = name or self.path.resolve().name

    def principle_for(self, item: Pair) -> str:
        """The principle text a pair is judged under: one drawn for it, or all of them listed."""
        if self.principle_mode == "all":
            listed = "\n".join(f"{i}. {p}" for i, p in enumerate(self.principles, start=1))
            return f"Principles:\n{listed}\nWhich response follows these principles better?"
        return self.principles[draw_principle(len(self.principles), pair_key(item), self.seed)]

    def render(self, prompt: str, first: str, second: str, principle: str) -> str:
        """The judge prompt with ``first`` as option (A) and ``second`` as (B)."""
        return (
            "Consider the following conversation between a human and an assistant:\n"
            f"{prompt.strip()}\n"
            f"{principle}\n"
            "Options:\n"
            f"(A) {first.strip()}\n"
            f"(B) {second.strip()}\n"
            f"{ANSWER_CUE}"
        )

    def tokens(self, text: str) -> list[int]:
        """A judge prompt's tokens: its leading special tokens, then the end of the text that fits ``max_length``
        (the options and the question are at the end; a long conversation loses its start)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        room = self.max_length - len(self.prefix)
        return self.prefix + ids[-room:]

    @torch.no_grad()
    def answer_log_odds(self, texts: Sequence[str]) -> list[float]:
        """logit(" A") - logit(" B") at the end of each prompt: log P(A) - log P(B) restricted to the two answers."""
        seqs = [self.tokens(t) for t in texts]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)  # little padding per batch
        out = [0.0] * len(seqs)
        pad_id = self.tokenizer.pad_token_id
        a_id, b_id = self.answer_ids
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = pad_sequences([seqs[i] for i in chunk], pad_id=pad_id)  # right padding: positions stay 0..n-1
            logits = self.model(
                input_ids=batch.input_ids.to(self.device), attention_mask=batch.attention_mask.to(self.device)
            ).logits
            last = logits[torch.arange(len(chunk), device=self.device), batch.last_index.to(self.device)].float()
            for i, d in zip(chunk, (last[:, a_id] - last[:, b_id]).tolist()):
                out[i] = d
        return out

    def judge_many(self, items: Sequence[Pair]) -> list[Verdict]:
        texts = []
        for it in items:
            principle = self.principle_for(it)  # both orders under the same principle
            texts.append(self.render(it.prompt, it.response_a, it.response_b, principle))
            texts.append(self.render(it.prompt, it.response_b, it.response_a, principle))
        log_odds = self.answer_log_odds(texts)
        verdicts = []
        for i in range(len(items)):
            # A first: d says A; swapped: d says B, so -d says A. Their mean cancels a bias towards a position.
            d = (log_odds[2 * i] - log_odds[2 * i + 1]) / 2
            verdicts.append(verdict_of(d, tie=abs(sigmoid(d) - 0.5) < self.tie_band))
        return verdicts

    def judge(self, prompt: str, response_a: str, response_b: str) -> Verdict:
        return self.judge_many([Pair(prompt, response_a, response_b)])[0]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "path": str(self.path), "principles": len(self.principles),
                "principles_file": self.principles_path, "principle_mode": self.principle_mode,
                "tie_band": self.tie_band, "seed": self.seed}


# -- from a command line ---------------------------------------------------------------------


def load_judge(
    spec: str,
    *,
    principles: str | os.PathLike | None = None,
    principle_mode: PrincipleMode = "sample",
    device: str = "auto",
) -> PMJudge | LMJudge:
    """The judge ``pm:PATH`` (a Ratchet PM directory) or ``lm:PATH`` (a causal LM directory)."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("pm", "lm") or not path:
        raise ConfigError(f"judge ({spec!r}) must be pm:PATH (a preference model) or lm:PATH (a causal LM)")
    if kind == "pm":
        if principles is not None:
            raise ConfigError("principles are for an LM judge; a PM judge follows the preferences it was trained on")
        return PMJudge(path, device=device)
    return LMJudge(path, principles, principle_mode=principle_mode, device=device)
