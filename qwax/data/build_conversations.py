"""Rebuild the embedded post-training sets `conversations.jsonl` (SFT) and `preferences.jsonl` (DPO) from corpus.jsonl.

    python -m qwax.data.build_conversations     # writes qwax/data/conversations.jsonl and preferences.jsonl

Deterministic: the same corpus.jsonl gives byte-identical files on any machine (choices come from a seeded
random.Random and its random() alone, whose sequence Python keeps stable across releases).

Conversations (one per corpus document, in corpus order): a user asks about a standard-library object (the
document's dotted name) and the assistant answers from its docstring (the first paragraph(s), reflowed and cut to
ANSWER_CHARS so that most conversations fit 512 tokens of a 2048-token BPE, template text included). About 30%
open with a system prompt, about 25% give the assistant reasoning_content, about 20% go through a tool: the
`lookup_docs` tool's JSON schema in "tools", the assistant's tool call (arguments as OpenAI's JSON text or as a
mapping), a `tool` message holding the docstring, then the assistant's answer; about 6% ask a second question
about the next object of the corpus.

Preferences (for 3 of every 4 documents): a user question about object X; chosen: the answer about X from X's
docstring; rejected: the same answer shape about another object Y from Y's docstring, i.e. a fluent answer to a
question that was not asked. Both answers name their object. Y is drawn from the fourth of the documents that
no question is about, so no text is chosen in one pair and rejected in another: a model that learned to push
an answer down for one question would otherwise push a held-out pair's chosen answer down too.

The text is derived from the Python standard library's docstrings (see build_corpus.py), Copyright (c) 2001 Python
Software Foundation, distributed under the PSF License Agreement (see CORPUS_LICENSE.txt).
"""

from __future__ import annotations

import json
import os
import random
import re
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus.jsonl")
CONVERSATIONS = os.path.join(HERE, "conversations.jsonl")
PREFERENCES = os.path.join(HERE, "preferences.jsonl")
SEED = 3_5_2048
ANSWER_CHARS = 600  # an answer's budget (the docstring's opening paragraphs)
# Tool conversations also carry the schema and the template's tool notes (about 360 tokens of the 2048-token BPE):
# their docstring excerpt and answer are short so that most of them fit 512 tokens too.
TOOL_ANSWER_CHARS = 90
TOOL_RESULT_CHARS = 120
REJECT_STRIDE = 89  # rejected answers come from the distractor this far ahead (a prime: no short cycles)

QUESTIONS = ("What does `{name}` do?", "Can you explain `{name}` from the Python standard library?",
             "What is `{name}` for?", "Tell me about {name}.", "How would you describe `{name}`?",
             "I came across `{name}` in some code. What is it?", "Briefly, what is {name}?",
             "What does the documentation say about `{name}`?")
FOLLOW_UPS = ("And what about `{name}`?", "Thanks. What does `{name}` do?", "How about {name}?")
ANSWERS = ("{text}", "`{name}`: {text}", "According to its documentation, `{name}` works like this:\n\n{text}",
           "Here is what the docstring of `{name}` says:\n\n{text}")
NAMED_ANSWERS = ANSWERS[1:]  # preference answers say which object they are about
TOOL_ANSWERS = ("{text}", "The documentation of `{name}` says:\n\n{text}", "`{name}`: {text}")
SYSTEM_PROMPTS = ("You are a helpful assistant who explains the Python standard library.",
                  "You answer questions about Python's standard library concisely, from its documentation.",
                  "You are a Python expert. Keep answers short and accurate.")
TOOL_SYSTEM_PROMPTS = ("You are a helpful assistant. Look documentation up before answering.",
                       "You answer questions about Python. Use the tools when they help.")
REASONING = ("The user asks about `{name}`, which belongs to the `{top}` module. Its docstring begins: \"{first}\" "
             "I will answer from the documentation.",
             "`{name}` is part of `{top}`. The documentation opens with \"{first}\", so I can summarise that.")
TOOL_REASONING = "I should look up the documentation of `{name}` before answering."
TOOL_PREFACES = ("", "", "Let me look that up.")
LOOKUP_DOCS = {
    "type": "function",
    "function": {
        "name": "lookup_docs",
        "description": "Look up the docstring of a Python standard-library object.",
        "parameters": {
            "type": "object",
            "properties": {"name": {"type": "string", "description": "Dotted name, e.g. json.dumps"}},
            "required": ["name"],
        },
    },
}


def read_corpus(path: str = CORPUS) -> list[tuple[str, str]]:
    """(dotted name, docstring) of each corpus document (the first line is the name)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            name, _, body = text.partition("\n\n")
            out.append((name.strip(), body.strip()))
    return out


def _reflow(paragraph: str) -> str:
    """Prose lines joined into one; a paragraph with indented lines (code, tables, lists) is kept as it is."""
    lines = paragraph.splitlines()
    if any(line.startswith((" ", "\t")) for line in lines[1:]) or any(line.lstrip().startswith(("-", "*", ">>>"))
                                                                       for line in lines):
        return paragraph
    return " ".join(line.strip() for line in lines)


def _cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters: at the last sentence end before it, else at a word ("...")."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    sentence = max(head.rfind(". "), head.rfind(".\n"))
    if sentence >= limit // 3:
        return head[:sentence + 1]
    word = head.rstrip().rfind(" ")
    return (head[:word] if word > 0 else head).rstrip(" ,;:") + "..."


def summary(doc: str, limit: int) -> str:
    """The docstring's opening paragraphs (reflowed) within `limit` characters, at least the first one (cut)."""
    # Only line breaks are stripped: an indented first line (code) keeps its indentation.
    paragraphs = [p.strip("\n").rstrip() for p in re.split(r"\n\s*\n", doc) if p.strip()]
    out = _cut(_reflow(paragraphs[0]), limit)
    for p in paragraphs[1:]:
        p = _reflow(p)
        if len(out) >= limit // 2 or len(out) + 2 + len(p) > limit:
            break
        out += "\n\n" + p
    return out


def _first_sentence(doc: str) -> str:
    first = _reflow(re.split(r"\n\s*\n", doc.strip())[0])
    end = first.find(". ")
    return _cut(first if end < 0 else first[:end + 1], 160).replace('"', "'")


def _pick(rng: random.Random, options: tuple[str, ...]) -> str:
    return options[int(rng.random() * len(options))]


def conversation(i: int, docs: list[tuple[str, str]], rng: random.Random) -> dict[str, Any]:
    """The conversation about document i (its kind drawn from `rng`)."""
    name, doc = docs[i]
    kind = rng.random()
    with_system, with_reasoning = rng.random() < 0.3, rng.random() < 0.25
    top = name.split(".")[0]
    messages: list[dict[str, Any]] = []
    if kind < 0.2:  # through the lookup_docs tool
        if with_system and rng.random() < 0.5:  # half as often: the tool notes are a long system turn already
            messages.append({"role": "system", "content": _pick(rng, TOOL_SYSTEM_PROMPTS)})
        messages.append({"role": "user", "content": _pick(rng, QUESTIONS).format(name=name)})
        arguments: Any = {"name": name}
        if rng.random() < 0.5:
            arguments = json.dumps(arguments)  # OpenAI's wire form: the reader parses it
        call = {"id": f"call_{i}", "type": "function", "function": {"name": "lookup_docs", "arguments": arguments}}
        turn: dict[str, Any] = {"role": "assistant", "content": _pick(rng, TOOL_PREFACES), "tool_calls": [call]}
        if with_reasoning:
            turn["reasoning_content"] = TOOL_REASONING.format(name=name)
        messages.append(turn)
        messages.append({"role": "tool", "tool_call_id": f"call_{i}", "content": summary(doc, TOOL_RESULT_CHARS)})
        answer = _pick(rng, TOOL_ANSWERS).format(name=name, text=summary(doc, TOOL_ANSWER_CHARS))
        messages.append({"role": "assistant", "content": answer})
        return {"messages": messages, "tools": [LOOKUP_DOCS]}
    if with_system:
        messages.append({"role": "system", "content": _pick(rng, SYSTEM_PROMPTS)})
    turns = [(name, doc)]
    if kind > 0.94 and i + 1 < len(docs):  # a follow-up question about the next object
        turns.append(docs[i + 1])
    for k, (n, d) in enumerate(turns):
        question = (_pick(rng, QUESTIONS) if k == 0 else _pick(rng, FOLLOW_UPS)).format(name=n)
        messages.append({"role": "user", "content": question})
        limit = ANSWER_CHARS if len(turns) == 1 else ANSWER_CHARS // 2
        turn = {"role": "assistant", "content": _pick(rng, ANSWERS).format(name=n, text=summary(d, limit))}
        if with_reasoning:
            turn["reasoning_content"] = _pick(rng, REASONING).format(name=n, top=n.split(".")[0] or top,
                                                                     first=_first_sentence(d))
        messages.append(turn)
    return {"messages": messages}


def preference(i: int, docs: list[tuple[str, str]], rng: random.Random) -> dict[str, Any]:
    """The pair about document i (i % 4 != 3): chosen from its docstring, rejected about a document j % 4 == 3."""
    name, doc = docs[i]
    distractors = range(3, len(docs), 4)
    other_name, other = docs[distractors[(i + REJECT_STRIDE) % len(distractors)]]
    prompt = []
    if rng.random() < 0.2:
        prompt.append({"role": "system", "content": _pick(rng, SYSTEM_PROMPTS)})
    prompt.append({"role": "user", "content": _pick(rng, QUESTIONS).format(name=name)})
    shape = _pick(rng, NAMED_ANSWERS)
    return {"prompt": prompt,
            "chosen": [{"role": "assistant", "content": shape.format(name=name, text=summary(doc, ANSWER_CHARS))}],
            "rejected": [{"role": "assistant",
                          "content": shape.format(name=other_name, text=summary(other, ANSWER_CHARS))}]}


def build(docs: list[tuple[str, str]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(conversations, preferences) of the corpus documents."""
    rng = random.Random(SEED)
    conversations = [conversation(i, docs, rng) for i in range(len(docs))]
    rng = random.Random(SEED + 1)
    preferences = [preference(i, docs, rng) for i in range(len(docs)) if i % 4 != 3]
    return conversations, preferences


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> int:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return os.path.getsize(path)


def main() -> None:
    conversations, preferences = build(read_corpus())
    for path, rows in ((CONVERSATIONS, conversations), (PREFERENCES, preferences)):
        print(f"wrote {path}: {len(rows)} records, {write_jsonl(path, rows)} bytes")


if __name__ == "__main__":
    main()
