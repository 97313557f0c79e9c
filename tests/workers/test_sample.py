"""sample on tiny models: reproducible, padding-independent, correct log-probs, resumable, clear errors."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from formats.chat import prompt_token_ids
from tests.test_formats_chat import CHAT
from tests.workers.builders import write_jsonl
from workers.common.config import WorkerError
from workers.common.generation import generate, row_uniforms, sample_tokens, stop_ids
from workers.common.modeling import load_causal_lm, load_tokenizer
from workers.common.pm import keep_prompt_end
from workers.common.testing import CHAT_TEMPLATE, build_tiny_model, build_tokenizer
from workers.sample import SampleConfig, run

CPU = torch.device("cpu")


def _config(policies: dict, prompts: Path, out: Path, **kw) -> SampleConfig:
    base = dict(policies={k: str(v) for k, v in policies.items()}, prompts_path=str(prompts), output_dir=str(out),
                num_samples=3, max_new_tokens=12, temperature=1.0, top_p=0.9, batch_size=8, progress=False)
    return SampleConfig(**{**base, **kw})


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _texts(records: list[dict]) -> list[tuple]:
    return [(r["policy"], r["prompt_id"], r["sample_index"], r["response"], r["response_tokens"]) for r in records]


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_gpt2, tiny_llama, prompts_path):
    """(config, result) of sampling two policies (GPT-2 and Llama) on eight prompts."""
    cfg = _config({"gpt2-v1": tiny_gpt2, "llama-v1": tiny_llama}, prompts_path, tmp_path_factory.mktemp("s") / "out")
    return cfg, run(cfg)


def test_output_records(sampled):
    cfg, result = sampled
    records = _records(Path(result.outputs["samples"]))
    assert len(records) == 2 * 8 * 3
    assert {(r["policy"], r["prompt_id"], r["sample_index"]) for r in records} == {
        (p, f"p{i}", k) for p in ("gpt2-v1", "llama-v1") for i in range(8) for k in range(3)
    }
    for r in records:
        assert 1 <= r["response_tokens"] <= cfg.max_new_tokens and r["prompt_tokens"] > 0
        assert r["finish_reason"] in ("eos", "length")
        assert r["finish_reason"] == "eos" or r["response_tokens"] == cfg.max_new_tokens
        assert r["logprob"] < 0 and math.isfinite(r["sampling_logprob"])
    m = result.metrics
    assert m["samples/responses"] == 48 and m["perf/tokens_per_s"] > 0
    assert m["perf/generated_tokens"] == sum(r["response_tokens"] for r in records)
    assert set(result.files) >= {"samples.jsonl", "summary.json", "ratchet_step_config.json"}


def test_reproducible_for_a_seed_and_independent_of_batching(tmp_path, sampled, tiny_gpt2, tiny_llama, prompts_path):
    cfg, result = sampled
    first = _records(Path(result.outputs["samples"]))
    again = run(dataclasses.replace(cfg, output_dir=str(tmp_path / "again"), batch_size=5))
    assert _texts(_records(Path(again.outputs["samples"]))) == _texts(first)
    other = run(dataclasses.replace(cfg, output_dir=str(tmp_path / "other"), seed=1))
    assert _texts(_records(Path(other.outputs["samples"]))) != _texts(first)


def test_killed_run_resumes_after_its_last_batch(tmp_path, sampled):
    cfg, result = sampled
    partial_cfg = dataclasses.replace(cfg, output_dir=str(tmp_path / "killed"), max_batches_this_run=2)
    assert not run(partial_cfg).complete
    partial = tmp_path / "killed/samples.jsonl.partial"
    with open(partial, "a") as fh:  # a kill in the middle of writing the next batch
        fh.write('{"prompt_id": "p5", "pol')
    while not (final := run(partial_cfg)).complete:
        pass
    assert _texts(_records(Path(final.outputs["samples"]))) == _texts(_records(Path(result.outputs["samples"])))


@pytest.mark.parametrize("model_fixture", ["tiny_gpt2", "tiny_llama"])
def test_left_padding_gives_the_unpadded_response(request, model_fixture):
    path = request.getfixturevalue(model_fixture)
    model = load_causal_lm(path, device=CPU, dtype=torch.float32)
    tokenizer = load_tokenizer(path)
    prompts = [tokenizer(t)["input_ids"] for t in ("\n\nHuman: hi\n\nAssistant:", "\n\nHuman: tell me about the river and the stone\n\nAssistant:", "a")]
    kw = dict(max_new_tokens=10, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    # greedy: batched (the short prompts are left-padded) == one by one == transformers' generate
    batched = generate(model, prompts, uniforms=None, temperature=0.0, top_p=1.0, **kw)
    alone = [generate(model, [p], uniforms=None, temperature=0.0, top_p=1.0, **kw)[0] for p in prompts]
    assert [g.tokens for g in batched] == [g.tokens for g in alone]
    for p, g in zip(prompts, alone):
        ref = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=10, pad_token_id=kw["pad_id"], eos_token_id=kw["eos_id"])
        assert ref[0, len(p):].tolist() == g.tokens
    # sampling: each row's random numbers are its own, so padding changes nothing either
    uniforms = torch.stack([row_uniforms(i, 10) for i in range(3)])
    batched = generate(model, prompts, uniforms=uniforms, temperature=1.0, top_p=0.95, **kw)
    alone = [generate(model, [p], uniforms=uniforms[i : i + 1], temperature=1.0, top_p=0.95, **kw)[0] for i, p in enumerate(prompts)]
    assert [g.tokens for g in batched] == [g.tokens for g in alone]
    assert [g.logprob for g in batched] == pytest.approx([g.logprob for g in alone], abs=1e-4)


def test_logprob_is_the_policys_log_likelihood_of_the_response(tiny_llama):
    model = load_causal_lm(tiny_llama, device=CPU, dtype=torch.float32)
    tokenizer = load_tokenizer(tiny_llama)
    prompt = tokenizer("\n\nHuman: the sea\n\nAssistant:")["input_ids"]
    gen = generate(model, [prompt], uniforms=row_uniforms(3, 8)[None], temperature=0.7, top_p=1.0, max_new_tokens=8,
                   eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + gen.tokens])).logits[0, len(prompt) - 1 : -1]
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(gen.tokens)[:, None]).sum().item()
    assert gen.logprob == pytest.approx(logp, abs=1e-4)
    tempered = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(gen.tokens)[:, None]).sum().item()
    assert gen.sampling_logprob == pytest.approx(tempered, abs=1e-4)


def test_sample_tokens_inverse_cdf_and_top_p():
    # probabilities 0.5, 0.3, 0.15, 0.05 over tokens 2, 0, 3, 1
    logits = torch.log(torch.tensor([[0.3, 0.05, 0.5, 0.15]])).repeat(4, 1)
    u = torch.tensor([0.0, 0.49, 0.51, 0.999], dtype=torch.float64)
    tokens, logp = sample_tokens(logits, u, temperature=1.0, top_p=1.0)
    # CDF in vocabulary order: 0.3, 0.35, 0.85, 1.0
    assert tokens.tolist() == [0, 2, 2, 3]
    # top-p 0.7 keeps tokens 2 and 0 (mass 0.8), renormalised: CDF 0.625, 1.0
    tokens, logp = sample_tokens(logits, u, temperature=1.0, top_p=0.7)
    assert tokens.tolist() == [2, 2, 2, 0]
    assert logp.tolist() == pytest.approx([math.log(0.625)] * 3 + [math.log(0.375)])


def test_bad_inputs(tmp_path, tiny_gpt2, prompts_path):
    with pytest.raises(WorkerError, match=r"policy 'v1' directory .*missing does not exist"):
        run(_config({"v1": tmp_path / "missing"}, prompts_path, tmp_path / "o"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(WorkerError, match="prompt set .* is empty"):
        run(_config({"v1": tiny_gpt2}, empty, tmp_path / "o"))
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}])
    with pytest.raises(WorkerError, match="line 2: id 1 repeats line 1"):
        run(_config({"v1": tiny_gpt2}, dup, tmp_path / "o"))
    long = write_jsonl(tmp_path / "long.jsonl", [{"id": "x", "prompt": "river stone " * 400}])
    with pytest.raises(WorkerError, match=r"prompt 'x' has 501 tokens; with max_new_tokens 12 that exceeds policy "
                                          r"v1's 512 positions; set max_prompt_tokens to at most 500, or leave it null"):
        run(_config({"v1": tiny_gpt2}, long, tmp_path / "o", max_prompt_tokens=501))
    with pytest.raises(WorkerError, match="max_new_tokens \\(512\\) leaves no room for a prompt in policy v1's 512 positions"):
        run(_config({"v1": tiny_gpt2}, long, tmp_path / "o", max_new_tokens=512))
    # ... and a max_prompt_tokens that fits keeps the end of it
    result = run(_config({"v1": tiny_gpt2}, long, tmp_path / "cut", max_prompt_tokens=100, num_samples=1))
    assert _records(Path(result.outputs["samples"]))[0]["prompt_tokens"] == 100
    assert result.metrics["samples/prompts_cut"] == 1 and result.metrics["samples/v1/max_prompt_tokens"] == 100


# -- over-long prompts ---------------------------------------------------------------------


def test_keep_prompt_end_keeps_the_prefix_and_the_last_tokens():
    prompt = [1, 10, 11, 12, 13, 14]  # BOS, then the dialogue
    assert keep_prompt_end(prompt, 4, keep_prefix=1) == [1, 12, 13, 14]
    assert keep_prompt_end(prompt, 4) == [11, 12, 13, 14]
    assert keep_prompt_end(prompt, 1, keep_prefix=1) == [1]
    assert keep_prompt_end(prompt, 6, keep_prefix=1) == prompt
    with pytest.raises(ValueError, match=r"budget \(0\) must be >= 1"):
        keep_prompt_end(prompt, 0)


def _greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int):
    """The greedy response to ``prompt_ids`` as ``sample`` writes it: (text, log-prob)."""
    model = load_causal_lm(model_dir, device=CPU, dtype=torch.float32)
    tokenizer = load_tokenizer(model_dir)
    gen = generate(model, [prompt_ids], uniforms=None, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                   eos_id=stop_ids(model, tokenizer), pad_id=tokenizer.pad_token_id)[0]
    body = gen.tokens[:-1] if gen.finish_reason == "eos" else gen.tokens
    return tokenizer.decode(body, skip_special_tokens=True), gen.logprob


def test_an_over_long_prompt_is_cut_to_its_bos_and_its_end_by_default_and_counted(tmp_path, tiny_llama):
    """With max_prompt_tokens unset the policy's 512 positions less max_new_tokens (12) leave 500 prompt tokens."""
    dialogue = "\n\nHuman: " + "tell me about the river and the stone " * 60 + "\n\nAssistant:"
    short = "\n\nHuman: hi\n\nAssistant:"
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "long", "prompt": dialogue}, {"id": "short", "prompt": short}])
    result = run(_config({"v1": tiny_llama}, prompts, tmp_path / "out", num_samples=1, temperature=0.0))
    records = {r["prompt_id"]: r for r in _records(Path(result.outputs["samples"]))}
    tokenizer = load_tokenizer(tiny_llama)
    full, whole = prompt_token_ids(tokenizer, [dialogue, short])
    assert len(full) > 600 and full[0] == tokenizer.bos_token_id
    kept = full[:1] + full[-499:]  # BOS, then the dialogue's last 499 tokens (its "\n\nAssistant:" among them)
    assert (records["long"]["prompt_tokens"], records["short"]["prompt_tokens"]) == (500, len(whole))
    # what the policy answered is its answer to exactly those tokens
    text, logprob = _greedy(tiny_llama, kept, 12)
    assert records["long"]["response"] == text and records["long"]["logprob"] == pytest.approx(logprob, abs=1e-4)
    m = result.metrics
    assert (m["samples/prompts_cut"], m["samples/v1/prompts_cut"], m["samples/v1/max_prompt_tokens"]) == (1, 1, 500)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["metrics"]["samples/prompts_cut"] == 1


def test_an_over_long_chat_prompt_keeps_bos_and_the_templates_generation_prompt(tmp_path):
    tokenizer = build_tokenizer(vocab_size=512, add_bos=True, chat_template=CHAT_TEMPLATE)
    model = build_tiny_model(tmp_path / "chat", arch="llama", tokenizer=tokenizer, max_positions=64, seed=2)
    messages = [*CHAT[:-1], {"role": "user", "content": "How do I bake bread? " * 20}]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "chat", "messages": messages}])
    result = run(_config({"v1": model}, prompts, tmp_path / "out", num_samples=1, temperature=0.0, max_new_tokens=8))
    (record,) = _records(Path(result.outputs["samples"]))
    full = prompt_token_ids(tokenizer, [""], [messages])[0]
    kept = full[:1] + full[-55:]
    assert len(full) > 56 and record["prompt_tokens"] == 56 and result.metrics["samples/prompts_cut"] == 1
    assert tokenizer.decode(kept).startswith("<|startoftext|>") and tokenizer.decode(kept).endswith("\n<|assistant|>")
    text, logprob = _greedy(model, kept, 8)
    assert record["response"] == text and record["logprob"] == pytest.approx(logprob, abs=1e-4)


def test_stops_at_any_of_several_eos_ids(tiny_gpt2):
    model = load_causal_lm(tiny_gpt2, device=CPU, dtype=torch.float32)
    tokenizer = load_tokenizer(tiny_gpt2)
    prompt = tokenizer("\n\nHuman: hi\n\nAssistant:")["input_ids"]
    free = generate(model, [prompt], uniforms=None, temperature=0.0, top_p=1.0, max_new_tokens=6, eos_id=1, pad_id=0)[0]
    first = free.tokens[0]
    stopped = generate(model, [prompt, prompt], uniforms=None, temperature=0.0, top_p=1.0, max_new_tokens=6,
                       eos_id=[1, first], pad_id=0)
    assert [g.tokens for g in stopped] == [[first], [first]]
    assert [g.finish_reason for g in stopped] == ["eos", "eos"]
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], uniforms=None, temperature=0.0, top_p=1.0, max_new_tokens=2, eos_id=1, pad_id=0)
