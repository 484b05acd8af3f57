"""Tool calls in the qwen3_coder format, parsed out of a completion's content, whole or as it streams.

A call, anywhere in the content, several possibly in a row::

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    ...
    </function>
    </tool_call>

Rules (the same for `parse_tool_calls` and `ToolCallStream`):
- a call is the text from a ``<tool_call>`` to the first ``</tool_call>`` after it. It is well-formed when, inside,
  there is exactly one ``<function=NAME>...</function>`` (whitespace around it allowed) whose body is only
  ``<parameter=ARG>VALUE</parameter>`` items separated by whitespace; a repeated ARG keeps its last value;
- anything else is content, unchanged: a malformed call (its whole ``<tool_call>...</tool_call>`` text), a
  ``<tool_call>`` with no ``</tool_call>`` after it (the rest of the text), text outside calls;
- content is the concatenation of all content pieces, stripped of leading and trailing whitespace
  (``str.strip()``) as a whole: whitespace-only content is "", and the whitespace between text and a call is
  kept only where text follows the call too (``"A\\n<call>\\nB"`` -> ``"A\\n\\nB"``);
- a VALUE loses one leading and one trailing newline, then is typed (see `convert_value`); the arguments are the
  JSON object of the typed values (``json.dumps(..., ensure_ascii=False)``), as the OpenAI API carries them.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from qwax.inference.reasoning import partial_suffix

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

_FUNCTION = re.compile(r"\s*<function=([^<>\n]+)>(.*)</function>\s*", re.DOTALL)
_PARAMETER = re.compile(r"\s*<parameter=([^<>\n]+)>(.*?)</parameter>", re.DOTALL)
_INTEGER = re.compile(r"-?(?:0|[1-9]\d*)")
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")  # JSON's number grammar

# Non-string types in the order a union tries them: the most specific first, so "1" is 1 not 1.0.
_TYPE_ORDER = ("null", "boolean", "integer", "number", "object", "array")
_MISSING = object()


def new_call_id() -> str:
    """A fresh tool-call id: ``call_`` and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; `arguments` is the JSON text of the argument object."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        """The call as an OpenAI chat message's (or stream delta's, with an added "index") tool_calls entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


Schemas = dict[str, dict[str, Any]]  # function name -> argument name -> JSON schema


def tool_schemas(tools: Iterable[Mapping[str, Any]] | None) -> Schemas:
    """The argument schemas of an OpenAI ``tools`` list (``{"type": "function", "function": {...}}`` items;
    a bare function object is accepted too). Non-function tools and odd shapes are skipped, never an error."""
    schemas: Schemas = {}
    for tool in tools or ():
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            continue
        fn = tool.get("function", tool)
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, Mapping) else None
        schemas[fn["name"]] = dict(props) if isinstance(props, Mapping) else {}
    return schemas


def _schema_types(schema: Any) -> set[str] | None:
    """The JSON types a schema allows (``type`` as a string or list, ``anyOf`` / ``oneOf`` members, ``enum``
    values), or None where it names none."""
    if not isinstance(schema, Mapping):
        return None
    types: set[str] = set()
    declared = schema.get("type")
    if isinstance(declared, str):
        types.add(declared)
    elif isinstance(declared, list):
        types.update(t for t in declared if isinstance(t, str))
    for key in ("anyOf", "oneOf"):
        for member in schema.get(key) or ():
            types |= _schema_types(member) or set()
    if not types and isinstance(schema.get("enum"), list):
        kinds = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}
        types.update(kinds.get(type(v), "string") for v in schema["enum"])
    return types or None


def _as_type(text: str, kind: str) -> Any:
    """`text` read as a value of the JSON type `kind`, or _MISSING where it is not one."""
    s = text.strip()
    if kind == "null":
        return None if s.lower() == "null" else _MISSING
    if kind == "boolean":
        return {"true": True, "false": False}.get(s.lower(), _MISSING)
    if kind == "integer":
        return int(s) if _INTEGER.fullmatch(s) else _MISSING
    if kind == "number":
        if not _NUMBER.fullmatch(s):
            return _MISSING
        if _INTEGER.fullmatch(s):
            return int(s)
        value = float(s)
        return value if math.isfinite(value) else _MISSING
    if kind in ("object", "array"):
        try:
            value = json.loads(s)
        except ValueError:
            return _MISSING
        return value if isinstance(value, dict if kind == "object" else list) else _MISSING
    return _MISSING


def _guess(text: str) -> Any:
    """A value with no schema: a JSON literal only where that is unambiguous and loses nothing, else the text.

    ``true`` / ``false`` / ``null`` (exact JSON spelling), numbers whose JSON form is the text itself ("3", "-2.5";
    not "3.10", "007", "1e3", which would change), and JSON objects / arrays; anything else, quoted JSON strings
    included, stays text.
    """
    s = text.strip()
    if s in ("true", "false", "null"):
        return json.loads(s)
    if _NUMBER.fullmatch(s):
        value = json.loads(s)
        return value if json.dumps(value) == s else text
    if (s[:1], s[-1:]) in (("{", "}"), ("[", "]")):
        try:
            return json.loads(s)
        except ValueError:
            return text
    return text


def convert_value(text: str, schema: Any = None) -> Any:
    """A parameter's text (newlines already trimmed) -> its value, by the argument's JSON schema.

    "string" keeps the text; "integer" / "number" (JSON number syntax), "boolean" (true / false, any case), "null"
    and "object" / "array" (json.loads, of the right kind) are parsed. A union (type list, anyOf / oneOf, enum
    values) tries its non-string types (null, boolean, integer, number, object, array) and then the text as a
    string. A value that fits none of its declared types stays the text, never an error. With no schema or no
    type in it, `_guess` decides.
    """
    types = _schema_types(schema)
    if types is None:
        return _guess(text)
    for kind in _TYPE_ORDER:
        if kind in types:
            value = _as_type(text, kind)
            if value is not _MISSING:
                return value
    return text


def _trim_newlines(value: str) -> str:
    """Drop the one newline after ``<parameter=...>`` and the one before ``</parameter>`` (the format's own)."""
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def parse_call_body(body: str, schemas: Schemas, id_factory: Callable[[], str]) -> ToolCall | None:
    """The text between ``<tool_call>`` and ``</tool_call>`` -> a ToolCall, or None where it is malformed.

    A function missing from `schemas` (not declared, or no tools list) still parses, with every argument guessed.
    """
    match = _FUNCTION.fullmatch(body)
    if match is None:
        return None
    name, inner = match.group(1).strip(), match.group(2)
    if not name:
        return None
    props = schemas.get(name, {})
    args: dict[str, Any] = {}
    pos = 0
    while inner[pos:].strip():
        param = _PARAMETER.match(inner, pos)
        if param is None:
            return None
        arg = param.group(1).strip()
        if not arg:
            return None
        args[arg] = convert_value(_trim_newlines(param.group(2)), props.get(arg))
        pos = param.end()
    return ToolCall(id=id_factory(), name=name, arguments=json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str, tools: Iterable[Mapping[str, Any]] | None = None, *,
                     id_factory: Callable[[], str] | None = None) -> tuple[str, list[ToolCall]]:
    """A whole content text -> (the content left once well-formed calls are removed, stripped; the calls).

    `tools` is the request's OpenAI tools list (argument types come from it); `id_factory` makes each call's id
    (default `new_call_id`), called once per well-formed call, in order. Rules: the module docstring.
    """
    schemas, ids = tool_schemas(tools), id_factory or new_call_id
    pieces: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while True:
        start = text.find(CALL_OPEN, pos)
        end = text.find(CALL_CLOSE, start + len(CALL_OPEN)) if start >= 0 else -1
        if end < 0:  # no more calls, or one left open: the rest is content
            pieces.append(text[pos:])
            break
        pieces.append(text[pos:start])
        call = parse_call_body(text[start + len(CALL_OPEN):end], schemas, ids)
        pos = end + len(CALL_CLOSE)
        if call is None:
            pieces.append(text[start:pos])
        else:
            calls.append(call)
    return "".join(pieces).strip(), calls


class _Stripped:
    """Releases a text piece by piece as its ``str.strip()`` would read: leading whitespace is dropped, and
    whitespace is held until more non-whitespace text follows it (else `finish` drops it)."""

    def __init__(self) -> None:
        self._begun = False
        self._pending = ""  # whitespace released only if non-whitespace text comes after it

    def feed(self, text: str) -> str:
        if not self._begun:
            text = text.lstrip()
            self._begun = bool(text)
        body = text.rstrip()
        if not body:
            self._pending += text
            return ""
        out, self._pending = self._pending + body, text[len(body):]
        return out


class ToolCallStream:
    """`parse_tool_calls` incrementally: content deltas in, (content delta, calls completed) out.

    The content deltas of all `feed` calls and `finish` concatenate to the content of `parse_tool_calls` on the
    whole text, and the calls (in order, with ids drawn in the same order) equal its calls. Held back: a tail
    that could begin ``<tool_call>``, a call until its ``</tool_call>`` arrives, and whitespace until content
    follows it (the whole-text strip).
    """

    def __init__(self, tools: Iterable[Mapping[str, Any]] | None = None, *,
                 id_factory: Callable[[], str] | None = None):
        self._schemas, self._ids = tool_schemas(tools), id_factory or new_call_id
        self._content = _Stripped()
        self._buf = ""  # unreleased text; inside a call it starts with "<tool_call>"
        self._in_call = False
        self._scan = 0  # inside a call: where the search for "</tool_call>" resumes (no rescans of long calls)
        self._finished = False

    @property
    def in_call(self) -> bool:
        """Whether a ``<tool_call>`` is open (its text held until it closes)."""
        return self._in_call

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """Take the next piece of content; return the content it releases and the calls it completes."""
        if self._finished:
            raise RuntimeError("ToolCallStream.feed after finish")
        self._buf += delta
        out: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if not self._in_call:
                start = self._buf.find(CALL_OPEN)
                if start < 0:
                    cut = len(self._buf) - partial_suffix(self._buf, CALL_OPEN)
                    out.append(self._content.feed(self._buf[:cut]))
                    self._buf = self._buf[cut:]
                    break
                out.append(self._content.feed(self._buf[:start]))
                self._buf, self._in_call, self._scan = self._buf[start:], True, len(CALL_OPEN)
            end = self._buf.find(CALL_CLOSE, self._scan)
            if end < 0:
                self._scan = max(len(CALL_OPEN), len(self._buf) - len(CALL_CLOSE) + 1)
                break
            stop = end + len(CALL_CLOSE)
            call = parse_call_body(self._buf[len(CALL_OPEN):end], self._schemas, self._ids)
            if call is None:
                out.append(self._content.feed(self._buf[:stop]))
            else:
                calls.append(call)
            self._buf, self._in_call = self._buf[stop:], False
        return "".join(out), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the content: an open call, or a held beginning of ``<tool_call>``, is content."""
        if self._finished:
            return "", []
        self._finished = True
        buf, self._buf, self._in_call = self._buf, "", False
        return self._content.feed(buf), []
