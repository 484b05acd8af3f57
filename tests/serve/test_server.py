"""`qwax serve` against the real `openai` client: parity with transformers' greedy generate on the chat
template's prompt, streaming, usage, reasoning and tool calls, concurrent batching, auth and bad requests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serve_checkpoint import CONTEXT, VOCAB

pytestmark = pytest.mark.slow

API_KEY = "test-key-123"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint):
    """`qwax serve` in a subprocess; yields its base URL once /health answers."""
    path, _ = checkpoint
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "qwax.cli", "serve", "--checkpoint", str(path), "--port",
                             str(port), "--api-key", API_KEY, "--max-batch", "8", "--model-name", "tiny",
                             "--max-body-bytes", "65536"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:  # poll until the server answers (bounded), not a bet on how long loading takes
        if proc.poll() is not None:
            raise RuntimeError(f"qwax serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"qwax serve did not answer /health in 180 s:\n{proc.stdout.read()}")
        time.sleep(0.2)
    yield base
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    # One log line per request, with its token counts.
    assert "POST /v1/chat/completions 200 prompt_tokens=" in out, out[-3000:]


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint[0])


def _hf_greedy(checkpoint, hf_tokenizer, messages, max_new_tokens, **template_kwargs) -> tuple[list[int], list[int]]:
    """(prompt ids, generated ids without the stop id) from transformers on the apply_chat_template prompt."""
    import torch
    from transformers import GenerationConfig

    _, hf = checkpoint
    prompt = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False, **template_kwargs)
    eos = GenerationConfig.from_pretrained(checkpoint[0]).eos_token_id
    with torch.no_grad():
        out = hf.generate(torch.as_tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
    new = out[0, len(prompt):].tolist()
    if new and new[-1] in eos:
        new = new[:-1]
    return prompt, new


def test_greedy_chat_equals_transformers_and_streams_the_same_text(client, checkpoint, hf_tokenizer):
    prompt, new = _hf_greedy(checkpoint, hf_tokenizer, MESSAGES, 24, enable_thinking=False)
    expected = hf_tokenizer.decode(new, skip_special_tokens=True)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=24,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    choice = r.choices[0]
    assert choice.message.content == expected
    assert choice.finish_reason == ("length" if len(new) == 24 else "stop")
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == min(len(new) + 1, 24)  # the stop token counts when generated
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    text, reasons, usage = "", [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert text == expected
    assert reasons == [choice.finish_reason]
    assert (usage.prompt_tokens, usage.completion_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens)


def test_thinking_prompt_puts_the_output_in_reasoning_content(client, checkpoint, hf_tokenizer):
    """With thinking on the prompt opens the think block, so (until the model closes it) the text is reasoning."""
    _, new = _hf_greedy(checkpoint, hf_tokenizer, MESSAGES, 12, enable_thinking=True)
    from qwax.inference.reasoning import split_reasoning

    reasoning, content = split_reasoning(hf_tokenizer.decode(new, skip_special_tokens=True),
                                         started_in_reasoning=True)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=12)
    message = r.choices[0].message
    assert message.model_extra.get("reasoning_content") == (reasoning or None)
    assert (message.content or "") == content


def test_completions_endpoint_equals_transformers(client, checkpoint, hf_tokenizer):
    import torch

    _, hf = checkpoint
    ids = hf_tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = hf.generate(torch.as_tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    expected = hf_tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == expected
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 16)


def test_eight_concurrent_clients_get_the_tokens_they_get_alone(client, server):
    prompts = [f"Tell me about the number {i}." * (1 + i % 3) for i in range(8)]
    kinds = [dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=11), dict(temperature=1.0, top_k=5, seed=3),
             dict(temperature=0, presence_penalty=1.5), dict(temperature=0.7, seed=5, frequency_penalty=0.5),
             dict(temperature=0, repetition_penalty=1.3), dict(temperature=1.2, seed=8), dict(temperature=0)]

    def ask(i: int) -> tuple[str, int]:
        kw = {k: v for k, v in kinds[i].items() if k not in ("top_k", "repetition_penalty")}
        extra = {k: v for k, v in kinds[i].items() if k in ("top_k", "repetition_penalty")}  # vLLM's extras
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompts[i]}],
                                           max_tokens=10 + i, extra_body={"ignore_eos": True, **extra,
                                           "chat_template_kwargs": {"enable_thinking": False}}, **kw)
        return r.choices[0].message.content, r.usage.completion_tokens

    alone = [ask(i) for i in range(8)]
    before = _health(server)["batches"]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == alone
    assert [n for _, n in together] == [10 + i for i in range(8)]
    assert _health(server)["batches"] - before < 8  # some of the concurrent requests shared a batch


def _health(server: str) -> dict:
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        return json.loads(r.read())


def test_n_choices_and_seeds(client):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.0, extra_body={
        "ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}})
    a = client.chat.completions.create(n=3, seed=1, **kw)
    b = client.chat.completions.create(n=3, seed=1, **kw)
    c = client.chat.completions.create(n=1, seed=1, **kw)
    texts = [ch.message.content for ch in a.choices]
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts == [ch.message.content for ch in b.choices]
    assert c.choices[0].message.content == texts[0]  # choice i draws from fold_in(seed, i) whatever n is
    assert len(set(texts)) > 1
    assert a.usage.completion_tokens == 24


def test_stop_strings_cut_the_text(client):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = full[5:8]
    assert stop and full.find(stop) == 5
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == full[:5]
    assert r.choices[0].finish_reason == "stop"


def test_models_and_auth(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    import openai

    wrong = openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert e.value.status_code == 401
    request = urllib.request.Request(server + "/v1/models")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 401 and "error" in json.loads(e.value.read())


def _post(server: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(server + path, data=body, method="POST", headers={
        "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


BAD_REQUESTS = [
    ("malformed JSON", b'{"messages": [', 400, None),
    ("missing messages", _json({"model": "tiny"}), 400, "messages"),
    ("empty messages", _json({"messages": []}), 400, "messages"),
    ("unknown role", _json({"messages": [{"role": "wizard", "content": "hi"}]}), 400, "messages.0.role"),
    ("prompt longer than the context", _json({"messages": [{"role": "user", "content": "word " * CONTEXT}]}),
     400, None),
    ("max_tokens too large", _json({"messages": MESSAGES, "max_tokens": 100_000}), 400, "max_tokens"),
    ("negative temperature", _json({"messages": MESSAGES, "temperature": -1}), 400, "temperature"),
    ("unknown field", _json({"messages": MESSAGES, "frobnicate": 1}), 400, "frobnicate"),
    ("logprobs", _json({"messages": MESSAGES, "logprobs": True}), 400, None),
    ("unknown model", _json({"model": "gpt-9", "messages": MESSAGES}), 404, "model"),
    ("n over --max-batch", _json({"messages": MESSAGES, "n": 9}), 400, "n"),
    ("oversized body", _json({"messages": [{"role": "user", "content": "x" * 70_000}]}), 413, None),
    ("tool call arguments not JSON", _json({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                              "function": {"name": "f", "arguments": "{oops"}}]}]}), 400, None),
]


@pytest.mark.parametrize("name,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, client, name, body, status, param):
    code, answer = _post(server, "/v1/chat/completions", body)
    assert code == status, answer
    error = answer["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_completions_bad_token_ids(server):
    code, answer = _post(server, "/v1/completions", _json({"prompt": [1, 2, VOCAB + 5], "max_tokens": 2}))
    assert code == 400 and "vocabulary" in answer["error"]["message"]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "days": {"type": "integer"}}}}}]


def test_tools_and_a_tool_round_trip_render_and_generate(client, checkpoint, hf_tokenizer):
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 3})}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=6, temperature=0,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    template_messages = [dict(m) for m in messages]
    template_messages[1] = {**messages[1], "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}]}
    prompt = hf_tokenizer.apply_chat_template(template_messages, tools=TOOLS, add_generation_prompt=True,
                                              tokenize=True, return_dict=False, enable_thinking=False)
    assert r.usage.prompt_tokens == len(prompt)
