"""Builders for worker-step inputs: comparison and prompt files, HH-RLHF conversion."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterable
from pathlib import Path

HH_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "hh-rlhf" / "harmless-base-test.first1000.jsonl.gz"
ASSISTANT = "\n\nAssistant:"

WORDS = "the a cat dog sun sea bread tree blue red good book day night river stone".split()


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    """Write records one JSON object a line; return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def comparison(prompt: str, a: str, b: str, choice: str, source: str | None = None) -> dict:
    """A comparison record as a store snapshot writes it."""
    rec = {"batch_id": 1, "prompt": prompt, "response_a": a, "response_b": b, "choice": choice, "rater_id": "r1"}
    if source is not None:
        rec["metadata"] = {"source": source}
    return rec


def synthetic_preferences(n: int, *, seed: int = 0, marker: str = " please") -> list[dict]:
    """A learnable preference: the response that contains ``marker`` wins; A/B order random."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = f"\n\nHuman: tell me about the {rng.choice(WORDS)} {i}\n\nAssistant:"
        good = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) + marker
        bad = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        source = "synthetic-even" if i % 2 == 0 else "synthetic-odd"
        if rng.random() < 0.5:
            out.append(comparison(prompt, good, bad, "a", source))
        else:
            out.append(comparison(prompt, bad, good, "b", source))
    return out


def split_hh_dialogue(text: str) -> tuple[str, str]:
    """(prompt, response): the prompt is everything up to and including the last "\\n\\nAssistant:"."""
    cut = text.rindex(ASSISTANT) + len(ASSISTANT)
    return text[:cut], text[cut:]


def hh_comparisons(limit: int | None = None, *, path: Path = HH_SAMPLE) -> list[dict]:
    """HH-RLHF {"chosen", "rejected"} records as comparisons (A = chosen), with source "hh-harmless-base"."""
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            prompt, chosen = split_hh_dialogue(rec["chosen"])
            prompt_r, rejected = split_hh_dialogue(rec["rejected"])
            if prompt != prompt_r:  # not a shared-prompt pair; skip rather than guess
                continue
            out.append(comparison(prompt, chosen, rejected, "a", "hh-harmless-base"))
            if limit is not None and len(out) >= limit:
                break
    return out


def prompt_set(n: int, *, seed: int = 0) -> list[dict]:
    """Prompts of varied lengths, {"id", "prompt"}."""
    rng = random.Random(seed)
    return [
        {"id": f"p{i}", "prompt": "\n\nHuman: " + " ".join(rng.choice(WORDS) for _ in range(1 + 3 * (i % 4))) + ASSISTANT}
        for i in range(n)
    ]
