"""Parsing generated text: the think block (qwax.inference.reasoning) and qwen3_coder tool calls
(qwax.inference.tool_calls), whole and streamed. Every whole-text case is also streamed in every two-part split,
one character at a time and in seeded random chunk sizes, and must give exactly the whole-text result."""

from __future__ import annotations

import json
import random
import re
from typing import Callable, Iterator

import pytest

from qwax.inference.reasoning import ReasoningStream, split_reasoning, think_open
from qwax.inference.tool_calls import ToolCall, ToolCallStream, convert_value, parse_tool_calls

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The forecast for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}, "zip": {"type": "string"}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "configure", "description": "Every argument type.",
        "parameters": {"type": "object", "properties": {
            "count": {"type": "integer"}, "ratio": {"type": "number"}, "scale": {"type": "number"},
            "verbose": {"type": "boolean"}, "options": {"type": "object"},
            "tags": {"type": "array", "items": {"type": "string"}}, "label": {"type": "string"},
            "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]}, "mode": {"type": ["integer", "string"]},
            "level": {"enum": [1, 2, 3]}, "nothing": {"type": "null"}}}}},
]


def call(name: str, **params: str) -> str:
    """A call in the qwen3_coder format, as the model writes it."""
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


WEATHER = call("get_weather", city="Paris", days="3")


def counter_ids() -> Callable[[], str]:
    """A deterministic id source (call_ + 24 digits), fresh for each parse so streams and whole parses agree."""
    n = iter(range(10 ** 6))
    return lambda: f"call_{next(n):024d}"


def chunkings(text: str) -> Iterator[list[str]]:
    """Ways to deliver `text`: whole, every split in two, one character at a time, seeded random chunk sizes."""
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)
    for seed in range(8):
        rng, pos, parts = random.Random(seed), 0, []
        while pos < len(text):
            size = rng.randint(1, 9)
            parts.append(text[pos:pos + size])
            pos += size
        yield parts


def stream_reasoning(chunks: list[str], started: bool) -> tuple[str, str]:
    stream, reasoning, content = ReasoningStream(started), [], []
    for chunk in chunks:
        r, c = stream.feed(chunk)
        reasoning.append(r)
        content.append(c)
    r, c = stream.finish()
    return "".join(reasoning) + r, "".join(content) + c


def stream_tools(chunks: list[str], tools) -> tuple[str, list[ToolCall]]:
    stream, content, calls = ToolCallStream(tools, id_factory=counter_ids()), [], []
    for chunk in chunks:
        c, done = stream.feed(chunk)
        content.append(c)
        calls += done
    c, done = stream.finish()
    return "".join(content) + c, calls + done


def assert_reasoning_streams(text: str, started: bool) -> None:
    reasoning, content = split_reasoning(text, started_in_reasoning=started)
    for chunks in chunkings(text):
        assert stream_reasoning(chunks, started) == (reasoning or "", content), chunks


def assert_tools_stream(text: str, tools) -> None:
    whole = parse_tool_calls(text, tools, id_factory=counter_ids())
    for chunks in chunkings(text):
        assert stream_tools(chunks, tools) == whole, chunks


# --- reasoning ---------------------------------------------------------------------------------------------------

REASONING_CASES = [
    # (completion, started_in_reasoning, reasoning, content)
    ("<think>\nabc\n</think>\n\nHello", False, "abc", "Hello"),
    ("abc\n</think>\n\nHello", True, "abc", "Hello"),  # the prompt opened the block
    ("\n\nabc\n\n\nxyz\n\n</think>\n\n\nHi\n\nthere\n", True, "abc\n\n\nxyz", "Hi\n\nthere\n"),
    ("<think>\nstill thinking\n", False, "still thinking", ""),  # ran out of tokens inside the block
    ("thinking </th", True, "thinking </th", ""),  # unterminated, ending in a partial marker
    ("still\n\n", True, "still", ""),
    ("Hello world", False, None, "Hello world"),  # no block (thinking off: the prompt closed it)
    ("  \nHi <think> x", False, None, "  \nHi <think> x"),  # "<think>" not at the start: plain text
    ("a </think> b", False, None, "a </think> b"),
    ("<thin", False, None, "<thin"),
    ("", False, None, ""),
    ("", True, "", ""),
    ("<think>\n\n</think>\n\nA", False, "", "A"),  # an empty block
    ("\n<think>\nr\n</think>\nc", False, "r", "c"),  # whitespace before "<think>"
    ("r</think>c</think>d", True, "r", "c</think>d"),  # only the first "</think>" ends the block
    ("a </thin k> </ b\n</think>x", True, "a </thin k> </ b", "x"),
    ("x <think> y</think>z", True, "x <think> y", "z"),
    ("r\n</think>\n\n", True, "r", ""),
    ("<think>r</think>\n \nc", False, "r", " \nc"),  # only newlines are stripped from the content's start
]


@pytest.mark.parametrize("text,started,reasoning,content", REASONING_CASES)
def test_split_reasoning(text, started, reasoning, content):
    assert split_reasoning(text, started_in_reasoning=started) == (reasoning, content)
    assert_reasoning_streams(text, started)


def test_think_open():
    assert think_open("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert not think_open("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not think_open("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # An earlier turn's closed block does not count; the last "<think>" does.
    assert think_open("<think>\nold\n</think>\n\nanswer<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_reasoning_stream_holds_back_only_undecided_text():
    s = ReasoningStream(True)
    assert s.feed("abc</th") == ("abc", "")
    assert s.in_reasoning
    assert s.feed("ink>\n\nhi") == ("", "hi")
    assert s.feed(" <think></think>") == ("", " <think></think>")  # content passes straight through
    assert s.finish() == ("", "")

    s = ReasoningStream(True)
    assert s.feed("\nabc\n") == ("abc", "")  # the trailing newline waits: it is stripped if the block ends
    assert s.feed("\ndef") == ("\n\ndef", "")
    assert s.feed("</") == ("", "")
    assert s.feed("b") == ("</b", "")

    s = ReasoningStream(False)
    assert s.feed("\n<th") == ("", "")  # could still open a block
    assert s.feed("ink>") == ("", "")
    assert s.feed("\nr") == ("r", "")

    s = ReasoningStream(False)
    assert s.feed("Hello") == ("", "Hello")  # no block: released at once
    assert s.feed("<think>") == ("", "<think>")
    assert s.finish() == ("", "")
    with pytest.raises(RuntimeError):
        s.feed("x")


def test_reasoning_streams_random_texts():
    """Random mixes of markers, their fragments, newlines and words: streaming always equals the whole parse."""
    pieces = ["<think>", "</think>", "<", "</", "</th", "ink>", "<thi", "\n", "\n\n", " ", "a", "bc", ">"]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        for started in (False, True):
            reasoning, content = split_reasoning(text, started_in_reasoning=started)
            for seed in range(3):
                r = random.Random(seed)
                cuts = sorted(r.randint(0, len(text)) for _ in range(r.randint(0, 6)))
                chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
                assert stream_reasoning(chunks, started) == (reasoning or "", content), (text, chunks)


# --- tool calls --------------------------------------------------------------------------------------------------

TOOL_CASES = [
    # (content text, tools, expected content, expected [(name, arguments)])
    (WEATHER, TOOLS, "", [("get_weather", {"city": "Paris", "days": 3})]),
    ("I'll check.\n" + WEATHER, TOOLS, "I'll check.", [("get_weather", {"city": "Paris", "days": 3})]),
    # Several calls; whitespace-only content between them is dropped, text after them kept. The content is
    # stripped as a whole, so the whitespace around calls stays where text is on both sides.
    (WEATHER + "\n" + call("get_weather", city="Rome") + "\n", TOOLS, "",
     [("get_weather", {"city": "Paris", "days": 3}), ("get_weather", {"city": "Rome"})]),
    ("A\n" + WEATHER + "\n" + call("get_weather", city="Oslo") + "\nB", TOOLS, "A\n\n\nB",
     [("get_weather", {"city": "Paris", "days": 3}), ("get_weather", {"city": "Oslo"})]),
    # A zip code is declared a string: it stays text although it reads as a number.
    (call("get_weather", city="Zürich", zip="8001"), TOOLS, "", [("get_weather", {"city": "Zürich", "zip": "8001"})]),
    (call("configure", count="42", ratio="0.5", scale="2", verbose="True", options='{"a": [1, 2], "b": null}',
          tags='["x", "y"]', label="123", limit="null", mode="fast", level="2", nothing="null"), TOOLS, "",
     [("configure", {"count": 42, "ratio": 0.5, "scale": 2, "verbose": True, "options": {"a": [1, 2], "b": None},
                     "tags": ["x", "y"], "label": "123", "limit": None, "mode": "fast", "level": 2,
                     "nothing": None})]),
    (call("configure", limit="7", mode="5", verbose="false", ratio="-1.5e3"), TOOLS, "",
     [("configure", {"limit": 7, "mode": 5, "verbose": False, "ratio": -1500.0})]),
    # Values that fail their declared type stay strings.
    (call("configure", count="many", ratio="1,5", verbose="maybe", options="{not json", tags='{"a": 1}',
          limit="3.5"), TOOLS, "",
     [("configure", {"count": "many", "ratio": "1,5", "verbose": "maybe", "options": "{not json",
                     "tags": '{"a": 1}', "limit": "3.5"})]),
    # No tools list: JSON literals where lossless, everything else text.
    (WEATHER, None, "", [("get_weather", {"city": "Paris", "days": 3})]),
    (call("f", a="true", b="True", c="null", d="[1, 2]", e='{"k": "v"}', f="3.10", g="007", h='"quoted"',
          i="-2.5", j="1e3", k="{oops}"), None, "",
     [("f", {"a": True, "b": "True", "c": None, "d": [1, 2], "e": {"k": "v"}, "f": "3.10", "g": "007",
             "h": '"quoted"', "i": -2.5, "j": "1e3", "k": "{oops}"})]),
    # A function the tools list does not declare still parses, its arguments guessed.
    (call("undeclared", n="5"), TOOLS, "", [("undeclared", {"n": 5})]),
    # Only one newline is trimmed on each side of a value; values may span lines, or sit on the tag's line.
    (call("write", code="def f():\n    return 1\n"), TOOLS, "", [("write", {"code": "def f():\n    return 1\n"})]),
    ("<tool_call><function=get_weather><parameter=city>Paris</parameter></function></tool_call>", TOOLS, "",
     [("get_weather", {"city": "Paris"})]),
    ("<tool_call>\n<function=now>\n</function>\n</tool_call>", TOOLS, "", [("now", {})]),
    ("\n\n" + WEATHER + "\n \n", TOOLS, "", [("get_weather", {"city": "Paris", "days": 3})]),
    ("Plain answer, no calls.\n", TOOLS, "Plain answer, no calls.", []),
    ("a <toolbox> b <tool_call", TOOLS, "a <toolbox> b <tool_call", []),
]

MALFORMED = [
    "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",  # cut off: no </tool_call>
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>",  # no <function=...>
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>",  # no </parameter>
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</tool_call>",  # no </function>
    "<tool_call>\n<function=get_weather>\nstray\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
    "<tool_call>\n<function=>\n</function>\n</tool_call>",  # no name
    "<tool_call>\n<function=a>\n</function>\n<function=b>\n</function>\n</tool_call>",  # two functions
    "<tool_call>\n" + WEATHER,  # a call opened inside a call: up to the first </tool_call>, malformed
]


@pytest.mark.parametrize("text,tools,content,calls", TOOL_CASES)
def test_parse_tool_calls(text, tools, content, calls):
    got_content, got = parse_tool_calls(text, tools, id_factory=counter_ids())
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert [c.arguments for c in got] == [json.dumps(a, ensure_ascii=False) for _, a in calls]
    assert [c.id for c in got] == [f"call_{i:024d}" for i in range(len(calls))]
    assert_tools_stream(text, tools)


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_calls_are_content(text):
    assert parse_tool_calls(text, TOOLS) == (text.strip(), [])
    assert_tools_stream(text, TOOLS)
    # A malformed call before a good one: the first is content, unchanged, the second a call.
    if "</tool_call>" in text:
        content, calls = parse_tool_calls(text + "\n" + WEATHER, TOOLS)
        assert content == text.strip() and [c.name for c in calls] == ["get_weather"]
        assert_tools_stream(text + "\n" + WEATHER, TOOLS)


def test_call_ids_and_openai_shape():
    _, calls = parse_tool_calls(WEATHER + WEATHER, TOOLS)
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)
    assert calls[0].id != calls[1].id
    assert calls[0].to_openai() == {"id": calls[0].id, "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}
    _, (zurich,) = parse_tool_calls(call("get_weather", city="Zürich"), TOOLS)
    assert zurich.arguments == '{"city": "Zürich"}'  # not \u-escaped


def test_convert_value_rules():
    assert convert_value("12", {"type": "string"}) == "12"
    assert convert_value(" 12 ", {"type": "integer"}) == 12
    assert convert_value("12", {"type": "number"}) == 12 and isinstance(convert_value("12", {"type": "number"}), int)
    assert convert_value("1_000", {"type": "integer"}) == "1_000"  # Python-only syntax is not a JSON number
    assert convert_value("nan", {"type": "number"}) == "nan"
    assert convert_value("FALSE", {"type": "boolean"}) is False
    assert convert_value("null", {"type": ["string", "null"]}) is None
    assert convert_value("hello", {"type": ["string", "null"]}) == "hello"
    assert convert_value("3", {"oneOf": [{"type": "string"}, {"type": "integer"}]}) == 3
    assert convert_value("3", {"description": "no type"}) == 3  # falls back to the no-schema guess
    assert convert_value("red", {"enum": ["red", "blue"]}) == "red"


def test_tool_stream_holds_back_only_undecided_text():
    s = ToolCallStream(TOOLS, id_factory=counter_ids())
    assert s.feed("Let me <tool") == ("Let me", [])  # the space waits for text after it (whole-text strip)
    assert s.feed("box>") == (" <toolbox>", [])
    assert s.feed(" then <tool_call>\n<function=get_weather>\n<parameter=city>\nParis") == (" then", [])
    assert s.in_call
    content, calls = s.feed("\n</parameter>\n</function>\n</tool_call")
    assert (content, calls) == ("", [])
    content, calls = s.feed(">\nok")
    assert content == " \nok" and [c.name for c in calls] == ["get_weather"]  # the held space, now followed
    assert s.finish() == ("", [])
    with pytest.raises(RuntimeError):
        s.feed("x")

    s = ToolCallStream(TOOLS)
    assert s.feed("x\n<tool_call>\n<function=f>") == ("x", [])
    assert s.finish() == ("\n<tool_call>\n<function=f>", [])  # an unfinished call is content


def test_tool_stream_random_texts():
    """Random mixes of calls, broken calls, tag fragments and whitespace: streaming equals the whole parse."""
    pieces = [WEATHER, call("configure", count="1", tags="[1]"), "<tool_call>", "</tool_call>", "<tool_",
              "call>", "<function=g>", "</function>", "<parameter=x>", "1", "</parameter>", "\n", " ", "hi", "<"]
    rng = random.Random(1)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        whole = parse_tool_calls(text, TOOLS, id_factory=counter_ids())
        for seed in range(3):
            r = random.Random(seed)
            cuts = sorted(r.randint(0, len(text)) for _ in range(r.randint(0, 6)))
            chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            assert stream_tools(chunks, TOOLS) == whole, (text, chunks)


# --- both stages -------------------------------------------------------------------------------------------------

COMPLETION = ("<think>\nlet me check the weather\n</think>\n\nI'll look it up.\n<tool_call>\n<function=get_weather>\n"
              "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")


def stream_both(chunks: list[str], started: bool, tools) -> tuple[str, str, list[ToolCall]]:
    """The server's pipeline: reasoning first, its content deltas fed on to the tool-call parser."""
    rs, ts = ReasoningStream(started), ToolCallStream(tools, id_factory=counter_ids())
    reasoning, content, calls = [], [], []
    for chunk in chunks + [None]:
        r, c = rs.feed(chunk) if chunk is not None else rs.finish()
        reasoning.append(r)
        c, done = ts.feed(c)
        content.append(c)
        calls += done
    c, done = ts.finish()
    return "".join(reasoning), "".join(content) + c, calls + done


@pytest.mark.parametrize("tools", [TOOLS, None])
@pytest.mark.parametrize("started", [False, True])
def test_full_completion(started, tools):
    # With the block opened by the prompt, the completion is the same text without its own "<think>\n".
    text = COMPLETION.removeprefix("<think>\n") if started else COMPLETION
    assert think_open("<|im_start|>assistant\n<think>\n") is True
    reasoning, content = split_reasoning(text, started_in_reasoning=started)
    assert reasoning == "let me check the weather"
    content, calls = parse_tool_calls(content, tools, id_factory=counter_ids())
    assert content == "I'll look it up."
    assert [c.to_openai() for c in calls] == [{"id": f"call_{0:024d}", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]
    for chunks in chunkings(text):
        assert stream_both(chunks, started, tools) == (reasoning, content, calls), chunks
