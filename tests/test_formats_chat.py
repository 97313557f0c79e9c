"""The chat-message rules and the HH-RLHF text (``formats.chat``): what every layer accepts as a message list."""

from __future__ import annotations

import pytest

from formats.chat import hh_messages, hh_text, message_problems

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "How do I bake bread?"},
]
"""a prompt with every role: a system message first, then turns ending with the user's"""
CHAT_TEXT = "Be brief.\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: How do I bake bread?\n\nAssistant:"
"""its HH-RLHF text"""


def test_hh_text_renders_the_turns_and_reads_back_to_the_same_messages():
    assert hh_text(CHAT) == CHAT_TEXT
    assert hh_messages(CHAT_TEXT) == CHAT
    assert hh_text([{"role": "user", "content": "Hi"}], generation_prompt=False) == "\n\nHuman: Hi"
    assert hh_messages("no turns at all") == [{"role": "user", "content": "no turns at all"}]


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("Hi", "messages must be a list of {role, content} messages, got str"),
        ([], "messages is empty"),
        (["Hi"], "messages[0] must be an object with role and content, got str"),
        ([{"role": "bot", "content": "Hi"}], "messages[0].role 'bot' is not one of system, user, assistant"),
        ([{"role": "user", "content": 3}], "messages[0].content must be a string, got int"),
        ([{"role": "user", "content": "Hi", "name": "x"}], "messages[0] has keys other than role and content: name"),
        ([{"role": "user", "content": "a\x00b"}], "messages[0].content contains a NUL character"),
        ([{"role": "user", "content": "\ud800"}], "messages[0].content is not valid Unicode: lone surrogate at character 0"),
        (CHAT[1:2] + CHAT[:1] + CHAT[3:], "messages[1] is a system message; only the first message may be one"),
        (CHAT[:3], "messages[2] is an assistant message; a prompt ends with a user turn"),
    ],
)
def test_message_problems_name_the_message_and_the_field(messages, problem):
    assert message_problems(messages) == [problem]


def test_a_valid_prompt_has_no_problems_and_a_conversation_may_end_with_the_assistant():
    assert message_problems(CHAT) == []
    assert message_problems(CHAT[:3], prompt=False) == []
