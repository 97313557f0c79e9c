"""Comparison and prompt files, and the hash splits (train / held-out, the two halves)."""

from __future__ import annotations

import pytest

from tests.workers.builders import comparison, hh_comparisons, split_hh_dialogue, write_jsonl
from workers.common.config import WorkerError
from workers.common.data import Comparison, half_of, is_heldout, load_comparisons, load_prompts, split_comparisons


def _comps(n: int, per_prompt: int = 1) -> list[Comparison]:
    return [Comparison(prompt=f"q{i // per_prompt}", response_a=f" a{i}", response_b=f" b{i}", choice="a") for i in range(n)]


def test_split_is_by_hash_stable_and_order_free():
    comps = _comps(2000)
    train, heldout = split_comparisons(comps, fraction=0.2, split_by="prompt")
    assert len(train) + len(heldout) == 2000 and 340 < len(heldout) < 460
    again_train, again_heldout = split_comparisons(list(reversed(comps)), fraction=0.2, split_by="prompt")
    assert set(again_heldout) == set(heldout) and set(again_train) == set(train)
    # a larger fraction only adds to the held-out set
    _, more = split_comparisons(comps, fraction=0.3, split_by="prompt")
    assert set(heldout) <= set(more)


def test_split_by_prompt_keeps_a_prompts_comparisons_together():
    comps = _comps(600, per_prompt=3)
    for split_by in ("prompt", "record"):
        flags = {}
        for c in comps:
            flags.setdefault(c.prompt, set()).add(is_heldout(c, fraction=0.5, split_by=split_by))
        mixed = sum(len(v) > 1 for v in flags.values())
        assert (mixed == 0) if split_by == "prompt" else (mixed > 20)
    halves: dict[str, set[int]] = {}
    for c in comps:
        halves.setdefault(c.prompt, set()).add(half_of(c, split_by="prompt"))
    assert all(len(v) == 1 for v in halves.values())
    assert 250 < sum(half_of(c, split_by="record") for c in comps) < 350


def test_record_split_ignores_the_order_of_a_and_b():
    c = Comparison(prompt="q", response_a=" x", response_b=" y", choice="a")
    swapped = Comparison(prompt="q", response_a=" y", response_b=" x", choice="b")
    for fraction in (0.1, 0.5, 0.9):
        assert is_heldout(c, fraction=fraction, split_by="record") == is_heldout(swapped, fraction=fraction, split_by="record")


def test_load_comparisons_reads_sources_and_rejects_bad_lines(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [comparison("q", " x", " y", "tie", source="vendor-1"),
                                               {"prompt": "q", "response_a": " x", "response_b": " y", "choice": "b"}])
    comps = load_comparisons(path)
    assert [(c.choice, c.target, c.source) for c in comps] == [("tie", 0.5, "vendor-1"), ("b", 0.0, None)]
    assert [c.strength for c in comps] == [None, None]
    strong = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "response_a": " x", "response_b": " y", "choice": "a",
                                                "strength": 2}])
    assert load_comparisons(strong)[0].strength == 2.0
    (tmp_path / "bad-strength.jsonl").write_text('{"prompt": "q", "response_a": "x", "response_b": "y", "choice": "a", "strength": "big"}\n')
    with pytest.raises(WorkerError, match="line 1: strength 'big' must be a number >= 0"):
        load_comparisons(tmp_path / "bad-strength.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q"}\n{not json\n')
    with pytest.raises(WorkerError, match="line 1: missing field 'response_a'"):
        load_comparisons(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text('[1, 2]\n')
    with pytest.raises(WorkerError, match="line 1: expected a JSON object, got list"):
        load_comparisons(tmp_path / "bad2.jsonl")
    with pytest.raises(WorkerError, match="comparison dataset file .*absent.jsonl does not exist"):
        load_comparisons(tmp_path / "absent.jsonl")
    (tmp_path / "types.jsonl").write_text('{"prompt": 3, "response_a": "x", "response_b": "y", "choice": "a"}\n')
    with pytest.raises(WorkerError, match="field 'prompt' must be a string, got int"):
        load_comparisons(tmp_path / "types.jsonl")


def test_load_prompts(tmp_path):
    prompts = load_prompts(write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "x"}, {"id": 7, "prompt": "y"}]))
    assert [(p.id, p.text) for p in prompts] == [("a", "x"), (7, "y")]
    with pytest.raises(WorkerError, match="line 1: each record needs 'id' and 'prompt'"):
        load_prompts(write_jsonl(tmp_path / "q.jsonl", [{"prompt": "x"}]))


def test_hh_sample_converts_to_shared_prompt_comparisons():
    comps = hh_comparisons(50)
    assert len(comps) == 50
    for rec in comps:
        assert rec["prompt"].endswith("\n\nAssistant:") and rec["choice"] == "a"
        assert not rec["response_a"].startswith("\n\nHuman:")
    assert split_hh_dialogue("\n\nHuman: hi\n\nAssistant: yo\n\nHuman: ok\n\nAssistant: fine") == (
        "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: ok\n\nAssistant:", " fine"
    )
