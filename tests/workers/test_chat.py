"""Chat-format prompts in the workers: the one encoding rule every step uses, and how prompt sets, comparisons,
sample, train_pm, dpo and sft carry messages (the rules and the text: ``tests/test_formats_chat.py``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from formats.chat import prompt_token_ids, special_prefix
from tests.test_formats_chat import CHAT, CHAT_TEXT
from tests.workers.builders import write_jsonl
from workers.common.config import WorkerError
from workers.common.data import Prompt, load_comparisons, load_prompts
from workers.common.pm import TokenLayout
from workers.common.rollout import encode_prompts
from workers.common.testing import CHAT_TEMPLATE, build_tiny_model, build_tokenizer
from workers.sample import SampleConfig, run


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The tiny tokenizer with ``CHAT_TEMPLATE``, adding BOS like a Llama tokenizer."""
    return build_tokenizer(vocab_size=512, add_bos=True, chat_template=CHAT_TEMPLATE)


# -- the encoding rule ----------------------------------------------------------------------


@pytest.mark.parametrize("add_bos", [False, True])
def test_plain_prompts_encode_exactly_as_before(add_bos):
    tokenizer = build_tokenizer(vocab_size=512, add_bos=add_bos)
    texts = [CHAT_TEXT, "\n\nHuman: short\n\nAssistant:"]
    before = [special_prefix(tokenizer) + ids for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert prompt_token_ids(tokenizer, texts) == before
    # messages change nothing for a tokenizer without a chat template
    assert prompt_token_ids(tokenizer, texts, [CHAT, None]) == before


def test_a_chat_prompt_goes_through_the_template_and_a_plain_one_beside_it_does_not(chat_tokenizer):
    plain = "\n\nHuman: short\n\nAssistant:"
    chat_ids, plain_ids = prompt_token_ids(chat_tokenizer, [CHAT_TEXT, plain], [CHAT, None])
    assert chat_ids == chat_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    assert chat_tokenizer.decode(chat_ids) == (
        "<|startoftext|><|system|>Be brief.\n<|user|>Hi!\n<|assistant|>Hello.\n<|user|>How do I bake bread?\n<|assistant|>"
    )
    assert plain_ids == [chat_tokenizer.bos_token_id] + chat_tokenizer(plain, add_special_tokens=False)["input_ids"]


def test_encode_prompts_cuts_a_chat_prompt_to_its_tail_and_keeps_bos(chat_tokenizer):
    full = prompt_token_ids(chat_tokenizer, [CHAT_TEXT], [CHAT])[0]
    (cut,) = encode_prompts(chat_tokenizer, [Prompt("p", CHAT_TEXT, tuple(CHAT))], max_prompt_tokens=10)
    assert cut == full[:1] + full[-9:] and cut[0] == chat_tokenizer.bos_token_id
    (whole,) = encode_prompts(chat_tokenizer, [Prompt("p", CHAT_TEXT, tuple(CHAT))], max_prompt_tokens=None)
    assert whole == full


def test_the_pm_token_layout_uses_the_template_for_prompts_with_messages(chat_tokenizer):
    layout = TokenLayout(chat_tokenizer, max_length=128, append_eos=True)
    chat_ids, plain_ids = layout.prompts([CHAT_TEXT, CHAT_TEXT], [CHAT, None])
    assert chat_ids == prompt_token_ids(chat_tokenizer, [CHAT_TEXT], [CHAT])[0]
    assert plain_ids == layout.prompts([CHAT_TEXT])[0] != chat_ids


# -- loading prompt sets and comparisons -----------------------------------------------------


def test_a_prompt_set_line_may_give_messages_instead_of_a_prompt(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "chat", "messages": CHAT},
        {"id": "both", "prompt": "own text", "messages": CHAT},
        {"id": "plain", "prompt": "\n\nHuman: hi\n\nAssistant:"},
    ])
    chat, both, plain = load_prompts(path)
    assert (chat.text, chat.messages) == (CHAT_TEXT, tuple(CHAT))
    assert (both.text, both.messages) == ("own text", tuple(CHAT))
    assert plain.messages is None


@pytest.mark.parametrize(
    ("record", "error"),
    [
        ({"id": 1}, "line 1: each record needs 'id' and 'prompt' or 'messages' (got keys id)"),
        ({"id": 1, "messages": None}, "line 1: 'messages' must be a list of {role, content} messages, got null"),
        ({"id": 1, "messages": [{"role": "bot", "content": "x"}]}, "line 1: messages[0].role 'bot' is not one of"),
        ({"id": 1, "messages": CHAT[:3]}, "line 1: messages[2] is an assistant message; a prompt ends with a user turn"),
    ],
)
def test_a_bad_prompt_set_line_names_the_line_and_the_field(tmp_path, record, error):
    path = write_jsonl(tmp_path / "p.jsonl", [record])
    with pytest.raises(WorkerError, match=re.escape(error)):
        load_prompts(path)


def test_comparisons_carry_their_prompt_messages_and_bad_ones_name_the_line(tmp_path):
    good = {"prompt": CHAT_TEXT, "response_a": "Knead.", "response_b": "No.", "choice": "a", "messages": CHAT}
    plain = {"prompt": CHAT_TEXT, "response_a": "Knead.", "response_b": "No.", "choice": "b"}
    chat_comp, plain_comp = load_comparisons(write_jsonl(tmp_path / "c.jsonl", [good, plain]))
    assert chat_comp.messages == tuple(CHAT) and plain_comp.messages is None
    bad = {**good, "messages": [{"role": "user", "content": 1}]}
    with pytest.raises(WorkerError, match=r"line 2: messages\[0\].content must be a string, got int"):
        load_comparisons(write_jsonl(tmp_path / "bad.jsonl", [plain, bad]))


# -- the sample step -----------------------------------------------------------------------------


def test_sample_encodes_chat_prompts_with_the_template_and_carries_their_messages(tmp_path, chat_tokenizer):
    model = build_tiny_model(tmp_path / "chat-llama", arch="llama", tokenizer=chat_tokenizer, max_positions=128, seed=2)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": "chat", "messages": CHAT}, {"id": "plain", "prompt": "\n\nHuman: hi\n\nAssistant:"}])
    cfg = SampleConfig(policies={"chat-v1": str(model)}, prompts_path=str(prompts), output_dir=str(tmp_path / "out"),
                       num_samples=2, max_new_tokens=6, batch_size=4, progress=False)
    records = {(r["prompt_id"], r["sample_index"]): r
               for r in map(json.loads, Path(run(cfg).outputs["samples"]).read_text().splitlines())}
    chat_ids = prompt_token_ids(chat_tokenizer, [CHAT_TEXT], [CHAT])[0]
    plain_ids = prompt_token_ids(chat_tokenizer, ["\n\nHuman: hi\n\nAssistant:"])[0]
    for k in range(2):
        chat, plain = records[("chat", k)], records[("plain", k)]
        assert (chat["prompt"], chat["messages"], chat["prompt_tokens"]) == (CHAT_TEXT, CHAT, len(chat_ids))
        assert "messages" not in plain and plain["prompt_tokens"] == len(plain_ids)
    assert len(chat_ids) != len(prompt_token_ids(chat_tokenizer, [CHAT_TEXT])[0])


# -- the steps that train on comparisons and records -------------------------------------------------


def test_train_pm_dpo_and_sft_encode_a_chat_prompt_with_the_template(tmp_path, chat_tokenizer):
    """What the PM is trained on is what ppo and evaluate score it on: the template's tokens."""
    from workers.dpo import encode_pairs
    from workers.sft import load_examples
    from workers.train_pm import encode

    templated = prompt_token_ids(chat_tokenizer, [CHAT_TEXT], [CHAT])[0]
    plain = prompt_token_ids(chat_tokenizer, [CHAT_TEXT])[0]
    assert templated != plain
    comps_path = tmp_path / "comps.jsonl"
    comps_path.write_text("\n".join(json.dumps(r) for r in (
        {"prompt": CHAT_TEXT, "messages": CHAT, "response_a": " Knead.", "response_b": " No.", "choice": "a"},
        {"prompt": CHAT_TEXT, "response_a": " Knead.", "response_b": " No.", "choice": "a"},
    )) + "\n")
    comps = load_comparisons(comps_path)

    (chat_pair, plain_pair), _ = encode(comps, TokenLayout(chat_tokenizer, max_length=128, append_eos=True),
                                        truncation="left")
    assert chat_pair.prompt == templated and plain_pair.prompt == plain

    (chat_dpo, plain_dpo), cut = encode_pairs(comps, chat_tokenizer, max_length=128)
    assert cut == 0
    assert chat_dpo.a.input_ids[: chat_dpo.a.loss_from] == templated
    assert plain_dpo.a.input_ids[: plain_dpo.a.loss_from] == plain

    sft_path = tmp_path / "sft.jsonl"
    sft_path.write_text(json.dumps({"messages": CHAT, "response": " Knead it."}) + "\n"
                        + json.dumps({"prompt": CHAT_TEXT, "response": " Knead it."}) + "\n")
    (chat_example, plain_example), _ = load_examples(str(sft_path), chat_tokenizer, max_length=128, loss_on_prompt=False)
    assert chat_example.input_ids[: chat_example.loss_from] == templated
    assert plain_example.input_ids[: plain_example.loss_from] == plain
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "bot", "content": "x"}], "response": "y"}) + "\n")
    with pytest.raises(WorkerError, match=r"line 1: messages\[0\]\.role 'bot'"):
        load_examples(str(bad), chat_tokenizer, max_length=128, loss_on_prompt=False)
