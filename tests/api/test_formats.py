"""api.formats: HH-RLHF and TRL lines, the streaming import parser, export.

Dataset texts are never printed: the real sample holds offensive content, so
its assertions compare indices and counts, not texts.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from api.formats import (
    FORMATS,
    FormatError,
    JsonlImportParser,
    ParsedLine,
    export_record,
    parse_record,
    parse_strength,
    split_hh_dialogue,
)

HH_DATA = Path(__file__).parents[1] / "data" / "hh-rlhf" / "harmless-base-test.first1000.jsonl.gz"

PROMPT = "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: Can you help me?\n\nAssistant:"
CONVERSATIONAL = "TRL's conversational format (lists of {role, content} messages) is not supported;"


def hh(chosen: str = " Sure.", rejected: str = " No.") -> dict:
    """An HH-RLHF record whose texts share ``PROMPT``."""
    return {"chosen": PROMPT + chosen, "rejected": PROMPT + rejected}


def trl(prompt: str = "Can you help me?", chosen: str = "Sure.", rejected: str = "No.") -> dict:
    """A TRL standard-format record."""
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def jsonl(*objs: dict) -> bytes:
    """JSON Lines, each line ending in a newline."""
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def parse_body(fmt: str, body: bytes, *, chunk: int, gzip: bool | None = None) -> list[ParsedLine]:
    """Feed ``body`` to a parser ``chunk`` bytes at a time, then close it."""
    parser = JsonlImportParser(fmt, gzip=gzip)
    out = []
    for start in range(0, len(body), chunk):
        out += parser.feed(body[start : start + chunk])
    return out + parser.close()


def ok(line: int, prompt: str, chosen: str, rejected: str, strength: float | None = None) -> ParsedLine:
    return ParsedLine(line, prompt, chosen, rejected, None, strength)


def bad(line: int, error: str) -> ParsedLine:
    return ParsedLine(line, None, None, None, error)


# split_hh_dialogue


def test_split_cuts_after_last_assistant_marker_and_keeps_the_space():
    record = hh(" Sure, what with?", " I'm sorry, I can't.")
    prompt, chosen, rejected = split_hh_dialogue(record["chosen"], record["rejected"])
    assert (prompt, chosen, rejected) == (PROMPT, " Sure, what with?", " I'm sorry, I can't.")
    assert prompt + chosen == record["chosen"] and prompt + rejected == record["rejected"]


def test_split_accepts_an_empty_response():
    assert split_hh_dialogue(PROMPT, PROMPT + " No.") == (PROMPT, "", " No.")


@pytest.mark.parametrize(
    ("chosen", "rejected", "reason"),
    [
        ("\n\nHuman: Hi!", PROMPT + " No.", "chosen has no Assistant turn ('\\n\\nAssistant:')"),
        (PROMPT + " Sure.", "\n\nHuman: Hi!", "rejected has no Assistant turn ('\\n\\nAssistant:')"),
        (
            PROMPT + " Sure.",
            PROMPT.replace("Hi!", "Yo!") + " No.",
            "chosen and rejected differ before their last Assistant turn (first difference at character 9)",
        ),
        (PROMPT + " Sure.", PROMPT + " Sure.", "chosen and rejected responses are identical"),
    ],
    ids=["no-assistant-in-chosen", "no-assistant-in-rejected", "prompts-differ", "identical-responses"],
)
def test_split_rejects(chosen, rejected, reason):
    with pytest.raises(FormatError) as info:
        split_hh_dialogue(chosen, rejected)
    assert str(info.value) == reason


# parse_record


def test_parse_record_reads_both_formats():
    assert parse_record("hh-rlhf", hh()) == (PROMPT, " Sure.", " No.")
    assert parse_record("trl", trl()) == ("Can you help me?", "Sure.", "No.")
    assert parse_record("trl", trl(chosen="")) == ("Can you help me?", "", "No.")


@pytest.mark.parametrize(
    ("fmt", "obj", "reason"),
    [
        ("hh-rlhf", [hh()], "line is not a JSON object"),
        ("trl", "text", "line is not a JSON object"),
        ("hh-rlhf", {"rejected": PROMPT + " No."}, "field 'chosen' is missing"),
        ("hh-rlhf", {**hh(), "chosen": [PROMPT]}, "field 'chosen' must be a string, got list"),
        ("hh-rlhf", {**hh(), "rejected": None}, "field 'rejected' must be a string, got null"),
        ("hh-rlhf", hh(" Sure.", " Sure."), "chosen and rejected responses are identical"),
        ("trl", {"chosen": "Sure.", "rejected": "No."}, "field 'prompt' is missing"),
        ("trl", trl(prompt=3), "field 'prompt' must be a string, got int"),
        ("trl", trl(rejected={"text": "No."}), "field 'rejected' must be a string, got dict"),
        ("trl", trl(chosen="Sure\ud800"), "field 'chosen' is not valid Unicode: lone surrogate at character 4"),
        ("trl", trl(prompt=" \n\t"), "field 'prompt' is empty"),
        ("trl", trl(chosen="Same.", rejected="Same."), "chosen and rejected responses are identical"),
    ],
    ids=[
        "hh-array",
        "trl-string",
        "missing-chosen",
        "list-chosen",
        "null-rejected",
        "hh-identical",
        "missing-prompt",
        "int-prompt",
        "dict-rejected",
        "lone-surrogate",
        "blank-prompt",
        "trl-identical",
    ],
)
def test_parse_record_rejects(fmt, obj, reason):
    with pytest.raises(FormatError) as info:
        parse_record(fmt, obj)
    assert str(info.value) == reason


def test_parse_record_rejects_trl_conversational_form():
    record = {
        "prompt": [{"role": "user", "content": "Can you help me?"}],
        "chosen": [{"role": "assistant", "content": "Sure."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    with pytest.raises(FormatError, match=r"^TRL's conversational format .* use the standard form"):
        parse_record("trl", record)


def test_unknown_format_lists_the_known_ones():
    message = "unknown format 'csv'; expected one of: hh-rlhf, trl, trl-conversational"
    assert FORMATS == ("hh-rlhf", "trl", "trl-conversational")
    with pytest.raises(ValueError, match=message):
        parse_record("csv", trl())
    with pytest.raises(ValueError, match=message):
        export_record("csv", prompt="p", chosen="a", rejected="b")
    with pytest.raises(ValueError, match=message):
        JsonlImportParser("csv")


# JsonlImportParser

MIXED_BODY = jsonl(trl(), trl(prompt="Q2")) + b"\n  \n" + b"not json\n" + json.dumps(trl(prompt="Q6")).encode()
MIXED_LINES = [
    ok(1, "Can you help me?", "Sure.", "No."),
    ok(2, "Q2", "Sure.", "No."),
    bad(5, "invalid JSON: Expecting value at column 1"),
    ok(6, "Q6", "Sure.", "No."),
]


def test_parser_one_byte_at_a_time_skips_blank_lines_and_flushes_the_last():
    assert parse_body("trl", MIXED_BODY, chunk=1) == MIXED_LINES


@pytest.mark.parametrize("flag", [True, None], ids=["gzip", "auto-detected"])
def test_parser_gzip_in_7_byte_chunks(flag):
    assert parse_body("trl", gzip.compress(MIXED_BODY), chunk=7, gzip=flag) == MIXED_LINES


def test_parser_reads_concatenated_gzip_members():
    body = gzip.compress(jsonl(trl())) + gzip.compress(jsonl(trl(prompt="Q2")))
    assert parse_body("trl", body, chunk=5) == [ok(1, "Can you help me?", "Sure.", "No."), ok(2, "Q2", "Sure.", "No.")]


def test_parser_truncated_gzip_raises_on_close():
    body = gzip.compress(jsonl(*[trl(prompt=f"Q{i}") for i in range(50)]))
    parser = JsonlImportParser("trl")
    assert len(parser.feed(body[:-4])) == 50  # all lines are in; only the trailer (size) is missing
    with pytest.raises(FormatError, match=r"^gzip stream is truncated$"):
        parser.close()


def test_parser_corrupt_gzip_raises():
    body = bytearray(gzip.compress(jsonl(trl())))
    body[3] = 0xFF  # reserved header flag bits
    with pytest.raises(FormatError, match=r"^gzip stream is corrupt: "):
        parse_body("trl", bytes(body), chunk=64)


def test_parser_empty_bodies():
    assert parse_body("trl", b"", chunk=1) == []
    with pytest.raises(FormatError, match=r"^gzip stream is empty$"):
        parse_body("trl", b"", chunk=1, gzip=True)


def test_parser_reports_bad_lines_and_goes_on():
    body = b'\xff{"prompt": "Q"}\n' + jsonl({"prompt": "Q", "chosen": "a"}, [1, 2], trl())
    assert parse_body("trl", body, chunk=3) == [
        bad(1, "invalid UTF-8 at byte 0: invalid start byte"),
        bad(2, "field 'rejected' is missing"),
        bad(3, "line is not a JSON object"),
        ok(4, "Can you help me?", "Sure.", "No."),
    ]


def test_parser_plain_mode_does_not_inflate():
    assert parse_body("trl", gzip.compress(jsonl(trl())), chunk=64, gzip=False)[0].error.startswith("invalid UTF-8")


def test_parser_accepts_a_utf8_bom_and_crlf_line_ends():
    body = b"\xef\xbb\xbf" + json.dumps(trl()).encode() + b"\r\n" + json.dumps(trl(prompt="Q2")).encode() + b"\r\n"
    assert parse_body("trl", body, chunk=2) == [ok(1, "Can you help me?", "Sure.", "No."), ok(2, "Q2", "Sure.", "No.")]


def test_parser_feed_after_close_is_an_error():
    parser = JsonlImportParser("trl")
    parser.close()
    with pytest.raises(ValueError, match="feed\\(\\) after close\\(\\)"):
        parser.feed(b"{}\n")


# strength


def test_the_optional_strength_is_read_in_both_formats():
    body = jsonl(trl() | {"strength": 2}, trl(prompt="Q2") | {"strength": 0.5}, trl(prompt="Q3"),
                 trl(prompt="Q4") | {"strength": None})
    assert parse_body("trl", body, chunk=5) == [
        ok(1, "Can you help me?", "Sure.", "No.", 2.0),
        ok(2, "Q2", "Sure.", "No.", 0.5),
        ok(3, "Q3", "Sure.", "No."),
        ok(4, "Q4", "Sure.", "No."),
    ]
    assert parse_body("hh-rlhf", jsonl(hh() | {"strength": 3.0}), chunk=64) == [ok(1, PROMPT, " Sure.", " No.", 3.0)]
    assert isinstance(parse_strength({"strength": 2}), float)


@pytest.mark.parametrize(
    ("strength", "reason"),
    [
        ("2", "field 'strength' must be a number, got str"),
        (True, "field 'strength' must be a number, got bool"),
        ([1], "field 'strength' must be a number, got list"),
        (0, "field 'strength': choice 'a' needs a strength above 0 (0 is a tie)"),
        (-1, "field 'strength': strength -1.0 is not a number from 0 to 10"),
        (10.5, "field 'strength': strength 10.5 is not a number from 0 to 10"),
        (10**400, "field 'strength': strength inf is not a number from 0 to 10"),
    ],
    ids=["string", "bool", "list", "zero-is-a-tie", "negative", "over-the-scale", "huge-integer"],
)
def test_a_bad_strength_is_a_skipped_line_naming_the_field(strength, reason):
    for fmt, record in (("trl", trl()), ("hh-rlhf", hh())):
        body = jsonl(record | {"strength": strength}, record)
        assert parse_body(fmt, body, chunk=16) == [bad(1, reason), ok(2, *parse_record(fmt, record))], fmt


def test_a_bad_text_is_reported_before_a_bad_strength():
    assert parse_body("trl", jsonl({"prompt": "Q", "strength": "x"}), chunk=64) == [bad(1, "field 'chosen' is missing")]


# export_record


def test_export_record_writes_one_utf8_line():
    assert export_record("trl", prompt="Q: café?", chosen=" oui", rejected=" non") == (
        '{"prompt": "Q: café?", "chosen": " oui", "rejected": " non"}\n'.encode()
    )
    assert export_record("hh-rlhf", prompt=PROMPT, chosen=" Sure.", rejected="") == jsonl(hh(" Sure.", ""))


def test_export_record_writes_strength_when_there_is_one():
    assert export_record("trl", prompt="Q", chosen="a", rejected="b", strength=2.0) == (
        b'{"prompt": "Q", "chosen": "a", "rejected": "b", "strength": 2.0}\n'
    )
    assert export_record("hh-rlhf", prompt=PROMPT, chosen=" Sure.", rejected=" No.", strength=1.5) == jsonl(
        hh() | {"strength": 1.5})
    assert export_record("trl", prompt="Q", chosen="a", rejected="b", strength=None) == jsonl(trl("Q", "a", "b"))
    for fmt, record in (("trl", trl()), ("hh-rlhf", hh())):  # what is written reads back the same
        prompt, chosen, rejected = parse_record(fmt, record)
        line = export_record(fmt, prompt=prompt, chosen=chosen, rejected=rejected, strength=3.0)
        assert parse_body(fmt, line, chunk=64) == [ok(1, prompt, chosen, rejected, 3.0)], fmt


# The real sample: 1000 lines of Anthropic's HH-RLHF harmless-base test split


def test_hh_rlhf_sample_parses_and_round_trips_exactly():
    originals = [json.loads(line) for line in gzip.decompress(HH_DATA.read_bytes()).splitlines()]
    parsed = parse_body("hh-rlhf", HH_DATA.read_bytes(), chunk=64 * 1024)

    assert [(p.line, p.error) for p in parsed if p.error is not None] == []
    assert [p.line for p in parsed] == list(range(1, 1001))
    mismatched = [
        p.line
        for p, original in zip(parsed, originals, strict=True)
        if json.loads(export_record("hh-rlhf", prompt=p.prompt, chosen=p.chosen, rejected=p.rejected))
        != {"chosen": original["chosen"], "rejected": original["rejected"]}
    ]
    assert mismatched == []
    # Saying nothing was the preferred harmless reply 3 times; after the
    # 12-char marker "\n\nAssistant:" such a response is the lone space " ".
    empty = [
        (p.line, field, response)
        for p in parsed
        for field, response in (("chosen", p.chosen), ("rejected", p.rejected))
        if not response.strip()
    ]
    assert empty == [(87, "chosen", " "), (517, "chosen", " "), (926, "chosen", " ")]


def test_decoded_size_is_counted_and_a_runaway_line_is_refused():
    import gzip as gz

    from api.formats import FormatError, JsonlImportParser

    body = gz.compress(b"x" * 10_000)
    parser = JsonlImportParser("trl", max_line_bytes=5_000)
    with pytest.raises(FormatError, match="longer than 5000 bytes"):
        parser.feed(body)
    ok = JsonlImportParser("trl")
    ok.feed(gz.compress(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n' * 3))
    assert ok.decoded_bytes == 48 * 3


def test_a_line_nested_too_deep_is_skipped_with_its_reason():
    body = jsonl(trl()) + b"[" * 10_000 + b"]" * 10_000 + b"\n" + jsonl(trl(prompt="Q3"))
    assert parse_body("trl", body, chunk=4096) == [
        ok(1, "Can you help me?", "Sure.", "No."),
        bad(2, "invalid JSON: nested too deeply"),
        ok(3, "Q3", "Sure.", "No."),
    ]


@pytest.mark.parametrize("fmt, record, field", [
    ("trl", trl(chosen="x" * 101), "chosen"),
    ("trl", trl(prompt="p" * 101), "prompt"),
    ("hh-rlhf", hh(rejected=" " + "y" * 100), "rejected"),
])
def test_a_text_over_the_limit_is_skipped_with_its_reason(fmt, record, field):
    parser = JsonlImportParser(fmt, max_text_chars=100)  # PROMPT is 71 characters
    [line] = parser.feed(jsonl(record)) + parser.close()
    assert line.error == f"{field} is 101 characters long, over the limit of 100"


def test_a_gzip_bomb_is_refused_in_bounded_memory():
    import tracemalloc

    from api.formats import DecodedTooLarge

    bomb = gzip.compress(b"\n" * (64 * 1024 * 1024), compresslevel=9)  # ~65 KB of gzip
    parser = JsonlImportParser("trl", max_decoded_bytes=4 * 1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(DecodedTooLarge, match="over the limit of 4194304 bytes"):
            for start in range(0, len(bomb), 65_536):
                parser.feed(bomb[start : start + 65_536])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 * 1024 * 1024  # loose: the whole bomb would be 64 MiB
    assert parser.decoded_bytes <= 4 * 1024 * 1024 + 1024 * 1024


def test_a_large_gzip_chunk_is_inflated_in_pieces_and_loses_no_line():
    records = [trl(prompt=f"Q{i}", chosen="a" * 500) for i in range(5_000)]
    body = gzip.compress(jsonl(*records))
    parsed = parse_body("trl", body, chunk=len(body))
    assert [p.prompt for p in parsed] == [f"Q{i}" for i in range(5_000)]
    assert all(p.error is None for p in parsed)
