"""The server's per-choice assembly of streamed text into reasoning_content, content and tool_calls."""

from __future__ import annotations

import json

import pytest

from qwax.serve.app import Choice
from qwax.serve.scheduler import Delta, TextTracker

COMPLETION = ("<think>\nlet me check the weather\n</think>\n\nI'll look it up.\n<tool_call>\n<function=get_weather>\n"
              "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]


@pytest.mark.parametrize("step", [1, 3, 7, len(COMPLETION)])
def test_crafted_completion_fills_reasoning_content_and_tool_calls(step):
    choice = Choice(0, "<|im_start|>assistant\n", TOOLS)  # the prompt did not open the think block
    deltas = []
    pieces = [COMPLETION[i:i + step] for i in range(0, len(COMPLETION), step)]
    for piece in pieces[:-1]:
        deltas.append(choice.feed(piece))
    deltas.append(choice.finish(Delta(0, pieces[-1], "stop", 40)))
    assert choice.reasoning_text == "let me check the weather"
    assert choice.content == "I'll look it up."
    assert choice.finish_reason == "tool_calls"
    [call] = choice.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris", "days": 3}
    assert "".join(d.get("reasoning_content", "") for d in deltas) == choice.reasoning_text
    assert "".join(d.get("content", "") for d in deltas) == choice.content
    [streamed] = [c for d in deltas for c in d.get("tool_calls", [])]
    assert streamed == {"index": 0, **call.to_openai()}


def test_without_tools_the_call_stays_content():
    choice = Choice(0, "<|im_start|>assistant\n<think>\n", None)  # thinking on: the prompt opened the block
    choice.finish(Delta(0, COMPLETION.replace("<think>\n", ""), "length", 40))
    assert choice.reasoning_text == "let me check the weather"
    assert choice.content.startswith("I'll look it up.\n<tool_call>")
    assert choice.finish_reason == "length" and not choice.tool_calls


def test_text_tracker_holds_back_a_possible_stop_string_and_partial_characters():
    pieces = {1: "Hello", 2: " wor", 3: "ld", 4: "\ufffd", 5: "é!"}

    def decode(ids):
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffdé", "é")  # token 4 is the first byte of a character token 5 completes

    t = TextTracker(decode, ("world",))
    assert t.add(1) == ("Hello", False)
    assert t.add(2) == (" ", False)  # "wor" could begin "world": held back
    assert t.add(3) == ("", True)  # the stop string and what follows it are never released
    t = TextTracker(decode, ("xyz",))
    assert "".join(t.add(i)[0] for i in (1, 2, 3, 4)) == "Hello world"
    assert t.add(5) == ("é!", False)
