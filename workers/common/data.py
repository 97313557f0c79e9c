"""Reading step inputs: prompt sets and comparison datasets (JSONL), and splitting them.

Comparisons are the records a store snapshot writes, one JSON object a line:
``{"prompt", "response_a", "response_b", "choice"}`` with ``choice`` one of
``"a"``, ``"b"``, ``"tie"`` (other keys such as ``batch_id``, ``rater_id``,
``task_id`` and ``metadata`` are kept or ignored). A record's source is
``metadata.source`` or a top-level ``source``. A record of a chat prompt
also has ``messages``, the prompt as a message list (``formats.chat``);
its ``prompt`` is their HH-RLHF text.

A prompt set is JSONL of ``{"id", "prompt"}`` or ``{"id", "messages"}``
(the prompt is then the messages' HH-RLHF text), or both.

Splits are by hash, not by position or RNG: a record lands in the same split
whatever the file order, the seed or the other records, and with
``split_by="prompt"`` every comparison of a prompt lands together, so a
held-out prompt was never seen in training.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from formats.chat import Messages, as_messages, hh_text, message_problems
from workers.common.config import WorkerError

CHOICES = ("a", "b", "tie")
TARGETS = {"a": 1.0, "b": 0.0, "tie": 0.5}


def read_jsonl(path: str | os.PathLike, *, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line; a clear error for a missing file or bad line."""
    path = Path(path)
    if not path.is_file():
        raise WorkerError(f"{what} file {path} does not exist")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkerError(f"{what} {path} line {lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise WorkerError(f"{what} {path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


@dataclass(frozen=True)
class Comparison:
    """One labelled comparison of two responses to a prompt."""

    prompt: str
    """the context both responses answer"""
    response_a: str
    """the first response"""
    response_b: str
    """the second response"""
    choice: str
    """``a``, ``b`` or ``tie``"""
    source: str | None = None
    """where the comparison came from (``metadata.source``), for per-source accuracy"""
    strength: float | None = None
    """how much better the chosen response is on the labeling scale (None: not given)"""
    messages: Messages | None = None
    """the prompt as a message list, for a chat template (None: a plain-text prompt)"""

    @property
    def target(self) -> float:
        """P(A preferred) as labelled: 1, 0 or 0.5 for a tie."""
        return TARGETS[self.choice]


def load_comparisons(path: str | os.PathLike) -> list[Comparison]:
    """Every comparison in a JSONL file, validated; errors name the line and the field."""
    out = []
    for lineno, obj in read_jsonl(path, what="comparison dataset"):
        where = f"comparison dataset {path} line {lineno}"
        for key in ("prompt", "response_a", "response_b", "choice"):
            if key not in obj:
                raise WorkerError(f"{where}: missing field {key!r}")
        for key in ("prompt", "response_a", "response_b"):
            if not isinstance(obj[key], str):
                raise WorkerError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
        choice = obj["choice"]
        if choice not in CHOICES:
            raise WorkerError(f"{where}: choice {choice!r} must be one of {', '.join(CHOICES)}")
        strength = obj.get("strength")
        if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength < 0):
            raise WorkerError(f"{where}: strength {strength!r} must be a number >= 0")
        meta = obj.get("metadata")
        source = meta.get("source") if isinstance(meta, dict) else None
        source = source if source is not None else obj.get("source")
        out.append(
            Comparison(
                prompt=obj["prompt"],
                response_a=obj["response_a"],
                response_b=obj["response_b"],
                choice=choice,
                source=None if source is None else str(source),
                strength=None if strength is None else float(strength),
                messages=_messages_of(obj, where),
            )
        )
    return out


def _messages_of(obj: dict[str, Any], where: str) -> Messages | None:
    """A record's ``messages`` (None when it has none), validated; the error names the line and the message."""
    if obj.get("messages") is None:
        return None
    problems = message_problems(obj["messages"])
    if problems:
        raise WorkerError(f"{where}: {problems[0]}")
    return as_messages(obj["messages"])


@dataclass(frozen=True)
class Prompt:
    """One prompt of a prompt set."""

    id: Any
    """the prompt's id as given (string or number)"""
    text: str
    """the prompt text (for a chat prompt given only as messages: their HH-RLHF text)"""
    messages: Messages | None = None
    """the prompt as a message list, for a chat template (None: a plain-text prompt)"""


def load_prompts(path: str | os.PathLike) -> list[Prompt]:
    """A prompt set: JSONL of ``{"id", "prompt"}`` or ``{"id", "messages"}`` (or both) with unique ids."""
    out = []
    seen: dict[str, int] = {}
    for lineno, obj in read_jsonl(path, what="prompt set"):
        where = f"prompt set {path} line {lineno}"
        if "id" not in obj or ("prompt" not in obj and "messages" not in obj):
            raise WorkerError(
                f"{where}: each record needs 'id' and 'prompt' or 'messages' (got keys {', '.join(sorted(obj)) or 'none'})"
            )
        if "prompt" in obj and not isinstance(obj["prompt"], str):
            raise WorkerError(f"{where}: 'prompt' must be a string, got {type(obj['prompt']).__name__}")
        messages = _messages_of(obj, where)
        if "prompt" not in obj and messages is None:
            raise WorkerError(f"{where}: 'messages' must be a list of {{role, content}} messages, got null")
        if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
            raise WorkerError(f"{where}: 'id' must be a string or an integer, got {obj['id']!r}")
        key = json.dumps(obj["id"])
        if key in seen:
            raise WorkerError(f"{where}: id {obj['id']!r} repeats line {seen[key]}")
        seen[key] = lineno
        text = obj["prompt"] if "prompt" in obj else hh_text(messages)
        out.append(Prompt(id=obj["id"], text=text, messages=messages))
    if not out:
        raise WorkerError(f"prompt set {path} is empty")
    return out


# -- splits ------------------------------------------------------------------------


def unit_hash(*parts: str) -> float:
    """A uniform number in [0, 1) from the sha256 of ``parts`` (stable across runs and machines)."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_key(comp: Comparison, split_by: str) -> str:
    """What a comparison is hashed on: its prompt, or the prompt and both responses (order-free)."""
    if split_by == "prompt":
        return comp.prompt
    a, b = sorted((comp.response_a, comp.response_b))
    return "\x1e".join((comp.prompt, a, b))


def is_heldout(comp: Comparison, *, fraction: float, split_by: str, salt: str = "heldout") -> bool:
    """Whether ``comp`` is in the held-out ``fraction`` (by hash of its split key)."""
    return unit_hash(salt, split_key(comp, split_by)) < fraction


def half_of(comp: Comparison, *, split_by: str) -> int:
    """0 or 1: which half of the dataset ``comp`` belongs to (for the train PM / test PM pair)."""
    return int(unit_hash("half", split_key(comp, split_by)) >= 0.5)


def split_comparisons(
    comps: Sequence[Comparison], *, fraction: float, split_by: str
) -> tuple[list[Comparison], list[Comparison]]:
    """(train, held-out) by hash; input order is kept within each."""
    train, heldout = [], []
    for comp in comps:
        (heldout if is_heldout(comp, fraction=fraction, split_by=split_by) else train).append(comp)
    return train, heldout
