"""The comparison tasks of a cycle: this week's prompts, the pairs labelers compare, the blinded eval pairs.

Pure functions of the samples and the week: which prompts, which pairs and
which side is A are decided by hashes of (week, prompt, samples), so a
re-run makes the same tasks.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from typing import Any


def unit(*parts: Any) -> float:
    """A stable number in [0, 1) from ``parts``."""
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "big") / 2**64


def rank_prompts(prompts: list[dict[str, Any]], *, week: str) -> list[dict[str, Any]]:
    """The prompt set in this week's order: by a hash of (week, id), a different order every week."""
    return sorted(prompts, key=lambda p: unit("prompts", week, p["id"]))


def choose_prompts(prompts: list[dict[str, Any]], *, n: int | None, week: str) -> list[dict[str, Any]]:
    """This week's prompts: the first ``n`` of ``rank_prompts``; all (in file order) when ``n`` is None."""
    if n is None or n >= len(prompts):
        return prompts
    return rank_prompts(prompts, week=week)[:n]


def storable(text: str) -> str:
    """``text`` as the store and the API accept it: a NUL character (a model can emit one) becomes U+FFFD."""
    return text.replace("\x00", "\ufffd")


def make_tasks(samples: list[dict[str, Any]], *, pairs_per_prompt: int | None, week: str) -> list[dict[str, Any]]:
    """Comparison tasks from the K responses per prompt: pairs of distinct responses.

    Identical responses make no pair (there is nothing to compare). Which
    pairs (when ``pairs_per_prompt`` caps them) and which response is A are
    decided by a hash of (week, prompt, samples), so a re-run makes the same
    tasks. Texts are made storable (``storable``).
    """
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        s = {**s, "prompt": storable(s["prompt"]), "response": storable(s["response"])}
        by_prompt[json.dumps(s["prompt_id"])].append(s)
    tasks = []
    for key, group in by_prompt.items():
        seen: dict[str, dict[str, Any]] = {}
        for s in sorted(group, key=lambda s: (s["policy"], s["sample_index"])):
            seen.setdefault(s["response"], s)
        distinct = list(seen.values())
        pairs = [(a, b) for i, a in enumerate(distinct) for b in distinct[i + 1 :]]
        pairs.sort(key=lambda ab: unit("pair", week, key, ab[0]["policy"], ab[0]["sample_index"], ab[1]["policy"], ab[1]["sample_index"]))
        if pairs_per_prompt is not None:
            pairs = pairs[:pairs_per_prompt]
        for a, b in pairs:
            if unit("order", week, key, a["sample_index"], b["sample_index"]) < 0.5:
                a, b = b, a
            tasks.append({
                "prompt_id": str(a["prompt_id"]),
                "prompt": a["prompt"],
                "response_a": a["response"],
                "response_b": b["response"],
                "metadata": {
                    "policy_a": a["policy"], "sample_a": a["sample_index"],
                    "policy_b": b["policy"], "sample_b": b["sample_index"],
                },
            })
    return tasks


def with_overlap(tasks: list[dict[str, Any]], *, share: float, raters: int, week: str) -> list[dict[str, Any]]:
    """The tasks, with ``share`` of them (picked by a hash of week, prompt and pair) needing ``raters``
    distinct raters: the overlap that rater agreement is measured on (``store.raters``)."""
    out = []
    for t in tasks:
        key = ("overlap", week, t["prompt_id"], t["response_a"], t["response_b"])
        out.append({**t, "answers_needed": raters} if share > 0 and unit(*key) < share else t)
    return out


def eval_pairs(samples: list[dict[str, Any]], prompts: dict[str, str], *, week: str,
               max_tasks: int | None) -> tuple[list[dict[str, Any]], int]:
    """Blinded eval tasks from the evaluate step's samples, and how many pairs were identical.

    Each (prompt, sample) whose candidate and deployed-policy responses
    differ is one task; which of the two is A is decided per task by a hash
    of (week, prompt, sample), and recorded only in ``candidate_side`` (the
    task API never shows it). Identical pairs are left out: there is nothing
    to judge. With ``max_tasks`` the first tasks in hash order are kept.
    """
    tasks, identical = [], 0
    for row in samples:
        key = json.dumps(row["prompt_id"])
        candidate, baseline = storable(row["candidate"]["response"]), storable(row["baseline"]["response"])
        if candidate == baseline:
            identical += 1
            continue
        side = "a" if unit("eval-order", week, key, row.get("sample", 0)) < 0.5 else "b"
        a, b = (candidate, baseline) if side == "a" else (baseline, candidate)
        tasks.append({"prompt_id": str(row["prompt_id"]), "prompt": storable(prompts[key]), "response_a": a,
                      "response_b": b, "candidate_side": side, "rank": unit("eval-pick", week, key, row.get("sample", 0))})
    tasks.sort(key=lambda t: t.pop("rank"))
    return (tasks if max_tasks is None else tasks[:max_tasks]), identical
