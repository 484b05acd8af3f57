"""Post-training data: conversations for supervised fine-tuning (SFT) and preference pairs for DPO.

Records are OpenAI-format chats read from jsonl or parquet files (one record per row; "default" names the embedded
set built by build_conversations.py):

    conversation  {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": ...}, ...],
                   "tools": [JSON schema, ...]}                                    (tools optional)
    preference    {"prompt": [messages] | str, "chosen": completion, "rejected": completion, "tools": [...]}
                  completion: an assistant message, a list of messages or a string (the assistant's text);
                  or {"chosen": full conversation, "rejected": full conversation}: the prompt is their shared
                  leading messages

Assistant messages may carry `reasoning_content` (or `reasoning`, `thinking`) and OpenAI `tool_calls` whose
arguments are a mapping or a JSON string; strings are parsed to mappings before rendering, so templates print the
arguments rather than the JSON text. In parquet files a messages / tools / prompt / chosen / rejected column may
hold JSON strings or nested lists, and its nulls mean "absent". A row's location `FILE:N` is its line in a jsonl
file and its row number (from 1) in a parquet file; records keep it under "source" for later error messages.

A conversation is rendered with the chat template (`ChatTemplate.render_with_assistant_spans`) and tokenised with
the offsets of each token; the loss mask holds the tokens that overlap a `{% generation %}` span, the rule of
transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)`: the text the assistant produces, from
the rendering and never by matching token strings. With qwax's Qwen3.5 template that is each assistant turn after
its `<|im_start|>assistant\\n` header, through its closing `<|im_end|>`.

SFT batches pack whole conversations into rows (grain's first-fit packing, never splitting one) with the
pretraining pipeline's keys (packing.BATCH_KEYS): segment ids 1, 2, ... per conversation and 0 for padding,
positions restarting in each, and weight[t] = 1 exactly when target t (token t+1) is an assistant token of the same
conversation. DPO batches hold one sequence per row: rows 0..B-1 the chosen sequences, rows B..2B-1 the rejected
ones of the same pairs in the same order, weights marking the completion's assistant tokens. Both pipelines are
grain IterDatasets whose iterator state checkpoints, so a resumed run reads the batches the interrupted one would
have read.

Malformed records raise a RecordError (a ValueError) naming FILE:N, the field and what was expected; with
on_error="skip" they are left out and counted by reason (the RecordError's `reason`): bad_json, not_an_object,
missing_messages, bad_messages, empty_conversation, bad_message, missing_role, unknown_role, missing_content,
bad_content, bad_tool_call, misplaced_system, bad_tools, no_assistant_turn; for preferences also
missing_completion, missing_prompt, no_shared_prompt, identical_completions; once rendered: template_error,
too_long (more than seq_len tokens) and no_assistant_tokens.
"""

from __future__ import annotations

import collections
import functools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import grain
import numpy as np
from tokenizers import Tokenizer

from qwax.data.packing import BATCH_KEYS
from qwax.data.sources import expand_paths

if TYPE_CHECKING:  # only annotations: qwax.data never imports the inference package at run time
    from qwax.inference.chat_template import ChatTemplate

__all__ = ["DEFAULT_CONVERSATIONS", "DEFAULT_PREFERENCES", "ROLES", "RecordError", "check_conversation",
           "check_preference", "dpo_batches", "dpo_eval_batches", "encode_conversation", "encode_conversations",
           "encode_preference", "encode_preferences", "read_conversations", "read_preferences", "sft_batches",
           "sft_eval_batches"]

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONVERSATIONS = os.path.join(_HERE, "conversations.jsonl")
DEFAULT_PREFERENCES = os.path.join(_HERE, "preferences.jsonl")
ROLES = ("system", "user", "assistant", "tool")
ROW_SUFFIXES = (".jsonl", ".parquet")
# Columns that may hold JSON text (parquet files often store nested chats as strings).
_JSON_FIELDS = ("messages", "tools", "prompt", "chosen", "rejected")

OnError = Literal["error", "skip"]
Encoded = tuple[np.ndarray, np.ndarray]  # (ids int32 [n], mask bool [n])


class RecordError(ValueError):
    """A malformed record. `reason` names the problem (the key it is counted under when skipped)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------------------
# Reading rows


def _drop_nulls(value: Any) -> Any:
    """A parquet row without the nulls its struct columns fill in for absent fields."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _rows(path: str) -> Iterator[tuple[str, Any]]:
    """(location "FILE:N", row) for each row of a jsonl or parquet file; a jsonl line that is not JSON gives a
    RecordError as its row, so that the caller decides whether to raise or skip it."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, RecordError("bad_json", f"{where}: not valid JSON ({e.msg} at column {e.colno})")
    elif path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install 'qwax[parquet]'") from None
        row_no = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                row_no += 1
                yield f"{path}:{row_no}", _drop_nulls(row)
    else:
        raise ValueError(f"{path}: conversations and preferences are read from .jsonl or .parquet files "
                         f"(expected a name ending in {' or '.join(ROW_SUFFIXES)})")


def _decoded(row: dict[str, Any], where: str) -> dict[str, Any]:
    """`row` with JSON-text columns (see _JSON_FIELDS) parsed; plain text (a prompt or completion string) stays."""
    out = dict(row)
    for key in _JSON_FIELDS:
        value = out.get(key)
        if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError as e:
                if key in ("messages", "tools"):  # these are never plain text
                    raise RecordError("bad_json", f"{where}: {key} is not valid JSON ({e.msg} at column "
                                                  f"{e.colno})") from None
    return out


def _read(paths: Sequence[str], default: str, check: Callable[[Any, str], dict[str, Any]],
          on_error: OnError) -> tuple[list[dict[str, Any]], collections.Counter]:
    _check_on_error(on_error)
    records: list[dict[str, Any]] = []
    skipped: collections.Counter = collections.Counter()
    files = expand_paths(paths, default=default, suffixes=ROW_SUFFIXES)
    if not files:
        raise ValueError(f"data sources {list(paths)} hold no .jsonl or .parquet files")
    for path in files:
        for where, row in _rows(path):
            try:
                if isinstance(row, RecordError):
                    raise row
                records.append(check(row, where))
            except RecordError as e:
                _fail(e, on_error, skipped)
    if not records:
        raise ValueError(f"data sources {list(paths)} hold no usable records (skipped: {dict(skipped)})")
    return records, skipped


def _check_on_error(on_error: str) -> None:
    if on_error not in ("error", "skip"):
        raise ValueError(f"on_error={on_error!r}: expected 'error' or 'skip'")


def _fail(error: RecordError, on_error: OnError, skipped: collections.Counter | None) -> None:
    if on_error == "error":
        raise error
    if skipped is not None:
        skipped[error.reason] += 1


def _where(record: Mapping[str, Any], default: str) -> str:
    source = record.get("source") if isinstance(record, Mapping) else None
    return source if isinstance(source, str) else default


# ---------------------------------------------------------------------------------------------------------------
# Checking records


def _content(value: Any, where: str) -> str | list[Any]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for k, part in enumerate(value):
            if not (isinstance(part, str) or (isinstance(part, dict) and isinstance(part.get("type"), str))):
                raise RecordError("bad_content", f"{where}.content[{k}] must be a string or a part with a 'type' "
                                                 f"(e.g. {{'type': 'text', 'text': ...}}), got {str(part)[:80]}")
        return value
    raise RecordError("bad_content", f"{where}.content must be a string or a list of parts, got "
                                     f"{type(value).__name__}")


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """An OpenAI tool call {"type": "function", "function": {"name", "arguments"}} (or the flat {"name",
    "arguments"}) with its arguments as a mapping."""
    if not isinstance(call, dict):
        raise RecordError("bad_tool_call", f"{where} must be an object with a 'function', got "
                                           f"{type(call).__name__}")
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise RecordError("bad_tool_call", f"{where}.function.name must be a non-empty string, got "
                                           f"{str(function)[:80]}")
    arguments = function.get("arguments")
    if arguments is None or arguments == "":
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise RecordError("bad_tool_call", f"{where}.function.arguments is not valid JSON ({e.msg} at column "
                                               f"{e.colno}): {arguments[:80]!r}") from None
    if not isinstance(arguments, dict):
        raise RecordError("bad_tool_call", f"{where}.function.arguments must be a JSON object (a mapping of "
                                           f"parameter names to values), got {type(arguments).__name__}")
    out: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _message(message: Any, where: str) -> dict[str, Any]:
    """A checked message: role, content, and for assistants reasoning_content and tool_calls (arguments parsed);
    for tool messages name and tool_call_id. Unset (None) fields are dropped."""
    if not isinstance(message, dict):
        raise RecordError("bad_message", f"{where} must be an object with 'role' and 'content', got "
                                         f"{type(message).__name__}")
    message = {k: v for k, v in message.items() if v is not None}
    role = message.get("role")
    if role is None:
        raise RecordError("missing_role", f"{where} has no 'role' (expected one of {', '.join(ROLES)})")
    if role not in ROLES:
        raise RecordError("unknown_role", f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}")
    out: dict[str, Any] = {"role": role}
    if "content" in message:
        out["content"] = _content(message["content"], where)
    if role == "assistant":
        reasoning = next((message[k] for k in ("reasoning_content", "reasoning", "thinking") if k in message), None)
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise RecordError("bad_message", f"{where}.reasoning_content must be a string, got "
                                                 f"{type(reasoning).__name__}")
            out["reasoning_content"] = reasoning
        calls = message.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise RecordError("bad_tool_call", f"{where}.tool_calls must be a list, got {type(calls).__name__}")
            out["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(calls)]
        if "content" not in out and "tool_calls" not in out:
            raise RecordError("missing_content", f"{where}: an assistant message needs 'content' or 'tool_calls'")
    elif "content" not in out:
        raise RecordError("missing_content", f"{where}: a {role} message needs 'content'")
    if role == "tool":
        for key in ("name", "tool_call_id"):
            if isinstance(message.get(key), str):
                out[key] = message[key]
    return out


def _messages(value: Any, where: str, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise RecordError("bad_messages", f"{where}: {field} must be a list of messages, got {type(value).__name__}")
    out = [_message(m, f"{where}: {field}[{i}]") for i, m in enumerate(value)]
    for i, m in enumerate(out):
        if m["role"] == "system" and i > 0:
            raise RecordError("misplaced_system", f"{where}: {field}[{i}] is a system message; a system message "
                                                  "may only be the first")
    return out


def _tools(value: Any, where: str) -> list[dict[str, Any]] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RecordError("bad_tools", f"{where}: tools must be a list of JSON-schema objects, got "
                                       f"{str(value)[:80]}")
    return value


def _record_start(row: Any, where: str, needs: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise RecordError("not_an_object", f"{where}: a row must be a JSON object with {needs}, got "
                                           f"{type(row).__name__}")
    return _decoded(row, where)


def check_conversation(row: Any, where: str = "record") -> dict[str, Any]:
    """The checked conversation record {"messages", "tools" (when given), "source"} of a row; `where` names the row
    in errors (FILE:N). Raises RecordError for a malformed one (see the module docstring)."""
    row = _record_start(row, where, "'messages'")
    where = _where(row, where)
    if "messages" not in row:
        raise RecordError("missing_messages", f"{where}: no 'messages' field (fields: {sorted(row)})")
    messages = _messages(row["messages"], where, "messages")
    if not messages:
        raise RecordError("empty_conversation", f"{where}: messages is empty; expected at least a user and an "
                                                "assistant message")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no_assistant_turn", f"{where}: the conversation has no assistant message to learn from")
    record: dict[str, Any] = {"messages": messages}
    tools = _tools(row.get("tools"), where)
    if tools:
        record["tools"] = tools
    record["source"] = where
    return record


def _completion(value: Any, where: str, field: str) -> list[dict[str, Any]]:
    """A preference completion: text, one assistant message or a list of messages."""
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        value = [value]
    return _messages(value, where, field)


def check_preference(row: Any, where: str = "record") -> dict[str, Any]:
    """The checked preference record {"prompt", "chosen", "rejected" (lists of messages), "tools" (when given),
    "source"} of a row in either form of the module docstring. Raises RecordError for a malformed one."""
    row = _record_start(row, where, "'chosen' and 'rejected'")
    where = _where(row, where)
    for field in ("chosen", "rejected"):
        if field not in row:
            raise RecordError("missing_completion", f"{where}: no {field!r} field (fields: {sorted(row)})")
    if row.get("prompt") is not None:
        prompt = row["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        prompt = _messages([prompt] if isinstance(prompt, dict) else prompt, where, "prompt")
        completions = []
        for field in ("chosen", "rejected"):
            completion = _completion(row[field], where, field)
            # Some sets repeat the prompt at the start of each completion: keep only what follows it.
            if len(completion) > len(prompt) and completion[:len(prompt)] == prompt:
                completion = completion[len(prompt):]
            completions.append(completion)
        chosen, rejected = completions
    else:
        if not (isinstance(row["chosen"], list) and isinstance(row["rejected"], list)):
            raise RecordError("missing_prompt", f"{where}: without a 'prompt', chosen and rejected must be whole "
                                                "conversations (lists of messages) that share their first messages")
        full_chosen = _messages(row["chosen"], where, "chosen")
        full_rejected = _messages(row["rejected"], where, "rejected")
        shared = 0
        while (shared < min(len(full_chosen), len(full_rejected))
               and full_chosen[shared] == full_rejected[shared]):
            shared += 1
        if shared == 0:
            raise RecordError("no_shared_prompt", f"{where}: chosen and rejected share no first message; give a "
                                                  "'prompt' or conversations that start the same")
        prompt, chosen, rejected = full_chosen[:shared], full_chosen[shared:], full_rejected[shared:]
    if not prompt:
        raise RecordError("missing_prompt", f"{where}: the prompt is empty; expected at least a user message")
    for field, completion in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in completion):
            raise RecordError("no_assistant_turn", f"{where}: the {field} completion (after the {len(prompt)} "
                                                   "prompt message(s)) has no assistant message")
    if chosen == rejected:
        raise RecordError("identical_completions", f"{where}: chosen and rejected are the same")
    record: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    tools = _tools(row.get("tools"), where)
    if tools:
        record["tools"] = tools
    record["source"] = where
    return record


def read_conversations(paths: Sequence[str], *, on_error: OnError = "error"
                       ) -> tuple[list[dict[str, Any]], collections.Counter]:
    """(records, skipped) of the jsonl / parquet files or directories `paths` ("default": the embedded set), in
    file and row order. skipped counts the records left out by reason (on_error="skip"; else they raise)."""
    return _read(paths, DEFAULT_CONVERSATIONS, check_conversation, on_error)


def read_preferences(paths: Sequence[str], *, on_error: OnError = "error"
                     ) -> tuple[list[dict[str, Any]], collections.Counter]:
    """(records, skipped) of preference pairs, as read_conversations ("default": the embedded pairs)."""
    return _read(paths, DEFAULT_PREFERENCES, check_preference, on_error)


# ---------------------------------------------------------------------------------------------------------------
# Encoding


def _require_generation_blocks(template: ChatTemplate) -> None:
    if not template.has_generation_blocks:
        raise ValueError("the chat template has no {% generation %} blocks, so it cannot tell which tokens the "
                         "assistant produces; expected a template that wraps each assistant turn in "
                         "{% generation %}...{% endgeneration %} (as qwax's inference/templates/qwen3_5.jinja does)")


def _token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """bool [n]: token i overlaps a span, i.e. start_i < span end and end_i > span start (spans sorted, disjoint).

    The rule of transformers' assistant masks: a token that straddles a span's edge belongs to it."""
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    mask = np.zeros(len(offsets), bool)
    if not spans or not len(offsets):
        return mask
    starts, ends = np.asarray(spans, np.int64).T
    first = np.searchsorted(ends, offsets[:, 0], side="right")  # the first span ending after the token starts
    inside = first < len(spans)
    mask[inside] = offsets[inside, 1] > starts[first[inside]]
    return mask


def _render(template: ChatTemplate, messages: list[dict[str, Any]], tools: Any,
            template_kwargs: Mapping[str, Any] | None) -> tuple[str, list[tuple[int, int]]]:
    return template.render_with_assistant_spans(messages, tools=tools, **dict(template_kwargs or {}))


def _tokenise(tok: Tokenizer, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[Encoded]:
    """(ids, mask) per rendered text: every special token is matched in the template's text, and nothing is added
    (add_special_tokens=False), as apply_chat_template(tokenize=True) does."""
    encodings = tok.encode_batch(texts, add_special_tokens=False) if texts else []
    return [(np.asarray(e.ids, np.int32), _token_mask(e.offsets, s)) for e, s in zip(encodings, spans)]


def encode_conversation(record: Mapping[str, Any], template: ChatTemplate, tok: Tokenizer, *,
                        template_kwargs: Mapping[str, Any] | None = None) -> Encoded:
    """(ids int32 [n], mask bool [n]) of one conversation: its rendering's tokens, and which are the assistant's
    (the tokens overlapping the template's {% generation %} spans, as transformers' return_assistant_tokens_mask).

    template_kwargs: further template variables (e.g. enable_thinking). The record is checked first
    (check_conversation: tool-call arguments given as JSON text are parsed). Raises ValueError when the template
    has no generation blocks, RecordError for a malformed record, ChatTemplateError when the template refuses it.
    """
    _require_generation_blocks(template)
    rec = check_conversation(record, _where(record, "record"))
    text, spans = _render(template, rec["messages"], rec.get("tools"), template_kwargs)
    return _tokenise(tok, [text], [spans])[0]


def _completion_spans(template: ChatTemplate, prompt: list[dict[str, Any]], text: str,
                      spans: list[tuple[int, int]], tools: Any,
                      template_kwargs: Mapping[str, Any] | None) -> list[tuple[int, int]]:
    """The spans of `text` (prompt + completion rendered) that belong to the completion: those starting where the
    rendering of the prompt alone stops agreeing with it, so the prompt's own assistant turns stay unmasked."""
    prompt_text = template.render(prompt, tools=tools, **dict(template_kwargs or {}))
    boundary = len(os.path.commonprefix([prompt_text, text]))
    return [s for s in spans if s[0] >= boundary]


def _render_preference(rec: dict[str, Any], template: ChatTemplate, template_kwargs: Mapping[str, Any] | None
                       ) -> tuple[list[str], list[list[tuple[int, int]]]]:
    texts, spans = [], []
    for side in ("chosen", "rejected"):
        text, all_spans = _render(template, rec["prompt"] + rec[side], rec.get("tools"), template_kwargs)
        texts.append(text)
        spans.append(_completion_spans(template, rec["prompt"], text, all_spans, rec.get("tools"), template_kwargs))
    return texts, spans


def encode_preference(record: Mapping[str, Any], template: ChatTemplate, tok: Tokenizer, *,
                      template_kwargs: Mapping[str, Any] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(chosen_ids, chosen_mask, rejected_ids, rejected_mask) of one pair: prompt + completion rendered and
    tokenised as encode_conversation does, the masks holding the completion's assistant tokens only."""
    _require_generation_blocks(template)
    rec = check_preference(record, _where(record, "record"))
    texts, spans = _render_preference(rec, template, template_kwargs)
    (c_ids, c_mask), (r_ids, r_mask) = _tokenise(tok, texts, spans)
    return c_ids, c_mask, r_ids, r_mask


def _encode_all(records: Sequence[Mapping[str, Any]], render: Callable[[dict[str, Any]], tuple[list[str], list]],
                check: Callable[[Any, str], dict[str, Any]], tok: Tokenizer, *, seq_len: int, on_error: OnError,
                skipped: collections.Counter | None, what: str) -> list[list[Encoded]]:
    """Each record's sequences ([(ids, mask), ...]); records that are malformed, refused by the template, longer
    than seq_len or without an assistant token are raised or skipped (on_error) and counted in `skipped`."""
    _check_on_error(on_error)
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: expected at least 2 (a token and its target)")
    rendered: list[tuple[str, list[str], list]] = []
    for i, record in enumerate(records):
        where = _where(record, f"record {i}")
        try:
            texts, spans = render(check(record, where))
        except RecordError as e:
            _fail(e, on_error, skipped)
            continue
        except ValueError as e:  # the template refused the record (ChatTemplateError)
            _fail(RecordError("template_error", f"{where}: the chat template refused the {what}: {e}"), on_error,
                  skipped)
            continue
        rendered.append((where, texts, spans))
    flat_texts = [t for _, texts, _ in rendered for t in texts]
    flat_spans = [s for _, _, spans in rendered for s in spans]
    flat = iter(_tokenise(tok, flat_texts, flat_spans))
    out = []
    for where, texts, _ in rendered:
        seqs = [next(flat) for _ in texts]
        longest = max(len(ids) for ids, _ in seqs)
        if longest > seq_len:
            _fail(RecordError("too_long", f"{where}: the {what} is {longest} tokens once rendered, longer than "
                                          f"seq_len={seq_len}"), on_error, skipped)
        elif not all(mask[1:].any() for _, mask in seqs):
            _fail(RecordError("no_assistant_tokens", f"{where}: the chat template marks no assistant token (after "
                                                     f"the first) in the {what}"), on_error, skipped)
        else:
            out.append(seqs)
    return out


def encode_conversations(records: Sequence[Mapping[str, Any]], template: ChatTemplate, tok: Tokenizer, *,
                         seq_len: int, on_error: OnError = "error", skipped: collections.Counter | None = None,
                         template_kwargs: Mapping[str, Any] | None = None) -> list[Encoded]:
    """(ids, mask) of each usable conversation (as encode_conversation), in order; a conversation longer than
    seq_len tokens (reason "too_long"), refused by the template ("template_error") or malformed raises, or with
    on_error="skip" is left out and counted in `skipped` (when given)."""
    _require_generation_blocks(template)

    def render(rec: dict[str, Any]) -> tuple[list[str], list]:
        text, spans = _render(template, rec["messages"], rec.get("tools"), template_kwargs)
        return [text], [spans]

    return [seqs[0] for seqs in _encode_all(records, render, check_conversation, tok, seq_len=seq_len,
                                            on_error=on_error, skipped=skipped, what="conversation")]


def encode_preferences(records: Sequence[Mapping[str, Any]], template: ChatTemplate, tok: Tokenizer, *,
                       seq_len: int, on_error: OnError = "error", skipped: collections.Counter | None = None,
                       template_kwargs: Mapping[str, Any] | None = None
                       ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(chosen_ids, chosen_mask, rejected_ids, rejected_mask) of each usable pair, as encode_conversations (a
    pair is too long when either of its sequences is)."""
    _require_generation_blocks(template)
    pairs = _encode_all(records, lambda rec: _render_preference(rec, template, template_kwargs), check_preference,
                        tok, seq_len=seq_len, on_error=on_error, skipped=skipped, what="preference pair")
    return [(c[0], c[1], r[0], r[1]) for c, r in pairs]


# ---------------------------------------------------------------------------------------------------------------
# Batches


def _share(records: Sequence[Any], process_index: int, process_count: int) -> list[Any]:
    """This process's records: every process_count-th from process_index (records keep their sources)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, process_count={process_count})")
    share = list(records)[process_index::process_count]
    if not share:
        raise ValueError(f"process {process_index} of {process_count} has no records (only {len(records)} in all)")
    return share


def _nonempty(items: list[Any], process_index: int, skipped: collections.Counter | None) -> list[Any]:
    if not items:
        raise ValueError(f"process {process_index} has no usable records left after skipping "
                         f"{dict(skipped or {})}")
    return items


def _packing_element(seq: Encoded) -> dict[str, np.ndarray]:
    ids, mask = seq
    return {"tokens": ids, "mask": mask}


def _sft_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed row {tokens, tokens_segment_ids, tokens_positions, mask, ...} [L] -> BATCH_KEYS arrays [L]: the
    target of t is token t+1, weighted when it is an assistant token of the same conversation."""
    tokens, seg, mask = packed["tokens"], packed["tokens_segment_ids"], packed["mask"].astype(bool)
    targets = np.zeros_like(tokens)
    targets[:-1] = tokens[1:]
    weights = np.zeros(tokens.shape, np.float32)
    weights[:-1] = (seg[:-1] == seg[1:]) & (seg[:-1] > 0) & mask[1:]
    return {"input_ids": tokens.astype(np.int32), "segment_ids": seg.astype(np.int32),
            "position_ids": packed["tokens_positions"].astype(np.int32), "targets": targets.astype(np.int32),
            "weights": weights}


def _reshape(batch: dict[str, np.ndarray], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {k: batch[k].reshape(shape) for k in BATCH_KEYS}


def _packed_rows(encoded: list[Encoded], seq_len: int, *, seed: int | None, bins: int) -> grain.IterDataset:
    """Rows of whole conversations, first-fit packed `bins` rows at a time; seed None: in order, once."""
    ds = grain.MapDataset.source(encoded)
    if seed is not None:
        ds = ds.shuffle(seed=seed).repeat(None)  # a new order every epoch
    ds = ds.map(_packing_element).to_iter_dataset()
    packed = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"tokens": seq_len, "mask": seq_len}, num_packing_bins=bins,
        seed=0 if seed is None else seed, shuffle_bins=seed is not None)
    return packed.map(_sft_row)


def _fixed_batches(rows: Iterable[dict[str, np.ndarray]], rows_per_batch: int, max_batches: int,
                   stack: Callable[[list[dict[str, np.ndarray]]], dict[str, np.ndarray]]) -> list[dict]:
    """At most max_batches batches of rows_per_batch rows; the last is filled with all-zero (weight-0) rows."""
    rows = iter(rows)
    batches = []
    while len(batches) < max_batches:
        chunk = [r for _, r in zip(range(rows_per_batch), rows)]
        if not chunk:
            break
        chunk += [{k: np.zeros_like(v) for k, v in chunk[0].items()}] * (rows_per_batch - len(chunk))
        batches.append(stack(chunk))
    return batches


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


def sft_batches(records: Sequence[Mapping[str, Any]], template: ChatTemplate, tok: Tokenizer, *, seq_len: int,
                batch_size: int, grad_accum: int = 1, seed: int = 0, process_index: int = 0,
                process_count: int = 1, num_packing_bins: int | None = None, on_error: OnError = "error",
                skipped: collections.Counter | None = None,
                template_kwargs: Mapping[str, Any] | None = None) -> grain.IterDataset:
    """Endless SFT batches of this process's share of `records`: dicts of [grad_accum, batch_size, seq_len]
    arrays (BATCH_KEYS), whole conversations packed first-fit into rows, reshuffled every epoch.

    The share (every process_count-th record from process_index) is encoded at once; conversations longer than
    seq_len raise, or with on_error="skip" are counted in `skipped` (as malformed ones; this share's only).
    num_packing_bins: rows packed together (default grad_accum * batch_size); more pack tighter and mix a little
    across epochs.
    """
    _require_generation_blocks(template)
    encoded = _nonempty(encode_conversations(_share(records, process_index, process_count), template, tok,
                                             seq_len=seq_len, on_error=on_error, skipped=skipped,
                                             template_kwargs=template_kwargs), process_index, skipped)
    n = grad_accum * batch_size
    rows = _packed_rows(encoded, seq_len, seed=seed, bins=num_packing_bins or n)
    return rows.batch(n, drop_remainder=True).map(
        functools.partial(_reshape, shape=(grad_accum, batch_size, seq_len)))


def sft_eval_batches(records: Sequence[Mapping[str, Any]], template: ChatTemplate, tok: Tokenizer, *,
                     seq_len: int, batch_size: int, max_batches: int, process_index: int = 0,
                     process_count: int = 1, num_packing_bins: int | None = None, on_error: OnError = "error",
                     skipped: collections.Counter | None = None,
                     template_kwargs: Mapping[str, Any] | None = None) -> list[dict[str, np.ndarray]]:
    """A fixed list of at most max_batches SFT evaluation batches ([batch_size, seq_len] arrays) of this process's
    share, packed in order (num_packing_bins rows at a time, default batch_size); the last batch is filled with
    weight-0 rows."""
    _require_generation_blocks(template)
    encoded = _nonempty(encode_conversations(_share(records, process_index, process_count), template, tok,
                                             seq_len=seq_len, on_error=on_error, skipped=skipped,
                                             template_kwargs=template_kwargs), process_index, skipped)
    rows = _packed_rows(encoded, seq_len, seed=None, bins=num_packing_bins or batch_size)
    return _fixed_batches(rows, batch_size, max_batches, _stack)


def _pair_rows(pair: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """BATCH_KEYS arrays [2, seq_len] of one pair (row 0 chosen, row 1 rejected): one sequence per row, segment 1,
    padded with segment 0; the target of t is token t+1, weighted when it is a completion token."""
    out = {"input_ids": np.zeros((2, seq_len), np.int32), "segment_ids": np.zeros((2, seq_len), np.int32),
           "position_ids": np.zeros((2, seq_len), np.int32), "targets": np.zeros((2, seq_len), np.int32),
           "weights": np.zeros((2, seq_len), np.float32)}
    for row, side in enumerate(("chosen", "rejected")):
        ids, mask = pair[f"{side}_ids"], pair[f"{side}_mask"]
        n = len(ids)
        out["input_ids"][row, :n] = ids
        out["segment_ids"][row, :n] = 1
        out["position_ids"][row, :n] = np.arange(n)
        out["targets"][row, :n - 1] = ids[1:]
        out["weights"][row, :n - 1] = mask[1:]
    return out


def _dpo_layout(batch: dict[str, np.ndarray], grad_accum: int, batch_size: int) -> dict[str, np.ndarray]:
    """[grad_accum * B, 2, L] pairs -> [grad_accum, 2B, L]: each micro-batch's B chosen rows, then its B rejected
    rows in the same order."""
    def lay(x: np.ndarray) -> np.ndarray:
        seq_len = x.shape[-1]
        return x.reshape(grad_accum, batch_size, 2, seq_len).transpose(0, 2, 1, 3).reshape(
            grad_accum, 2 * batch_size, seq_len)
    return {k: lay(batch[k]) for k in BATCH_KEYS}


def _pair_dicts(pairs: list[tuple[np.ndarray, ...]]) -> list[dict[str, np.ndarray]]:
    return [{"chosen_ids": c, "chosen_mask": cm, "rejected_ids": r, "rejected_mask": rm} for c, cm, r, rm in pairs]


def dpo_batches(records: Sequence[Mapping[str, Any]], template: ChatTemplate, tok: Tokenizer, *, seq_len: int,
                batch_size: int, grad_accum: int = 1, seed: int = 0, process_index: int = 0,
                process_count: int = 1, on_error: OnError = "error", skipped: collections.Counter | None = None,
                template_kwargs: Mapping[str, Any] | None = None) -> grain.IterDataset:
    """Endless DPO batches of this process's share of pairs: dicts of [grad_accum, 2 * batch_size, seq_len]
    arrays (BATCH_KEYS); in each micro-batch rows 0..B-1 are the chosen sequences and rows B..2B-1 the rejected
    ones of the same B pairs in the same order. Reshuffled every epoch; too-long pairs as in sft_batches."""
    _require_generation_blocks(template)
    pairs = _nonempty(encode_preferences(_share(records, process_index, process_count), template, tok,
                                         seq_len=seq_len, on_error=on_error, skipped=skipped,
                                         template_kwargs=template_kwargs), process_index, skipped)
    ds = grain.MapDataset.source(_pair_dicts(pairs)).shuffle(seed=seed).repeat(None)
    ds = ds.map(functools.partial(_pair_rows, seq_len=seq_len)).to_iter_dataset()
    return ds.batch(grad_accum * batch_size, drop_remainder=True).map(
        functools.partial(_dpo_layout, grad_accum=grad_accum, batch_size=batch_size))


def dpo_eval_batches(records: Sequence[Mapping[str, Any]], template: ChatTemplate, tok: Tokenizer, *,
                     seq_len: int, batch_size: int, max_batches: int, process_index: int = 0,
                     process_count: int = 1, on_error: OnError = "error", skipped: collections.Counter | None = None,
                     template_kwargs: Mapping[str, Any] | None = None) -> list[dict[str, np.ndarray]]:
    """A fixed list of at most max_batches DPO evaluation batches ([2 * batch_size, seq_len] arrays, laid out as
    in dpo_batches) of this process's share in order; the last is filled with all-zero (weight-0) pairs."""
    _require_generation_blocks(template)
    pairs = _nonempty(encode_preferences(_share(records, process_index, process_count), template, tok,
                                         seq_len=seq_len, on_error=on_error, skipped=skipped,
                                         template_kwargs=template_kwargs), process_index, skipped)
    rows = (_pair_rows(p, seq_len) for p in _pair_dicts(pairs))

    def stack(chunk: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return _dpo_layout({k: np.stack([r[k] for r in chunk]) for k in BATCH_KEYS}, 1, batch_size)
    return [{k: v[0] for k, v in b.items()} for b in _fixed_batches(rows, batch_size, max_batches, stack)]
