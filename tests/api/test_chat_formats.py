"""TRL's conversational preference format: parsing, export, and import/export through the real app and PostgreSQL,
with chat prompts' messages carried by comparisons, by tasks and by snapshots."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from api.formats import FormatError, JsonlImportParser, ParsedLine, export_record, parse_preference
from store.datasets import snapshot_comparisons
from store.feedback import NewComparison, create_feedback_batch
from store.models import Comparison
from store.tasks import create_tasks, lease_tasks

FMT = "trl-conversational"
PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I bake bread?"}]
PROMPT_TEXT = "Be brief.\n\nHuman: How do I bake bread?\n\nAssistant:"


def explicit(chosen: str = "Knead, rise, bake.", rejected: str = "No idea.", **extra) -> dict:
    """A conversational line with an explicit prompt."""
    return {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], **extra}


def implicit(chosen: str = "Knead, rise, bake.", rejected: str = "No idea.") -> dict:
    """The same pair with an implicit prompt: two whole conversations."""
    return {"chosen": PROMPT + [{"role": "assistant", "content": chosen}],
            "rejected": PROMPT + [{"role": "assistant", "content": rejected}]}


def jsonl(*objs: dict) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


# -- parsing and writing lines -----------------------------------------------------------------


@pytest.mark.parametrize("line", [explicit(), implicit()], ids=["explicit-prompt", "implicit-prompt"])
def test_a_conversational_line_is_stored_as_hh_text_with_its_messages(line):
    record = parse_preference(FMT, line)
    assert (record.prompt, record.chosen, record.rejected) == (PROMPT_TEXT, "Knead, rise, bake.", "No idea.")
    assert record.messages == tuple(PROMPT)


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"prompt": "Q", "chosen": "a", "rejected": "b"},
         "field 'chosen' must be a list of {role, content} messages, got str (the standard form with strings is format 'trl')"),
        ({"chosen": implicit()["chosen"]}, "field 'rejected' is missing"),
        (explicit() | {"prompt": PROMPT[:1]}, "prompt[0] is a system message; a prompt ends with a user turn"),
        (explicit() | {"prompt": [{"role": "human", "content": "Q"}]},
         "prompt[0].role 'human' is not one of system, user, assistant"),
        (explicit() | {"chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
         "field 'chosen' must be one assistant message after an explicit prompt, got 2 messages"),
        (explicit() | {"rejected": [{"role": "user", "content": "b"}]},
         "rejected[0] is not an assistant message (role 'user'); the response must be one"),
        (explicit() | {"chosen": [{"role": "assistant", "content": 7}]}, "chosen[0].content must be a string, got int"),
        (explicit(chosen="same", rejected="same"), "chosen and rejected responses are identical"),
        (implicit() | {"rejected": [PROMPT[0], {"role": "user", "content": "Other?"},
                                    {"role": "assistant", "content": "x"}]},
         "chosen and rejected differ before their last assistant turn (first difference at message 1)"),
        ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
         "field 'chosen' has no prompt: without 'prompt' it is the whole conversation, the prompt's turns and then "
         "the assistant's response"),
    ],
    ids=["standard-form", "missing", "prompt-ends-system", "bad-role", "two-messages", "not-assistant",
         "content-type", "identical", "implicit-differ", "implicit-no-prompt"],
)
def test_a_bad_conversational_line_names_its_field(obj, reason):
    with pytest.raises(FormatError) as info:
        parse_preference(FMT, obj)
    assert str(info.value) == reason


def test_export_writes_messages_and_reads_hh_turns_back_out_of_a_plain_prompt():
    line = json.loads(export_record(FMT, prompt=PROMPT_TEXT, chosen="Knead.", rejected="No.", strength=2.0,
                                    messages=PROMPT))
    assert line == explicit("Knead.", "No.", strength=2.0)
    plain = json.loads(export_record(FMT, prompt="\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bread?\n\nAssistant:",
                                     chosen=" Knead.", rejected=" No."))
    assert plain["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                               {"role": "user", "content": "Bread?"}]
    assert parse_preference(FMT, line).messages == tuple(PROMPT)  # and back


def test_the_streaming_parser_keeps_messages_and_reports_bad_lines_by_number():
    parser = JsonlImportParser(FMT)
    bad = explicit() | {"prompt": PROMPT[:1]}
    lines = parser.feed(jsonl(explicit(), bad, implicit(rejected="Buy it."))) + parser.close()
    assert lines == [
        ParsedLine(1, PROMPT_TEXT, "Knead, rise, bake.", "No idea.", None, None, tuple(PROMPT)),
        ParsedLine(2, None, None, None, "prompt[0] is a system message; a prompt ends with a user turn"),
        ParsedLine(3, PROMPT_TEXT, "Knead, rise, bake.", "Buy it.", None, None, tuple(PROMPT)),
    ]


# -- through the app ---------------------------------------------------------------------------


def _import(client, keys, body: bytes, query: str = ""):
    return client.post(f"/v1/feedback-batches/import?format={FMT}{query}", content=body,
                       headers=keys.labeler | {"Content-Type": "application/jsonl"})


def test_conversational_import_exports_back_the_same_lines(client, keys, pg_db):
    lines = [explicit(), explicit("Mix and wait.", "Ask a baker.", strength=3.0), implicit(rejected="Buy it.")]
    r = _import(client, keys, jsonl(*lines))
    assert r.status_code == 201, r.text
    batch_id = r.json()["batch"]["id"]
    with pg_db.session() as s:
        stored = s.scalars(select(Comparison).where(Comparison.batch_id == batch_id).order_by(Comparison.position)).all()
        assert [(c.prompt, c.meta) for c in stored] == [(PROMPT_TEXT, {"messages": PROMPT})] * 3
    exported = client.get(f"/v1/feedback-batches/{batch_id}/export?format={FMT}", headers=keys.labeler)
    assert exported.status_code == 200
    assert [json.loads(x) for x in exported.text.splitlines()] == [lines[0], lines[1], explicit(rejected="Buy it.")]
    hh = client.get(f"/v1/feedback-batches/{batch_id}/export?format=hh-rlhf", headers=keys.labeler)
    assert json.loads(hh.text.splitlines()[0]) == {"chosen": PROMPT_TEXT + "Knead, rise, bake.",
                                                   "rejected": PROMPT_TEXT + "No idea."}


def test_a_bad_conversational_line_is_skipped_naming_line_and_field_and_strict_refuses(client, keys):
    body = jsonl(explicit(), explicit() | {"chosen": [{"role": "assistant", "content": 7}]})
    r = _import(client, keys, body)
    assert r.status_code == 201, r.text
    assert r.json()["skipped_lines"] == [{"line": 2, "reason": "chosen[0].content must be a string, got int"}]
    strict = _import(client, keys, body, "&strict=true")
    assert strict.status_code == 422
    assert strict.json()["errors"] == [{"index": 2, "field": "line", "message": "chosen[0].content must be a string, got int"}]


def test_trl_import_points_a_conversational_line_to_its_format(client, keys):
    r = client.post("/v1/feedback-batches/import?format=trl&strict=true", content=jsonl(explicit()),
                    headers=keys.labeler | {"Content-Type": "application/jsonl"})
    assert r.status_code == 422
    assert "is format 'trl-conversational'" in r.json()["errors"][0]["message"]


def test_answers_to_a_chat_task_take_its_messages_into_snapshots_and_exports(client, keys, pg_db, artifacts):
    plain_prompt = "\n\nHuman: Hi\n\nAssistant:"
    with pg_db.session() as s:
        create_tasks(s, tasks=[
            {"prompt": PROMPT_TEXT, "response_a": "Knead.", "response_b": "No.", "metadata": {"messages": PROMPT}},
            {"prompt": plain_prompt, "response_a": " Hello.", "response_b": " Go away."},
        ])
        leased = [x.task for x in lease_tasks(s, rater_id="r1", limit=5, lease=timedelta(minutes=5))]
        answers = [NewComparison(prompt=t.prompt, response_a=t.response_a, response_b=t.response_b, choice="a",
                                 rater_id="r1", task_id=t.id) for t in leased]
        # a rater's own metadata with messages that are no valid prompt: kept as metadata, not used as messages
        answers.append(NewComparison(prompt=plain_prompt, response_a="x", response_b="y", choice="b", rater_id="r1",
                                     metadata={"messages": [{"role": "assistant", "content": "x"}]}))
        batch, _ = create_feedback_batch(s, source="labeling", comparisons=answers)
        dataset, _ = snapshot_comparisons(s, artifacts=artifacts)
        records = [json.loads(x) for x in artifacts.read_bytes(dataset.artifact.uri, dataset.artifact.sha256).decode().splitlines()]
        assert dataset.meta["chat_comparisons"] == 1
        assert dataset.meta["invalid_messages"] == {
            "comparisons": 1, "first": "metadata.messages[0] is an assistant message; a prompt ends with a user turn"}
    by_prompt = {r["prompt"]: r for r in records if "task_id" in r}
    assert by_prompt[PROMPT_TEXT]["messages"] == PROMPT and "messages" not in by_prompt[plain_prompt]
    assert "messages" not in records[-1]
    exported = client.get(f"/v1/datasets/{dataset.id}/export?format={FMT}", headers=keys.labeler)
    prompts = [json.loads(x)["prompt"] for x in exported.text.splitlines()]
    assert PROMPT in prompts and [{"role": "user", "content": "Hi"}] in prompts
