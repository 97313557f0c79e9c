"""Chat-format prompts: message lists, their HH-RLHF text, and the one rule for encoding a prompt.

A prompt may come as a list of messages, the way chat models and TRL's
conversational datasets write a conversation::

    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "How do I bake bread?"}]

The rules (``message_problems``): a non-empty list of objects with exactly
the keys ``role`` and ``content``; ``role`` one of ``system``, ``user``,
``assistant``; ``content`` a string with no NUL character and no lone
surrogate; a system message only as the first message; and the last message
a user turn, since the response being judged or sampled is the assistant's
next turn.

Every prompt also has a text, the HH-RLHF rendering of its messages
(``hh_text``): the system message's content, then ``"\\n\\nHuman: "`` and
``"\\n\\nAssistant: "`` before each turn's content, and a closing
``"\\n\\nAssistant:"``. The text is what labelers read, what the store keeps
as a comparison's prompt, and what a model without a chat template is
trained on; the messages travel beside it (a prompt-set line's or a
snapshot record's ``messages``, a task's or a comparison's
``metadata.messages``). A response is the assistant's content as it is.

The encoding rule (``prompt_token_ids``): a prompt with messages, for a
tokenizer with a chat template, is
``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``
(the template writes its own BOS, as Hugging Face templates do); any other
prompt is the tokenizer's leading special tokens plus its text encoded
without them, exactly as before chat prompts existed. Response tokens follow
either way. The sample step, the steps that encode prompt sets
(``workers.common.rollout.encode_prompts``) and the PM's token layout
(``TokenLayout.prompts``) all use this one function, so a policy is
sampled, trained and scored on the same prompt tokens.

Only the standard library is imported (the tokenizer is passed in): the
store and the API check what they accept and export by these rules, and the
workers encode by them, so a message list means the same wherever it enters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

ROLES = ("system", "user", "assistant")
"""the roles a message may have"""

Messages = tuple[dict[str, str], ...]
"""a validated message list: each ``{"role", "content"}``"""

HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant: "
"""how an HH-RLHF turn starts (the prompt's last, empty one is ``"\\n\\nAssistant:"``, without the space)"""

TURN_MARK = re.compile(r"\n\n(Human|Assistant): ?")
"""where an HH-RLHF turn begins, for reading messages back out of a text"""


# -- the rules -----------------------------------------------------------------------


def message_problems(value: Any, *, field: str = "messages", prompt: bool = True) -> list[str]:
    """What is wrong with ``value`` as a message list (empty: nothing), each problem naming
    ``field`` and the message's index. ``prompt``: the last message must be a user turn."""
    if not isinstance(value, list):
        return [f"{field} must be a list of {{role, content}} messages, got {_type_name(value)}"]
    if not value:
        return [f"{field} is empty"]
    problems = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            problems.append(f"{where} must be an object with role and content, got {_type_name(message)}")
            continue
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            problems.append(f"{where} has keys other than role and content: {', '.join(map(str, extra))}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            problems.append(f"{where}.role {role!r} is not one of {', '.join(ROLES)}")
        elif role == "system" and i > 0:
            problems.append(f"{where} is a system message; only the first message may be one")
        if not isinstance(content, str):
            problems.append(f"{where}.content must be a string, got {_type_name(content)}")
        else:
            problems.extend(f"{where}.content {p}" for p in _text_problems(content))
    last = value[-1]
    if prompt and isinstance(last, dict) and last.get("role") in ROLES and last.get("role") != "user":
        problems.append(f"{field}[{len(value) - 1}] is {_a(last['role'])} message; a prompt ends with a user turn")
    return problems


def as_messages(value: Sequence[dict[str, Any]]) -> Messages:
    """A message list that ``message_problems`` passed, as immutable-by-convention plain dicts."""
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _text_problems(text: str) -> list[str]:
    problems = []
    if "\x00" in text:
        problems.append("contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        problems.append(f"is not valid Unicode: lone surrogate at character {exc.start}")
    return problems


def _a(role: str) -> str:
    return f"an {role}" if role[0] in "aeiou" else f"a {role}"


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


# -- text ------------------------------------------------------------------------------


def hh_text(messages: Sequence[dict[str, str]], *, generation_prompt: bool = True) -> str:
    """The HH-RLHF text of a message list (see the module docstring); with ``generation_prompt``
    it ends in ``"\\n\\nAssistant:"``, where the response continues."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"])
        else:
            parts.append((HUMAN if m["role"] == "user" else ASSISTANT) + m["content"])
    if generation_prompt:
        parts.append(ASSISTANT.rstrip(" "))
    return "".join(parts)


def hh_messages(text: str) -> list[dict[str, str]]:
    """The messages of an HH-RLHF prompt text, the inverse of ``hh_text`` for the texts it writes.

    Text before the first turn is the system message; ``Human`` turns are
    user messages and ``Assistant`` turns assistant messages; the empty turn
    the response continues is dropped. A text without turns is one user
    message.
    """
    marks = list(TURN_MARK.finditer(text))
    if not marks:
        return [{"role": "user", "content": text}]
    out = []
    if marks[0].start() > 0:
        out.append({"role": "system", "content": text[: marks[0].start()]})
    ends = [m.start() for m in marks[1:]] + [len(text)]
    for mark, end in zip(marks, ends):
        out.append({"role": "user" if mark.group(1) == "Human" else "assistant", "content": text[mark.end() : end]})
    if len(out) > 1 and out[-1]["role"] == "assistant" and not out[-1]["content"]:
        out.pop()
    return out


def prompt_text(record: dict[str, Any]) -> str:
    """A prompt-set line's text: its ``prompt``, or the HH text of its ``messages`` when it has no prompt."""
    return record["prompt"] if "prompt" in record else hh_text(record["messages"])


# -- tokens ----------------------------------------------------------------------------


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS for Llama-style tokenizers, none for GPT-2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def uses_chat_template(tokenizer, messages: Sequence[dict[str, str]] | None) -> bool:
    """Whether a prompt is encoded with the tokenizer's chat template: it has messages and the tokenizer a template."""
    return bool(messages) and bool(getattr(tokenizer, "chat_template", None))


def prompt_token_ids(
    tokenizer, texts: Sequence[str], messages: Sequence[Sequence[dict[str, str]] | None] | None = None
) -> list[list[int]]:
    """Token ids of each prompt, leading special tokens included: the chat template for a prompt with
    messages when the tokenizer has one (``uses_chat_template``), else the special prefix plus the text.

    Texts are encoded in one batched call, as they always were; ``messages``
    (None, or one entry per text, None for a prompt without) only changes the
    prompts that have them.
    """
    messages = list(messages) if messages is not None else [None] * len(texts)
    if len(messages) != len(texts):
        raise ValueError(f"{len(texts)} prompt texts but {len(messages)} message lists")
    chat = [uses_chat_template(tokenizer, m) for m in messages]
    plain = [t for t, c in zip(texts, chat) if not c]
    encoded = iter(tokenizer(plain, add_special_tokens=False)["input_ids"] if plain else [])
    prefix = special_prefix(tokenizer)
    out = []
    for m, c in zip(messages, chat):
        if c:
            ids = tokenizer.apply_chat_template(
                [dict(x) for x in m], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            out.append(list(ids))
        else:
            out.append(prefix + list(next(encoded)))
    return out

