"""Chat templates against transformers' `apply_chat_template`: the text and the token ids for every combination of
system prompt, history with reasoning, tools, enable_thinking and add_generation_prompt, on qwax's Qwen3.5 template
and a ChatML / Hermes-style one; continue_final_message; named templates; special tokens; the sandbox."""

from __future__ import annotations

import copy
import itertools
import json
import re
from datetime import datetime
from importlib import resources

import pytest

from qwax.inference.chat_template import (ChatTemplate, ChatTemplateError, load_chat_template,
                                          load_special_tokens)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

QWEN_TEMPLATE = (resources.files("qwax") / "inference" / "templates" / "qwen3_5.jinja").read_text(encoding="utf-8")

# A second template, unlike the Qwen3.5 one in style (literal text under trim_blocks / lstrip_blocks rather than
# expressions) and in what it uses: namespace, dict, tojson options, loop.last / loop.index, break / continue,
# selectattr / map / join, raise_exception, documents, the eos_token variable and {% generation %}.
CHATML_HERMES = """\
{%- set ns = namespace(system=none) -%}
{%- if messages[0].role == 'system' -%}{%- set ns.system = messages[0].content -%}{%- endif -%}
{% if tools or documents or ns.system is not none %}
<|im_start|>system
{% if ns.system is not none %}{{ ns.system }}{% endif %}
{% if tools %}

You may call these tools:
<tools>
{% for tool in tools %}
{{ tool | tojson(sort_keys=true) }}{% if not loop.last %}

{% endif %}
{% endfor %}

</tools>
Reply with <tool_call>{"name": ..., "arguments": ...}</tool_call> to call one.
{% endif %}
{% if documents %}
Documents:
{% for doc in documents %}
[{{ loop.index }}] {{ doc.title }}: {{ doc.text }}
{% endfor %}
{% endif %}
<|im_end|>
{% endif %}
{% for message in messages %}
{% if message.role == 'system' %}
{% if not loop.first %}{{ raise_exception('System message must come first, not at ' ~ loop.index0) }}{% endif %}
{% continue %}
{% elif message.role not in ['user', 'assistant', 'tool'] %}
{{ raise_exception('Unsupported role ' ~ message.role) }}
{% endif %}
{% if message.content is string %}
{% set text = message.content %}
{% else %}
{% set text = message.content | default([]) | selectattr('type', 'equalto', 'text') | map(attribute='text')
   | join('\n') %}
{% endif %}
{% if message.role == 'assistant' %}
<|im_start|>assistant
{% generation %}
{% if message.reasoning_content and (enable_thinking is not defined or enable_thinking) %}
<think>{{ message.reasoning_content | trim }}</think>
{% endif %}
{{ text }}
{% for call in message.tool_calls | default([]) %}
{% set fn = call.function if call.function is defined else call %}
<tool_call>{{ dict(name=fn.name, arguments=fn.arguments) | tojson(separators=(',', ':')) }}</tool_call>
{% if loop.index >= 4 %}{% break %}{% endif %}
{% endfor %}
{{ eos_token }}{% endgeneration %}

{% elif message.role == 'tool' %}
<|im_start|>tool
<tool_response>{{ text }}</tool_response><|im_end|>
{% else %}
<|im_start|>user
{{ text }}<|im_end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think></think>
{% endif %}
{% endif %}
"""

TEMPLATES = {"qwen3_5": QWEN_TEMPLATE, "chatml_hermes": CHATML_HERMES}

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
NON_SPECIAL = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
          "pad_token": "<|endoftext|>", "unk_token": None, "image_token": "<|image_pad|>",
          "extra_special_tokens": {"video_token": "<|video_pad|>"}}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city, in °C.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                         "units": {"type": "object"}, "hours": {"type": "array"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert", "description": "Convert <units> & such",
        "parameters": {"type": "object", "properties": {"value": {"type": "number"}}, "required": ["value"]}}},
]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
HISTORY = [
    {"role": "user", "content": "What is two plus two?"},
    # `reasoning` is an alias transformers (and qwax) turn into reasoning_content.
    {"role": "assistant", "content": "It is four.", "reasoning": "\nTwo plus two is four.\n"},
    {"role": "user", "content": [{"type": "text", "text": "Look at this"}, {"type": "image"},
                                 {"type": "text", "text": " picture."}]},
    {"role": "assistant", "content": "<think>\nA picture of Paris.\n</think>\n\nIt shows Paris.", "tool_calls": None},
]
QUERY = {"role": "user", "content": "What's the weather in Paris, and 21 °C in °F?"}
TOOL_TURNS = [
    {"role": "assistant", "content": None, "reasoning_content": "I need two tools.",
     "tool_calls": [
         {"id": "call_1", "type": "function", "function": {
             "name": "get_weather",
             "arguments": {"city": "Paris", "days": 2, "units": {"t": "C"}, "hours": [9, 18]}}},
         {"name": "convert", "arguments": {"value": 21.0}},
     ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 °C."},
    {"role": "tool", "content": [{"type": "text", "text": "69.8"}]},
]
FINAL_ANSWER = {"role": "assistant", "content": "Sunny and 21 °C (69.8 °F).", "reasoning_content": "Both came back."}
FINAL_NO_TOOLS = {"role": "assistant", "content": "I cannot check the weather.", "thinking": "No tools here."}


def conversation(system: bool, history: bool, tools: bool, final_answer: bool) -> tuple[list[dict], list | None]:
    messages = ([SYSTEM] if system else []) + (HISTORY if history else []) + [QUERY]
    if tools:
        messages += TOOL_TURNS
    if final_answer:
        messages.append(FINAL_ANSWER if tools else FINAL_NO_TOOLS)
    return copy.deepcopy(messages), (copy.deepcopy(TOOLS) if tools else None)


def train_tokenizer():
    """A tiny byte-level BPE with Qwen's control tokens as added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([
        "The weather in Paris is sunny today.", "What is two plus two? It is four.",
        "You are a helpful assistant.", '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        "<parameter=city>\nParis\n</parameter>\n</function>"], trainer)
    tok.add_special_tokens(SPECIAL)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL])
    return tok


def write_checkpoint(path, template: str | None = None, config: dict | None = None):
    """A directory as transformers saves a tokenizer: tokenizer.json, tokenizer_config.json, chat_template.jinja."""
    path.mkdir(parents=True, exist_ok=True)
    TOKENIZER.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(CONFIG if config is None else config), encoding="utf-8")
    if template is not None:
        (path / "chat_template.jinja").write_text(template, encoding="utf-8")
    return path


TOKENIZER = train_tokenizer()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (checkpoint dir, transformers tokenizer, qwax ChatTemplate) for each template."""
    out = {}
    for name, source in TEMPLATES.items():
        d = write_checkpoint(tmp_path_factory.mktemp(name), source)
        out[name] = (d, transformers.AutoTokenizer.from_pretrained(str(d)), ChatTemplate.from_checkpoint(d))
    return out


def assistant_mask(text: str, spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token overlapping a span (how transformers builds `assistant_masks` from the same spans)."""
    offsets = TOKENIZER.encode(text, add_special_tokens=False).offsets
    return [int(any(s < end and start < e for s, e in spans)) for start, end in offsets]


def assert_parity(hf, ours: ChatTemplate, messages, tools=None, *, spans: bool = True, **kwargs):
    """Same text, same ids (qwax: the tokenizers library on tokenizer.json), same assistant masks."""
    before = copy.deepcopy(messages)
    expected = hf.apply_chat_template(copy.deepcopy(messages), tools=copy.deepcopy(tools), tokenize=False, **kwargs)
    text = ours.render(messages, tools=tools, **kwargs)
    assert text == expected
    assert messages == before, "render changed the caller's messages"
    ids = hf.apply_chat_template(copy.deepcopy(messages), tools=copy.deepcopy(tools), tokenize=True,
                                 return_dict=False, **kwargs)
    assert TOKENIZER.encode(text, add_special_tokens=False).ids == list(ids)
    if spans:
        out = hf.apply_chat_template(copy.deepcopy(messages), tools=copy.deepcopy(tools), tokenize=True,
                                     return_dict=True, return_assistant_tokens_mask=True, **kwargs)
        span_text, found = ours.render_with_assistant_spans(messages, tools=tools, **kwargs)
        assert span_text == text
        assert assistant_mask(text, found) == list(out["assistant_masks"])
        assert sum(out["assistant_masks"]) > 0 or not any(m["role"] == "assistant" for m in messages)
    return text


COMBOS = list(itertools.product([False, True], [False, True], [False, True], [False, True], [True, False, None],
                                [False, True]))


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("system,history,tools,final_answer,thinking,add_prompt", COMBOS,
                         ids=[f"sys{int(s)}-hist{int(h)}-tools{int(t)}-final{int(f)}-think{k}-gen{int(g)}"
                              for s, h, t, f, k, g in COMBOS])
def test_matches_transformers(checkpoints, template, system, history, tools, final_answer, thinking, add_prompt):
    _, hf, ours = checkpoints[template]
    messages, tool_list = conversation(system, history, tools, final_answer)
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    assert_parity(hf, ours, messages, tool_list, add_generation_prompt=add_prompt, **kwargs)


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_extra_variables_and_documents_match_transformers(checkpoints, template):
    _, hf, ours = checkpoints[template]
    messages, tools = conversation(True, True, True, True)
    documents = [{"title": "Paris", "text": "Capital of France."}, {"title": "Lyon", "text": "On the Rhône."}]
    for kwargs in ({"preserve_thinking": True}, {"preserve_thinking": False, "enable_thinking": True},
                   {"documents": documents}, {"eos_token": "<|endoftext|>"}):
        assert_parity(hf, ours, messages, tools, **kwargs)


def test_special_tokens_as_transformers_passes_them(checkpoints, tmp_path):
    d, hf, ours = checkpoints["qwen3_5"]
    assert ours.special_tokens == hf.special_tokens_map == load_special_tokens(d)
    assert ours.special_tokens["eos_token"] == "<|im_end|>" and ours.special_tokens["video_token"] == "<|video_pad|>"
    # Older checkpoints: special_tokens_map.json (AddedToken dicts), read when the config has no added_tokens_decoder.
    legacy = write_checkpoint(tmp_path / "legacy", "{{ eos_token }}|{{ pad_token }}", {"eos_token": "<|endoftext|>"})
    (legacy / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
        "pad_token": "<|endoftext|>"}), encoding="utf-8")
    hf_legacy = transformers.AutoTokenizer.from_pretrained(str(legacy))
    assert load_special_tokens(legacy) == hf_legacy.special_tokens_map
    msgs = [{"role": "user", "content": "hi"}]
    assert ChatTemplate.from_checkpoint(legacy).render(msgs) == hf_legacy.apply_chat_template(msgs, tokenize=False)


# -- continue_final_message


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_continue_final_message_matches_transformers(checkpoints, template):
    _, hf, ours = checkpoints[template]
    base, tools = conversation(True, True, False, False)
    cases = [
        base + [{"role": "assistant", "content": "The weather is"}],
        base + [{"role": "assistant", "content": "Spaces kept  "}],
        base + [{"role": "assistant", "content": "<think>\nLet me see.\n</think>\n\nIt is"}],
        base + [{"role": "assistant", "content": [{"type": "text", "text": "Parts: "}, {"type": "text",
                                                                                           "text": "the last"}]}],
        base + [{"role": "user", "content": "Finish this sentence:"}],
    ]
    for messages in cases:
        text = assert_parity(hf, ours, messages, tools, spans=False, continue_final_message=True)
        final = messages[-1]["content"]
        final = final if isinstance(final, str) else final[-1]["text"]
        assert text.rstrip().endswith(final.split("</think>")[-1].lstrip("\n").rstrip())


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_continue_reasoning_matches_transformers(checkpoints, template):
    _, hf, ours = checkpoints[template]
    # The Hermes template trims the reasoning (and so the continuation mark's space): the cut falls back to rstrip.
    for field in ("reasoning_content", "thinking"):
        messages = [QUERY, {"role": "assistant", field: "Let me think about "}]
        text = assert_parity(hf, ours, messages, spans=False, continue_final_message=field)
        assert text.endswith("Let me think about" + (" " if template == "qwen3_5" else ""))
        if template == "qwen3_5":
            assert text.endswith("<|im_start|>assistant\n<think>\nLet me think about ")


def test_continue_final_message_errors(checkpoints):
    _, hf, ours = checkpoints["qwen3_5"]
    messages = [QUERY, {"role": "assistant", "content": "The weather is"}]
    with pytest.raises(ValueError, match="continue_final_message"):
        hf.apply_chat_template(messages, tokenize=False, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match="continue_final_message and add_generation_prompt"):
        ours.render(messages, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match="no 'reasoning_content' to continue"):
        ours.render(messages, continue_final_message="reasoning_content")
    with pytest.raises(ChatTemplateError, match="never reads"):
        ours.render(messages + [{"role": "assistant", "content": "x", "mood": "ok"}], continue_final_message="mood")
    # The template drops the final message: nowhere to continue.
    with pytest.raises(ChatTemplateError, match="does not render the final message"):
        ChatTemplate("{{ messages[0].content }}").render(messages, continue_final_message=True)


# -- named templates


def test_named_templates_select_as_transformers(tmp_path):
    named = {"default": "default:{{ messages[-1].content }}",
             "tool_use": "tools:{{ (tools or []) | length }}:{{ messages[-1].content }}",
             "terse": "terse:{{ messages[-1].content | upper }}"}
    config = {**CONFIG, "chat_template": [{"name": k, "template": v} for k, v in named.items()]}
    d = write_checkpoint(tmp_path / "named", None, config)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    msgs = [{"role": "user", "content": "hi"}]

    def check(directory, hf_tok):
        for name, tools in [(None, None), (None, TOOLS), ("terse", None), ("terse", TOOLS), ("default", TOOLS),
                            ("tool_use", None)]:
            expected = hf_tok.apply_chat_template(msgs, tools=tools, chat_template=name, tokenize=False)
            got = ChatTemplate.from_checkpoint(directory, name, tools=tools is not None).render(msgs, tools=tools)
            assert got == expected, (name, tools)

    check(d, hf)
    assert load_chat_template(d) == named["default"] and load_chat_template(d, tools=True) == named["tool_use"]
    with pytest.raises(ChatTemplateError, match=r"no chat template named 'chatty' \(available: \['default', "
                                                r"'terse', 'tool_use'\]\)"):
        load_chat_template(d, "chatty")

    # What transformers writes for named templates (chat_template.jinja + additional_chat_templates/NAME.jinja)
    # reads back the same.
    saved = tmp_path / "saved"
    hf.save_pretrained(str(saved))
    assert (saved / "additional_chat_templates" / "tool_use.jinja").is_file()
    check(saved, transformers.AutoTokenizer.from_pretrained(str(saved)))

    # A mapping in the config, without a default: transformers and qwax both want a name.
    no_default = write_checkpoint(tmp_path / "nodefault", None,
                                  {**CONFIG, "chat_template": {"a": "A{{ messages | length }}", "b": "B"}})
    with pytest.raises(ValueError, match="no default"):
        transformers.AutoTokenizer.from_pretrained(str(no_default)).apply_chat_template(msgs, tokenize=False)
    with pytest.raises(ChatTemplateError, match=r"none is named 'default'.*\['a', 'b'\]"):
        load_chat_template(no_default)
    assert ChatTemplate.from_checkpoint(no_default, "a").render(msgs) == "A1"


def test_template_sources_and_missing_templates(tmp_path):
    # A string chat_template in tokenizer_config.json; chat_template.jinja takes precedence over it, as in
    # transformers.
    d = write_checkpoint(tmp_path / "config", None, {**CONFIG, "chat_template": "config:{{ messages | length }}"})
    msgs = [{"role": "user", "content": "hi"}]
    assert ChatTemplate.from_checkpoint(d).render(msgs) == "config:1"
    (d / "chat_template.jinja").write_text("file:{{ messages | length }}", encoding="utf-8")
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    assert ChatTemplate.from_checkpoint(d).render(msgs) == hf.apply_chat_template(msgs, tokenize=False) == "file:1"
    assert load_chat_template(d, "default") == "file:{{ messages | length }}"
    with pytest.raises(ChatTemplateError, match=r"single chat template, none named 'tool_use'"):
        load_chat_template(d, "tool_use")
    assert load_chat_template(d, tools=True) == "file:{{ messages | length }}"

    empty = write_checkpoint(tmp_path / "none", None)
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        ChatTemplate.from_checkpoint(empty)
    with pytest.raises(FileNotFoundError):
        load_chat_template(tmp_path / "missing")
    (empty / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ChatTemplateError, match="not valid JSON"):
        load_chat_template(empty)


# -- errors and the sandbox


def test_raise_exception_is_a_chat_template_error(checkpoints):
    _, hf, ours = checkpoints["qwen3_5"]
    for messages, message in [([{"role": "narrator", "content": "Once"}], "unknown message role: narrator"),
                              ([QUERY, SYSTEM], "a system message may only be the first message")]:
        with pytest.raises(Exception) as hf_error:
            hf.apply_chat_template(messages, tokenize=False)
        with pytest.raises(ChatTemplateError) as ours_error:
            ours.render(messages)
        assert str(ours_error.value) == str(hf_error.value) == message
    _, _, chatml = checkpoints["chatml_hermes"]
    with pytest.raises(ChatTemplateError, match="Unsupported role narrator"):
        chatml.render([{"role": "narrator", "content": "Once"}])


def test_bad_inputs_are_named():
    t = ChatTemplate(QWEN_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        t.render([])
    with pytest.raises(ChatTemplateError, match="one conversation"):
        t.render([[QUERY]])
    with pytest.raises(ChatTemplateError, match="is the function 'get_weather'"):
        def get_weather(city: str) -> str:
            """The weather."""
        t.render([QUERY], tools=[get_weather])
    with pytest.raises(ChatTemplateError, match="documents\\[0\\] must be a dict"):
        t.render([QUERY], documents=["text"])
    with pytest.raises(ChatTemplateError, match="syntax error at line 2"):
        ChatTemplate("ok\n{% if %}")
    with pytest.raises(ChatTemplateError, match="TypeError"):  # a failure inside the template is the template's
        ChatTemplate("{{ messages | items | list }}").render([QUERY])


@pytest.mark.parametrize("source", [
    "{{ cycler.__init__.__globals__ }}",
    "{{ ''.__class__.__mro__ }}",
    "{{ namespace(_x=1) }}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ self._TemplateReference__context }}",
    "{{ dict.__class__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
])
def test_sandbox_refuses_python_internals(source):
    with pytest.raises(ChatTemplateError, match="tried to reach Python internals or the file system and was refused"):
        ChatTemplate(source).render([QUERY])


@pytest.mark.parametrize("tag", ["{% include PATH %}", "{% import PATH as x %}", "{% from PATH import y %}",
                                 "{% extends PATH %}", "{% include [PATH, 'other'] %}"])
def test_sandbox_refuses_files(tmp_path, monkeypatch, tag):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for path in (str(secret), "secret.txt", "/etc/passwd"):
        with pytest.raises(ChatTemplateError, match="was refused") as e:
            ChatTemplate("before " + tag.replace("PATH", repr(path))).render([QUERY])
        assert "TOP SECRET" not in str(e.value) and "root:" not in str(e.value)


def test_sandbox_keeps_inputs_immutable():
    with pytest.raises(ChatTemplateError, match="tried to modify a list"):
        ChatTemplate("{{ messages.append(1) }}").render([QUERY])
    with pytest.raises(ChatTemplateError, match="tried to modify a dict"):
        ChatTemplate("{{ messages[0].update(role='x') }}").render([QUERY])


def test_helpers():
    t = ChatTemplate("{{ {'k': '<é&>'} | tojson }}|{{ [1, {'b': 2, 'a': 1}] | tojson(indent=1, sort_keys=true) }}|"
                     "{{ 'x' | tojson(ensure_ascii=true) }}|{{ dict(a=1) }}|{{ dict.fromkeys(['a'], 0) }}|"
                     "{% set ns = namespace(n=1) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}|{{ strftime_now('%Y') }}|"
                     "{% for i in range(5) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 3 %}{% break %}"
                     "{% endif %}{{ i }}{% endfor %}")
    out = t.render([QUERY]).split("|")
    assert out[0] == '{"k": "<é&>"}'  # no HTML escaping, no \\u escapes
    assert out[1] == json.dumps([1, {"b": 2, "a": 1}], indent=1, sort_keys=True)
    assert out[2:6] == ['"x"', "{'a': 1}", "{'a': 0}", "2"]
    assert re.fullmatch(r"\d{4}", out[6]) and abs(int(out[6]) - datetime.now().year) <= 1
    assert out[7] == "02"


def test_assistant_spans():
    t = ChatTemplate(QWEN_TEMPLATE)
    assert t.has_generation_blocks and not ChatTemplate("{{ 1 }}").has_generation_blocks
    messages, tools = conversation(True, True, True, True)
    text, spans = t.render_with_assistant_spans(messages, tools=tools)
    assert text == t.render(messages, tools=tools)
    pieces = [text[s:e] for s, e in spans]
    assert len(pieces) == 4 and all(p.endswith("<|im_end|>") for p in pieces)
    assert pieces[0] == "It is four.<|im_end|>" and pieces[-1].startswith("<think>\nBoth came back.\n</think>")
    assert all(text[s - len("<|im_start|>assistant\n"):s] == "<|im_start|>assistant\n" for s, _ in spans)
    # Spans stay right when a block's output is buffered (a macro), where counting yielded text would not.
    buffered = ChatTemplate("{% macro turn(m) %}[{% generation %}{{ m.content }}{% endgeneration %}]{% endmacro %}"
                            "{% for m in messages %}<{{ m.role }}>{{ turn(m) }}{% endfor %}")
    text, spans = buffered.render_with_assistant_spans([QUERY, {"role": "assistant", "content": "ok"}])
    assert [text[s:e] for s, e in spans] == [QUERY["content"], "ok"]
    with pytest.raises(ChatTemplateError, match="continue_final_message"):
        t.render_with_assistant_spans(messages, continue_final_message=True)


# -- the Qwen3.5 template's own behaviour


def test_qwen3_5_generation_prompt():
    t = ChatTemplate(QWEN_TEMPLATE)
    assert t.render([QUERY], add_generation_prompt=True).endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert t.render([QUERY], add_generation_prompt=True, enable_thinking=True).endswith(
        "<|im_start|>assistant\n<think>\n")
    assert t.render([QUERY], add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert t.render([QUERY]) == "<|im_start|>user\n" + QUERY["content"] + "<|im_end|>\n"


def test_qwen3_5_reasoning_history():
    t = ChatTemplate(QWEN_TEMPLATE)
    messages, tools = conversation(True, True, True, True)
    text = t.render(messages, tools=tools)
    # Before the last user message: dropped, whether given as a field or inside <think> in the content.
    assert "Two plus two is four." not in text and "A picture of Paris." not in text
    assert "<|im_start|>assistant\nIt is four.<|im_end|>" in text
    assert "<|im_start|>assistant\nIt shows Paris.<|im_end|>" in text
    # After it: kept, the tool-calling turn and the answer.
    assert "<|im_start|>assistant\n<think>\nI need two tools.\n</think>\n\n<tool_call>\n<function=get_weather>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\nBoth came back.\n</think>\n\nSunny and 21 °C (69.8 °F)."
                         "<|im_end|>\n")
    kept = t.render(messages, tools=tools, preserve_thinking=True)
    assert "<|im_start|>assistant\n<think>\nTwo plus two is four.\n</think>\n\nIt is four.<|im_end|>" in kept
    assert "<|im_start|>assistant\n<think>\nA picture of Paris.\n</think>\n\nIt shows Paris.<|im_end|>" in kept
    assert t.render(messages, tools=tools, preserve_thinking=False) == text


def test_qwen3_5_tools_layout():
    t = ChatTemplate(QWEN_TEMPLATE)
    messages, tools = conversation(True, False, True, False)
    text = t.render(messages, tools=tools)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n")
    tools_block = text.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert tools_block.split("\n") == [json.dumps(tool, ensure_ascii=False) for tool in tools]
    assert "<tool_call>\n<function=FUNCTION_NAME>\n<parameter=PARAMETER_NAME>\nVALUE\n</parameter>\n</function>\n" \
           "</tool_call>" in text
    assert ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n"
            "</parameter>\n<parameter=units>\n{\"t\": \"C\"}\n</parameter>\n<parameter=hours>\n[9, 18]\n</parameter>\n"
            "</function>\n</tool_call>\n<tool_call>\n<function=convert>\n<parameter=value>\n21.0\n</parameter>\n"
            "</function>\n</tool_call><|im_end|>\n") in text
    assert text.endswith("<|im_start|>user\n<tool_response>\nSunny, 21 °C.\n</tool_response>\n<tool_response>\n69.8\n"
                         "</tool_response><|im_end|>\n")
    # Without a system message the tools open the system turn; without tools there is no system turn.
    assert t.render(messages[1:], tools=tools).startswith("<|im_start|>system\n# Tools\n")
    assert t.render([QUERY]).startswith("<|im_start|>user\n")
    # Content before the calls is separated by a blank line; JSON-string arguments are kept verbatim.
    call = {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}]}
    assert t.render([QUERY, call]).endswith(
        "Checking.\n\n<tool_call>\n<function=get_weather>\n{\"city\": \"Lyon\"}\n</function>\n</tool_call><|im_end|>\n")


def test_qwen3_5_content_parts():
    t = ChatTemplate(QWEN_TEMPLATE)
    msg = {"role": "user", "content": [{"type": "text", "text": "A "}, {"type": "image", "image": "x.png"},
                                       {"type": "video"}, {"type": "text", "text": " B"}]}
    assert t.render([msg]) == ("<|im_start|>user\nA <|vision_start|><|image_pad|><|vision_end|>"
                               "<|vision_start|><|video_pad|><|vision_end|> B<|im_end|>\n")
    with pytest.raises(ChatTemplateError, match="unsupported content part type: audio"):
        t.render([{"role": "user", "content": [{"type": "audio"}]}])
