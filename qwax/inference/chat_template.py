"""Chat templates: a checkpoint's Jinja template rendered the way transformers' `apply_chat_template` renders it.

`ChatTemplate(...).render(messages, ...)` gives the text that `tokenizer.apply_chat_template(messages, ...,
tokenize=False)` gives for the same template and special tokens; encoding it with the checkpoint's tokenizer.json
(`add_special_tokens=False`) gives the ids of `tokenize=True`. The same template variables reach the template
(messages, tools, documents, add_generation_prompt, the named special tokens, extra keyword arguments such as
enable_thinking), the inputs are normalized the same way (unset keys dropped, `reasoning` / `thinking` /
`reasoning_content` aliased) and `continue_final_message` cuts the text the same way.

A template is code shipped with a checkpoint, so it runs in Jinja's immutable sandbox with no template loader:
it cannot reach Python objects' internals, the file system (include / import / extends) or the network. Any
attempt, and any error the template raises, is a ChatTemplateError.

`render_with_assistant_spans` also returns the character spans of the template's `{% generation %}` blocks: the
text the assistant produces, for assistant-only loss masks.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np

from qwax.json_files import read_json_object

__all__ = ["ChatTemplate", "ChatTemplateError", "load_chat_template", "load_special_tokens"]

TEMPLATE_FILE = "chat_template.jinja"
# transformers writes a checkpoint's named templates other than "default" here, one NAME.jinja each.
EXTRA_TEMPLATES_DIR = "additional_chat_templates"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# Processors' older home for a template ({"chat_template": "..."}); read only when nothing else has one.
PROCESSOR_TEMPLATE_FILE = "chat_template.json"

# The special tokens transformers names (its SPECIAL_TOKENS_ATTRIBUTES); other `*_token` keys of the config are
# model-specific special tokens and reach the template too.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning comes under; templates read `reasoning_content` (gpt-oss ones `thinking`).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# Appended to the text of the message to continue, then found again in the rendering to cut there. Upper-case
# letters and a trailing space, so that templates that trim or upper-case the content cut where transformers does.
_CONTINUE_MARK = "QWAX_CONTINUE_FINAL_MESSAGE_HERE "
# Unicode noncharacters (never in interchange text) that bracket `{% generation %}` output while spans are wanted.
_SPAN_OPEN, _SPAN_CLOSE = "\ufdd0", "\ufdd1"
_SPANS_WANTED: contextvars.ContextVar[bool] = contextvars.ContextVar("qwax_chat_template_spans", default=False)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(ValueError):
    """A chat template is missing, malformed, refused the messages or tried to leave its sandbox."""


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _read_json(path: str) -> dict[str, Any]:
    return read_json_object(path, ChatTemplateError)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _templates_in_config(value: Any, path: str) -> str | dict[str, str]:
    """tokenizer_config.json's `chat_template`: one source, or named ones (a list of {"name", "template"} as
    transformers saves them, or a mapping)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for entry in value:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise ChatTemplateError(f"{path}: each entry of the chat_template list must be "
                                        f'{{"name": str, "template": str}}, got {str(entry)[:80]}')
            named[entry["name"]] = entry["template"]
        return named
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    raise ChatTemplateError(f"{path}: chat_template must be a string, a list of {{'name', 'template'}} or a "
                            f"mapping of names to templates, got {type(value).__name__}")


def _checkpoint_templates(checkpoint_dir: str) -> str | dict[str, str] | None:
    """Every template the directory holds, with transformers' precedence: the .jinja files (chat_template.jinja as
    "default", additional_chat_templates/NAME.jinja as NAME) replace whatever tokenizer_config.json holds."""
    files: dict[str, str] = {}
    main = os.path.join(checkpoint_dir, TEMPLATE_FILE)
    if os.path.isfile(main):
        files["default"] = _read_text(main)
    extra_dir = os.path.join(checkpoint_dir, EXTRA_TEMPLATES_DIR)
    if os.path.isdir(extra_dir):
        for entry in sorted(os.listdir(extra_dir)):
            path = os.path.join(extra_dir, entry)
            if entry.endswith(".jinja") and os.path.isfile(path):
                files[entry.removesuffix(".jinja")] = _read_text(path)
    if files:
        return files["default"] if list(files) == ["default"] else files
    config_path = os.path.join(checkpoint_dir, TOKENIZER_CONFIG)
    if os.path.isfile(config_path):
        config = _read_json(config_path)
        if config.get("chat_template") is not None:
            return _templates_in_config(config["chat_template"], config_path)
    processor_path = os.path.join(checkpoint_dir, PROCESSOR_TEMPLATE_FILE)
    if os.path.isfile(processor_path):
        value = _read_json(processor_path).get("chat_template")
        if value is not None:
            return _templates_in_config(value, processor_path)
    return None


def load_chat_template(checkpoint_dir: str | os.PathLike, name: str | None = None, *, tools: bool = False) -> str:
    """The source of the checkpoint's chat template.

    Read from chat_template.jinja (with additional_chat_templates/*.jinja as named templates), else
    tokenizer_config.json's `chat_template`, else a processor's chat_template.json. Among named templates the pick
    is transformers': `name` when given, else "tool_use" when `tools` are passed and the checkpoint has one, else
    "default".

    Raises FileNotFoundError for a missing directory and ChatTemplateError when there is no template or no
    template of that name (listing the names there are).
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir!r} does not exist")
    found = _checkpoint_templates(checkpoint_dir)
    if found is None:
        raise ChatTemplateError(f"{checkpoint_dir} has no chat template: looked for {TEMPLATE_FILE}, "
                                f"{EXTRA_TEMPLATES_DIR}/*.jinja and the chat_template of {TOKENIZER_CONFIG}")
    if isinstance(found, str):
        if name is not None and name != "default":
            raise ChatTemplateError(f"{checkpoint_dir} has a single chat template, none named {name!r} "
                                    "(available: ['default'])")
        return found
    if name is not None:
        if name not in found:
            raise ChatTemplateError(f"{checkpoint_dir} has no chat template named {name!r} "
                                    f"(available: {sorted(found)})")
        return found[name]
    if tools and "tool_use" in found:
        return found["tool_use"]
    if "default" in found:
        return found["default"]
    raise ChatTemplateError(f"{checkpoint_dir} has several chat templates and none is named 'default': pass one "
                            f"of {sorted(found)} as the name")


def _token_text(value: Any) -> str | None:
    # Configs store a token as its string or as a serialized AddedToken ({"content": ..., "lstrip": ...}).
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def load_special_tokens(checkpoint_dir: str | os.PathLike) -> dict[str, str]:
    """The special tokens transformers passes to the template (its tokenizer's `special_tokens_map`): the named
    ones (bos_token, eos_token, unk_token, sep_token, pad_token, cls_token, mask_token), the other (model-specific)
    `*_token` keys and a mapping `extra_special_tokens`, from tokenizer_config.json; special_tokens_map.json
    overrides them when the config has no `added_tokens_decoder` (transformers reads it only then).

    Tokens a tokenizer class sets by default without the config naming them are not known here.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    config_path = os.path.join(checkpoint_dir, TOKENIZER_CONFIG)
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    map_path = os.path.join(checkpoint_dir, SPECIAL_TOKENS_MAP)
    if "added_tokens_decoder" not in config and os.path.isfile(map_path):
        config = {**config, **_read_json(map_path)}
    tokens: dict[str, str] = {}
    for key, value in config.items():
        if key.endswith("_token"):
            text = _token_text(value)
            if text is not None:
                tokens[key] = text
    # A mapping of named extra tokens (`additional_special_tokens` is its old name) holds model-specific ones too.
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    if isinstance(extra, dict):
        for key, value in extra.items():
            text = _token_text(value)
            if text is not None:
                tokens[key] = text
    # transformers lists the named ones first; the order only matters for reading.
    return {**{k: tokens[k] for k in NAMED_SPECIAL_TOKENS if k in tokens}, **tokens}


# ---------------------------------------------------------------------------------------------------------------
# The sandbox


def _raise_exception(message: str) -> NoReturn:
    """`raise_exception(msg)` in a template: the template refuses its input."""
    raise ChatTemplateError(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Replaces Jinja's own tojson, which escapes <, >, & and ' for HTML: prompts need the characters themselves.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    """`strftime_now(fmt)`: the local time, for templates that date their system prompt."""
    return datetime.now().strftime(fmt)


class _DictHelper:
    """`dict(...)` and `dict.fromkeys(...)` in a template. Not the `dict` type itself: attribute access on a type
    reaches its method resolution order and subclasses, a way out of the sandbox."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Any, value: Any = None) -> dict:
        return dict.fromkeys(keys, value)


def _check_namespace_name(name: Any) -> None:
    # A namespace keeps its values in a name-mangled attribute: underscore names are how a template would get at
    # it (or at Python internals), and no chat template needs them.
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.sandbox.SecurityError(f"a namespace attribute may not start with an underscore, got {name!r}")


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` (the object `{% set ns.x = ... %}` writes to) refusing underscore names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - like Jinja's, so that `namespace(self=1)` works
        self, rest = args[0], args[1:]
        values = dict(*rest, **kwargs)
        for name in values:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, values)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        super().__setitem__(name, value)


class _GenerationExtension(jinja2.ext.Extension):
    """The `{% generation %}...{% endgeneration %}` block: renders its body, bracketed by span markers while
    `render_with_assistant_spans` runs. Markers (rather than counting characters already yielded) keep the spans
    right when the block's output is buffered, e.g. inside a macro or a `{% set %}` block."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation", []), [], [], body).set_lineno(lineno)

    def _generation(self, caller: Callable[[], str]) -> str:
        body = caller()
        return f"{_SPAN_OPEN}{body}{_SPAN_CLOSE}" if _SPANS_WANTED.get() else body


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox (no method that changes a list, dict or set), stricter in two ways: an unsafe
    attribute is an error at once (Jinja's own sandbox returns an undefined value that only fails when used, so
    `{{ self._TemplateReference__context }}` would print nothing instead of failing), and loading a template
    (include, import, extends) is refused."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        if jinja2.sandbox.modifies_known_mutable(obj, attribute):
            raise ChatTemplateError(f"the chat template tried to modify a {type(obj).__name__} ({attribute}): "
                                    "templates may not change their inputs; build new values instead")
        raise jinja2.sandbox.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} object is unsafe")

    def _refuse_loading(self, name: Any) -> NoReturn:
        raise jinja2.sandbox.SecurityError(f"loading the template {name!r} (include, import or extends) is not "
                                           "allowed: a chat template may not read files")

    def get_template(self, name: Any, *args: Any, **kwargs: Any) -> NoReturn:
        self._refuse_loading(name)

    def select_template(self, names: Any, *args: Any, **kwargs: Any) -> NoReturn:
        self._refuse_loading(names)

    def get_or_select_template(self, name: Any, *args: Any, **kwargs: Any) -> NoReturn:
        self._refuse_loading(name)


def _environment() -> _Sandbox:
    # No loader: the environment has no way to reach a file even if the overrides above were bypassed.
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationExtension, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictHelper()
    env.globals["namespace"] = _Namespace
    return env


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def _plain(value: Any) -> Any:
    """`value` rebuilt from plain JSON-like types (str, int, float, bool, None, dict, list, tuple), as transformers
    does: a template must not see objects with methods of their own (string subclasses, numpy scalars, pydantic
    models, images, arrays). Dataclasses and pydantic models become dicts; anything else a "<TypeName>" string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of message dicts, got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("cannot render an empty conversation: give at least one message")
    chat = []
    for i, message in enumerate(messages):
        if isinstance(message, Sequence) and not isinstance(message, str):
            raise ChatTemplateError("render takes one conversation (a list of messages), not a batch of them")
        message = _plain(message)
        if not isinstance(message, dict):
            raise ChatTemplateError(f"messages[{i}] must be a dict (or a dataclass / pydantic model), "
                                    f"got {str(message)[:80]}")
        # Unset fields are left out rather than passed as None: APIs send content=None / tool_calls=None, and
        # templates test for a missing key but print a None as "None".
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            # Whichever name the reasoning came under, the template finds it under the standard name (and under
            # `thinking`, which gpt-oss templates read, unless the message sets that itself).
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence):
        raise ChatTemplateError(f"tools must be a list of JSON-schema dicts, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        if callable(tool) and not isinstance(tool, Mapping):
            raise ChatTemplateError(f"tools[{i}] is the function {getattr(tool, '__name__', tool)!r}: qwax takes "
                                    "tools as JSON-schema dicts (transformers.utils.get_json_schema writes one)")
        if not isinstance(tool, Mapping):
            raise ChatTemplateError(f"tools[{i}] must be a JSON-schema dict, got {type(tool).__name__}")
    return _plain(list(tools))


def _documents(documents: Any) -> list[dict[str, Any]] | None:
    if documents is None:
        return None
    if isinstance(documents, (str, Mapping)) or not isinstance(documents, Sequence):
        raise ChatTemplateError(f"documents must be a list of dicts, got {type(documents).__name__}")
    for i, document in enumerate(documents):
        if not isinstance(document, Mapping):
            raise ChatTemplateError(f"documents[{i}] must be a dict (e.g. with 'title' and 'text'), "
                                    f"got {type(document).__name__}")
    return _plain(list(documents))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


# ---------------------------------------------------------------------------------------------------------------
# The template


class ChatTemplate:
    """A compiled chat template.

    source: the Jinja source; special_tokens: the named special tokens the template may read (bos_token,
    eos_token, ...), as `load_special_tokens` gives them. Compiling checks the syntax (ChatTemplateError).
    """

    def __init__(self, source: str, *, special_tokens: Mapping[str, str] | None = None) -> None:
        if not isinstance(source, str):
            raise ChatTemplateError(f"a chat template is Jinja source text, got {type(source).__name__}")
        self.source = source
        self.special_tokens: dict[str, str] = {str(k): str(v) for k, v in (special_tokens or {}).items()}
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from None

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | os.PathLike, name: str | None = None, *,
                        tools: bool = False) -> ChatTemplate:
        """The checkpoint's template (`load_chat_template(checkpoint_dir, name, tools=tools)`) with its special
        tokens (`load_special_tokens`)."""
        return cls(load_chat_template(checkpoint_dir, name, tools=tools),
                   special_tokens=load_special_tokens(checkpoint_dir))

    @property
    def has_generation_blocks(self) -> bool:
        """Whether the source marks assistant text with `{% generation %}` (else spans are always empty)."""
        return bool(_GENERATION_TAG.search(self.source))

    def render(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
               documents: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = False,
               continue_final_message: bool | str = False, **template_kwargs: Any) -> str:
        """The prompt text, as `apply_chat_template(messages, ..., tokenize=False)` gives it.

        tools: JSON-schema dicts; documents: dicts (e.g. "title", "text"); add_generation_prompt: end with the
        header of a new assistant turn; continue_final_message: end inside the final message instead, for the model
        to continue it (True: its "content"; a field name, e.g. "reasoning_content": that field), not together with
        add_generation_prompt; template_kwargs: further template variables (enable_thinking, preserve_thinking,
        ...), which override special tokens of the same name.
        """
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be set: the first "
                                    "continues the final message, the second starts a new assistant message")
        chat = _messages(messages)
        cut = self._mark_continuation(chat, continue_final_message) if continue_final_message else None
        text = self._render(chat, tools, documents, add_generation_prompt, template_kwargs, spans=False)
        return text if cut is None else self._cut(text, cut)

    def render_with_assistant_spans(
            self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
            documents: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = False,
            continue_final_message: bool | str = False, **template_kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
        """`render`'s text and the [start, end) character spans of its `{% generation %}` blocks, in order (the
        assistant-generated text, for assistant-only loss masks; empty when the template has no such block).
        A block inside another counts as part of the outer one. Not with continue_final_message (as in
        transformers, whose assistant masks refuse it too)."""
        if continue_final_message:
            raise ChatTemplateError("continue_final_message cannot be combined with assistant spans")
        chat = _messages(messages)
        text = self._render(chat, tools, documents, add_generation_prompt, template_kwargs, spans=True)
        return self._split_spans(text)

    # -- internals

    def _render(self, chat: list[dict[str, Any]], tools: Any, documents: Any, add_generation_prompt: bool,
                template_kwargs: dict[str, Any], *, spans: bool) -> str:
        variables = _plain({**self.special_tokens, **template_kwargs})
        tools, documents = _tools(tools), _documents(documents)
        if spans and any(_SPAN_OPEN in s or _SPAN_CLOSE in s for s in _strings([chat, tools, documents, variables])):
            raise ChatTemplateError("the inputs contain U+FDD0 / U+FDD1, which mark assistant spans")
        token = _SPANS_WANTED.set(spans)
        try:
            return self._template.render(messages=chat, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except ChatTemplateError:
            raise
        except jinja2.sandbox.SecurityError as e:
            raise ChatTemplateError(f"the chat template tried to reach Python internals or the file system and was "
                                    f"refused: {e}") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from e
        except Exception as e:  # a template is code: any failure in it is the template's, not the caller's
            raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from e
        finally:
            _SPANS_WANTED.reset(token)

    def _mark_continuation(self, chat: list[dict[str, Any]], continue_final_message: bool | str) -> str:
        """Append the continuation mark to the final message's text to continue; return that text."""
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final = chat[-1]
        value = final.get(field)
        if value is None:
            raise ChatTemplateError(f"continue_final_message is set but the final message has no {field!r} "
                                    "to continue")
        # Reasoning is aliased under several names: mark every copy, whichever the template reads.
        fields = [f for f in REASONING_FIELDS if final.get(f) == value] if field in REASONING_FIELDS else [field]
        if not any(f in self.source for f in fields):
            raise ChatTemplateError(f"continue_final_message is set to {field!r}, a field this chat template "
                                    "never reads")
        if isinstance(value, (list, tuple)):
            for part in reversed(value):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    continued = part["text"]
                    part["text"] = continued + _CONTINUE_MARK
                    return continued
            raise ChatTemplateError("continue_final_message is set but the final message has no text part "
                                    "to continue")
        if not isinstance(value, str):
            raise ChatTemplateError(f"continue_final_message: the final message's {field!r} must be text or a "
                                    f"list of parts, got {type(value).__name__}")
        for f in fields:
            final[f] = final[f] + _CONTINUE_MARK
        return value

    @staticmethod
    def _cut(text: str, continued: str) -> str:
        """The rendering up to where the continued text ends."""
        mark = _CONTINUE_MARK.strip()
        if continued.strip() not in text or mark not in text:
            raise ChatTemplateError("continue_final_message is set but the chat template does not render the final "
                                    f"message whole, so there is no place to continue it; final message: "
                                    f"{continued.strip()[:200]!r}")
        at = text.rindex(mark)
        # A template that keeps the message's spacing shows the whole mark; one that trimmed it also trimmed the
        # message's own trailing spaces, so those go too.
        return text[:at] if text.startswith(_CONTINUE_MARK, at) else text[:at].rstrip()

    @staticmethod
    def _split_spans(marked: str) -> tuple[str, list[tuple[int, int]]]:
        """Remove the span markers; return the text and the spans of the outermost blocks."""
        pieces, spans, depth, start, length = [], [], 0, 0, 0
        for piece in re.split(f"([{_SPAN_OPEN}{_SPAN_CLOSE}])", marked):
            if piece == _SPAN_OPEN:
                if depth == 0:
                    start = length
                depth += 1
            elif piece == _SPAN_CLOSE:
                depth -= 1
                if depth < 0:
                    raise ChatTemplateError("the chat template's {% generation %} output was cut apart")
                if depth == 0:
                    spans.append((start, length))
            else:
                pieces.append(piece)
                length += len(piece)
        if depth != 0:
            raise ChatTemplateError("the chat template's {% generation %} output was cut apart")
        return "".join(pieces), spans
