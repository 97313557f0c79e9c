"""Preference-data line formats for import and export: HH-RLHF and TRL (standard and conversational).

All are JSON Lines, one preference pair a line:

- ``hh-rlhf`` (Anthropic's HH-RLHF, Bai et al. 2022):
  ``{"chosen": str, "rejected": str}``, each a whole dialogue with turns
  ``"\\n\\nHuman: "`` and ``"\\n\\nAssistant: "``; the two share every turn but
  the last Assistant reply.
- ``trl`` (TRL's "standard" preference format with an explicit prompt):
  ``{"prompt": str, "chosen": str, "rejected": str}``.
- ``trl-conversational`` (TRL's "conversational" preference format): lists
  of ``{"role", "content"}`` messages, with an explicit prompt,
  ``{"prompt": [messages], "chosen": [{"role": "assistant", "content": str}],
  "rejected": [...]}``, or an implicit one, ``{"chosen": [messages],
  "rejected": [messages]}``: two whole conversations that share every
  message but the last, an assistant turn.

A conversational pair is stored as any other: its prompt as the HH-RLHF text
of its messages (what labelers read), the responses as the assistant
messages' contents, and the messages in the comparison's metadata
(``messages``), where snapshots and the chat-template encoding of the
workers find them (the rules and the text are ``formats.chat``'s). A
conversational export writes a comparison's messages, or, for a plain-text
comparison, the messages read back out of its HH-RLHF prompt.

A line of any format may carry ``"strength"``: how much better the chosen
response is, a number above 0 and up to 10 on the labeling scale (the rule of
``store.feedback.strength_problem``; 1 slightly, 2 better, 3 much better by
default). It is read when present and written when a comparison has one.

Everything here is pure: no web framework, no database. ``JsonlImportParser``
reads a streamed (optionally gzipped) body chunk by chunk and never holds more
than one partial line of it.
"""

from __future__ import annotations

import codecs
import json
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from formats.chat import Messages, as_messages, hh_messages, hh_text, message_problems
from store.feedback import strength_problem

FORMATS = ("hh-rlhf", "trl", "trl-conversational")
"""The line formats known to import and export (see the module docstring)."""

FormatName = Literal["hh-rlhf", "trl", "trl-conversational"]
"""``FORMATS`` as a type, for the routes' ``format`` parameter"""

ASSISTANT_MARKER = "\n\nAssistant:"
"""Where an HH-RLHF prompt ends; the response keeps the space that follows it."""

GZIP_MAGIC = b"\x1f\x8b"
"""The first two bytes of every gzip stream (RFC 1952), used to auto-detect gzip."""
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib with a gzip header and trailer
INFLATE_PIECE_BYTES = 64 * 1024
"""most decoded bytes one inflate step makes: a gzip bomb is refused after at most this much past the limit"""


class FormatError(ValueError):
    """A line could not be parsed; the message is the reason, for a human."""


class DecodedTooLarge(Exception):
    """The decoded (after gzip) body went past the parser's ``max_decoded_bytes``."""


@dataclass(frozen=True, slots=True)
class ParsedLine:
    """One non-blank line of an import body: a preference pair or the reason it is not one."""

    line: int
    """1-based line number in the decoded text (blank lines count)."""
    prompt: str | None
    """The prompt; None when ``error`` is set."""
    chosen: str | None
    """The preferred response, without the prompt; None when ``error`` is set."""
    rejected: str | None
    """The other response, without the prompt; None when ``error`` is set."""
    error: str | None
    """Why the line was rejected; None means the line is ok."""
    strength: float | None = None
    """How much better ``chosen`` is (the line's optional ``"strength"``); None when absent or ``error`` is set."""
    messages: Messages | None = None
    """The prompt's messages of a ``trl-conversational`` line (``prompt`` is their HH-RLHF text); else None."""


@dataclass(frozen=True, slots=True)
class PreferenceRecord:
    """One line read as a preference pair: the texts as stored, and the prompt's messages when it had them."""

    prompt: str
    chosen: str
    rejected: str
    messages: Messages | None = None


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of: {', '.join(FORMATS)}")


def split_hh_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split an HH-RLHF pair into ``(prompt, chosen_response, rejected_response)``.

    The prompt is everything up to and including the last ``"\\n\\nAssistant:"``,
    so ``prompt + chosen_response == chosen`` and
    ``prompt + rejected_response == rejected`` exactly. An empty response is
    valid. Raises ``FormatError`` when a text has no Assistant turn, when the
    two differ before their last Assistant turn, or when the responses are
    identical.
    """
    cut_chosen = chosen.rfind(ASSISTANT_MARKER)
    if cut_chosen < 0:
        raise FormatError("chosen has no Assistant turn ('\\n\\nAssistant:')")
    cut_rejected = rejected.rfind(ASSISTANT_MARKER)
    if cut_rejected < 0:
        raise FormatError("rejected has no Assistant turn ('\\n\\nAssistant:')")
    prompt = chosen[: cut_chosen + len(ASSISTANT_MARKER)]
    other_prompt = rejected[: cut_rejected + len(ASSISTANT_MARKER)]
    if prompt != other_prompt:
        first = next(
            (i for i, (a, b) in enumerate(zip(prompt, other_prompt, strict=False)) if a != b),
            min(len(prompt), len(other_prompt)),
        )
        raise FormatError(
            f"chosen and rejected differ before their last Assistant turn (first difference at character {first})"
        )
    chosen_response = chosen[len(prompt) :]
    rejected_response = rejected[len(prompt) :]
    if chosen_response == rejected_response:
        raise FormatError("chosen and rejected responses are identical")
    return prompt, chosen_response, rejected_response


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _string_field(obj: dict, name: str) -> str:
    if name not in obj:
        raise FormatError(f"field {name!r} is missing")
    value = obj[name]
    if not isinstance(value, str):
        raise FormatError(f"field {name!r} must be a string, got {_type_name(value)}")
    try:
        # json.loads lets "\ud800" through; it cannot be written back as UTF-8 or stored.
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FormatError(f"field {name!r} is not valid Unicode: lone surrogate at character {exc.start}") from None
    return value


def parse_record(fmt: str, obj: object, *, max_text_chars: int | None = None) -> tuple[str, str, str]:
    """Read one decoded JSON line as ``(prompt, chosen_response, rejected_response)`` (``parse_preference``
    without the messages)."""
    record = parse_preference(fmt, obj, max_text_chars=max_text_chars)
    return record.prompt, record.chosen, record.rejected


def parse_preference(fmt: str, obj: object, *, max_text_chars: int | None = None) -> PreferenceRecord:
    """Read one decoded JSON line as a ``PreferenceRecord``.

    ``hh-rlhf`` lines are ``{"chosen": str, "rejected": str}`` (split with
    ``split_hh_dialogue``); ``trl`` lines are
    ``{"prompt": str, "chosen": str, "rejected": str}``; ``trl-conversational``
    lines hold message lists (``parse_conversation``). Other fields are
    ignored here (``parse_strength`` reads ``"strength"``). Raises
    ``FormatError`` naming the missing or wrong field, or the text longer than
    ``max_text_chars`` (prompt and responses as they would be stored), and
    ``ValueError`` for an unknown ``fmt``.
    """
    record = _record(fmt, obj)
    if max_text_chars is not None:
        for name in ("prompt", "chosen", "rejected"):
            value = getattr(record, name)
            if len(value) > max_text_chars:
                raise FormatError(f"{name} is {len(value)} characters long, over the limit of {max_text_chars}")
    return record


def parse_strength(obj: dict) -> float | None:
    """A decoded line's optional ``"strength"`` (absent or null: None).

    A preference pair's chosen response is the one stored as A, so the rule is
    ``strength_problem`` for choice ``'a'``: above 0 (0 would be a tie) and at
    most ``MAX_STRENGTH``. Raises ``FormatError`` naming the field otherwise.
    """
    value = obj.get("strength")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(f"field 'strength' must be a number, got {_type_name(value)}")
    try:
        strength = float(value)
    except OverflowError:  # an integer too large for a float
        strength = math.inf
    problem = strength_problem("a", strength)
    if problem:
        raise FormatError(f"field 'strength': {problem}")
    return strength


def _record(fmt: str, obj: object) -> PreferenceRecord:
    _check_format(fmt)
    if not isinstance(obj, dict):
        raise FormatError("line is not a JSON object")
    if fmt == "hh-rlhf":
        return PreferenceRecord(*split_hh_dialogue(_string_field(obj, "chosen"), _string_field(obj, "rejected")))
    if fmt == "trl-conversational":
        messages, chosen, rejected = parse_conversation(obj)
        return PreferenceRecord(hh_text(messages), chosen, rejected, messages)
    if any(isinstance(obj.get(name), list) for name in ("prompt", "chosen", "rejected")):
        raise FormatError(
            "TRL's conversational format (lists of {role, content} messages) is format 'trl-conversational';"
            " with format 'trl' use the standard form with string 'prompt', 'chosen' and 'rejected'"
        )
    prompt = _string_field(obj, "prompt")
    chosen = _string_field(obj, "chosen")
    rejected = _string_field(obj, "rejected")
    if not prompt.strip():
        raise FormatError("field 'prompt' is empty")
    if chosen == rejected:
        raise FormatError("chosen and rejected responses are identical")
    return PreferenceRecord(prompt, chosen, rejected)


def parse_conversation(obj: dict[str, Any]) -> tuple[Messages, str, str]:
    """``(prompt messages, chosen response, rejected response)`` of a ``trl-conversational`` line.

    With ``"prompt"`` (a message list ending in a user turn), ``chosen`` and
    ``rejected`` are one assistant message each; without it they are whole
    conversations that share every message but their last, an assistant
    message, and the shared messages are the prompt. Raises ``FormatError``
    naming the field and the message at fault.
    """
    for name in ("chosen", "rejected"):
        if name not in obj:
            raise FormatError(f"field {name!r} is missing")
        if not isinstance(obj[name], list):
            raise FormatError(
                f"field {name!r} must be a list of {{role, content}} messages, got {_type_name(obj[name])}"
                " (the standard form with strings is format 'trl')"
            )
        _check_messages(obj[name], field=name, prompt=False)
    chosen, rejected = obj["chosen"], obj["rejected"]
    if obj.get("prompt") is not None:
        _check_messages(obj["prompt"], field="prompt", prompt=True)
        prompt = obj["prompt"]
        for name, messages in (("chosen", chosen), ("rejected", rejected)):
            if len(messages) != 1:
                raise FormatError(f"field {name!r} must be one assistant message after an explicit prompt, "
                                  f"got {len(messages)} messages")
    else:
        prompt = chosen[:-1]
        if chosen[:-1] != rejected[:-1]:
            first = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
                         min(len(chosen), len(rejected)) - 1)
            raise FormatError("chosen and rejected differ before their last assistant turn "
                              f"(first difference at message {first})")
        if not prompt:
            raise FormatError("field 'chosen' has no prompt: without 'prompt' it is the whole conversation, the prompt's "
                              "turns and then the assistant's response")
        _check_messages(prompt, field="chosen", prompt=True)
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise FormatError(f"{name}[{len(messages) - 1}] is not an assistant message "
                              f"(role {messages[-1]['role']!r}); the response must be one")
    chosen_response, rejected_response = chosen[-1]["content"], rejected[-1]["content"]
    if chosen_response == rejected_response:
        raise FormatError("chosen and rejected responses are identical")
    return as_messages(prompt), chosen_response, rejected_response


def _check_messages(value: object, *, field: str, prompt: bool) -> None:
    problems = message_problems(value, field=field, prompt=prompt)
    if problems:
        raise FormatError("; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else ""))


class JsonlImportParser:
    """Parse a streamed JSON Lines body, plain or gzipped, chunk by chunk.

    ``gzip=None`` detects gzip by its magic bytes (1f 8b) at the start of the
    stream. Blank lines are skipped (but counted in line numbers). A line that
    is not UTF-8, not JSON (nested too deeply included), not a valid record, or
    that holds a text over ``max_text_chars`` becomes a ``ParsedLine`` with
    ``error`` set; only a corrupt or truncated gzip stream raises
    ``FormatError``, since nothing after the damage can be read.

    Memory stays bounded whatever the body: gzip is inflated at most
    ``INFLATE_PIECE_BYTES`` at a time, a line over ``max_line_bytes`` raises
    ``FormatError``, and a decoded body over ``max_decoded_bytes`` raises
    ``DecodedTooLarge`` as soon as it passes the limit (a gzip bomb is never
    inflated whole).
    """

    def __init__(
        self,
        fmt: str,
        *,
        gzip: bool | None = None,
        max_line_bytes: int = 8 * 1024 * 1024,
        max_decoded_bytes: int | None = None,
        max_text_chars: int | None = None,
    ) -> None:
        _check_format(fmt)
        self.fmt = fmt
        self.max_line_bytes = max_line_bytes
        self.max_decoded_bytes = max_decoded_bytes
        self.max_text_chars = max_text_chars
        self.decoded_bytes = 0
        """bytes of decoded (after gzip) body seen so far"""
        self._gzip: bool | None = None
        self._inflater = None  # a zlib decompressobj once the body is known to be gzip
        self._gzip_started = False
        self._head = b""  # the first bytes, held until there are enough to detect gzip
        self._partial = bytearray()  # decoded bytes after the last newline
        self._line = 0
        self._closed = False
        if gzip is not None:
            self._start(gzip=gzip)

    def feed(self, chunk: bytes) -> list[ParsedLine]:
        """Take the next chunk of the body; return the lines it completed."""
        return [parsed for lines in self.feed_pieces(chunk) for parsed in lines]

    def feed_pieces(self, chunk: bytes) -> Iterator[list[ParsedLine]]:
        """Like ``feed``, but yields the lines piece by decoded piece, so a caller can
        write them before the rest of the chunk is inflated."""
        if self._closed:
            raise ValueError("feed() after close()")
        if self._gzip is None:
            self._head += chunk
            if len(self._head) < len(GZIP_MAGIC):
                return
            chunk, self._head = self._head, b""
            self._start(gzip=chunk.startswith(GZIP_MAGIC))
        for piece in self._inflate(chunk) if self._gzip else (chunk,):
            self._count(len(piece))
            yield self._split(piece)

    def close(self) -> list[ParsedLine]:
        """End the body: return its last line if it had no newline.

        Raises ``FormatError`` if a gzip stream is empty or truncated.
        """
        if self._closed:
            return []
        self._closed = True
        if self._gzip is None:
            self._start(gzip=False)  # fewer than two bytes cannot be gzip
            self._count(len(self._head))
            self._partial += self._head
        if self._gzip and not self._gzip_started:
            raise FormatError("gzip stream is empty")
        if self._gzip and not self._inflater.eof:
            raise FormatError("gzip stream is truncated")
        raw, self._partial = self._partial, bytearray()
        parsed = self._parse_line(raw)
        return [] if parsed is None else [parsed]

    def _start(self, *, gzip: bool) -> None:
        self._gzip = gzip
        if gzip:
            self._inflater = zlib.decompressobj(wbits=_GZIP_WBITS)

    def _count(self, size: int) -> None:
        self.decoded_bytes += size
        if self.max_decoded_bytes is not None and self.decoded_bytes > self.max_decoded_bytes:
            raise DecodedTooLarge(f"import body is over the limit of {self.max_decoded_bytes} bytes (after gzip decoding)")

    def _inflate(self, data: bytes) -> Iterator[bytes]:
        more = False  # the last piece filled its bound: zlib may hold more output without more input
        while data or more:
            if data:
                self._gzip_started = True
            if self._inflater.eof:  # concatenated gzip members (`cat a.gz b.gz`, pigz) form one stream
                self._inflater = zlib.decompressobj(wbits=_GZIP_WBITS)
            try:
                piece = self._inflater.decompress(data, INFLATE_PIECE_BYTES)
            except zlib.error as exc:
                raise FormatError(f"gzip stream is corrupt: {exc}") from None
            data = self._inflater.unused_data if self._inflater.eof else self._inflater.unconsumed_tail
            more = len(piece) == INFLATE_PIECE_BYTES and not self._inflater.eof
            if piece:
                yield piece

    def _split(self, piece: bytes) -> list[ParsedLine]:
        self._partial += piece
        if b"\n" not in piece:
            if len(self._partial) > self.max_line_bytes:
                raise FormatError(f"line {self._line + 1} is longer than {self.max_line_bytes} bytes")
            return []
        if not self._partial.strip():  # only blank lines: count them without a Python object each
            self._line += self._partial.count(b"\n")
            del self._partial[: self._partial.rfind(b"\n") + 1]
            return []
        *lines, tail = self._partial.split(b"\n")
        self._partial = tail
        if len(tail) > self.max_line_bytes:
            raise FormatError(f"a line is longer than {self.max_line_bytes} bytes")
        return [parsed for raw in lines if (parsed := self._parse_line(raw)) is not None]

    def _parse_line(self, raw: bytearray) -> ParsedLine | None:
        self._line += 1
        if self._line == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        if not raw.strip():
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return self._error(f"invalid UTF-8 at byte {exc.start}: {exc.reason}")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            return self._error(f"invalid JSON: {exc.msg} at column {exc.colno}")
        except RecursionError:  # the decoder recurses once per level of arrays and objects
            return self._error("invalid JSON: nested too deeply")
        try:
            record = parse_preference(self.fmt, obj, max_text_chars=self.max_text_chars)
            strength = parse_strength(obj)
        except FormatError as exc:
            return self._error(str(exc))
        return ParsedLine(self._line, record.prompt, record.chosen, record.rejected, None, strength, record.messages)

    def _error(self, reason: str) -> ParsedLine:
        return ParsedLine(self._line, None, None, None, reason)


def export_record(
    fmt: str,
    *,
    prompt: str,
    chosen: str,
    rejected: str,
    strength: float | None = None,
    messages: Sequence[dict[str, str]] | None = None,
) -> bytes:
    """One JSON line (UTF-8, ending in a newline) for a preference pair.

    ``hh-rlhf`` writes whole dialogues (``prompt + chosen``,
    ``prompt + rejected``); ``trl`` writes the three fields as they are;
    ``trl-conversational`` writes the prompt's ``messages`` (read back out of
    the HH-RLHF ``prompt`` when None: ``formats.chat.hh_messages``) and
    each response as one assistant message. All add ``"strength"`` when the
    pair has one.
    """
    _check_format(fmt)
    record: dict[str, Any]
    if fmt == "hh-rlhf":
        record = {"chosen": prompt + chosen, "rejected": prompt + rejected}
    elif fmt == "trl-conversational":
        record = {
            "prompt": [dict(m) for m in messages] if messages is not None else hh_messages(prompt),
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    else:
        record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if strength is not None:
        record["strength"] = strength
    return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
