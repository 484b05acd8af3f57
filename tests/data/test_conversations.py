"""Conversation (SFT) and preference (DPO) data: reading, assistant masks against transformers, packing, batches."""

from __future__ import annotations

import collections
import json
import os
import re

import numpy as np
import pytest

from qwax import data as qdata
from qwax.data import build_conversations
from qwax.data.tokenizer import chat_template
from qwax.inference.chat_template import ChatTemplate
from pipeline_checks import assert_resumes_the_same
from serve_checkpoint import build_served_checkpoint

LOOKUP = {"type": "function", "function": {
    "name": "lookup_docs", "description": "Look up a docstring.",
    "parameters": {"type": "object", "properties": {"name": {"type": "string"}, "depth": {"type": "integer"}},
                   "required": ["name"]}}}
WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "Today's weather.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}

# Conversations covering what the template renders differently: a system prompt, tools, tool calls (arguments as
# JSON text and as mappings, several in a turn), consecutive tool responses, reasoning (kept in the final turn,
# dropped before the last user message), several turns, content starting with spaces, non-ASCII text.
CASES = {
    "system_and_reasoning": {"messages": [
        {"role": "system", "content": "You explain Python."},
        {"role": "user", "content": "What does json.dumps do?"},
        {"role": "assistant", "reasoning_content": "It serialises objects.", "content": "It returns JSON text."}]},
    "tools": {"tools": [LOOKUP, WEATHER], "messages": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Tell me about os.path and the weather in Zürich."},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "lookup_docs",
                                                         "arguments": '{"name": "os.path", "depth": 2}'}},
            {"id": "b", "type": "function", "function": {"name": "weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "tool_call_id": "a", "content": "Common pathname manipulations."},
        {"role": "tool", "tool_call_id": "b", "content": "Sunny, 21 °C."},
        {"role": "assistant", "reasoning": "Both answers are in.", "content": "os.path handles paths; it is sunny."}]},
    "multi_turn": {"messages": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "reasoning_content": "A greeting.", "content": "  Hello — how can I help?"},
        {"role": "user", "content": "Name a module for dates: café, naïve, 日本."},
        {"role": "assistant", "content": "datetime\n\n    import datetime"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": [{"type": "text", "text": "You're welcome."}]}]},
    "tool_call_only_then_answer": {"tools": [LOOKUP], "messages": [
        {"role": "user", "content": "Look up re."},
        {"role": "assistant", "tool_calls": [{"function": {"name": "lookup_docs", "arguments": {"name": "re"}}}]},
        {"role": "tool", "content": "Support for regular expressions (RE)."},
        {"role": "assistant", "content": "re supports regular expressions."}]},
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(transformers tokenizer, qwax ChatTemplate, qwax tokenizer) of the tiny served checkpoint."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("served")
    build_served_checkpoint(path)
    return (transformers.AutoTokenizer.from_pretrained(str(path)), ChatTemplate.from_checkpoint(path),
            qdata.load_tokenizer(str(path)))


@pytest.fixture(scope="module")
def bpe():
    """(template, tokenizer): the packaged template and a 2048-token BPE trained on the embedded corpus."""
    return ChatTemplate(chat_template()), qdata.train_bpe(qdata.read_documents(["default"]), 2048)


@pytest.fixture(scope="module")
def conversations():
    return qdata.read_conversations(["default"])[0]


@pytest.fixture(scope="module")
def preferences():
    return qdata.read_preferences(["default"])[0]


def _hf(hf_tok, record: dict) -> tuple[list[int], list[int]]:
    out = hf_tok.apply_chat_template(record["messages"], tools=record.get("tools"), tokenize=True,
                                     return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


# ---------------------------------------------------------------------------------------------------------------
# Masks


@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_and_mask_equal_transformers_assistant_tokens_mask(served, case):
    hf_tok, template, tok = served
    record = qdata.check_conversation(CASES[case])  # arguments given as JSON text become mappings
    ids, mask = qdata.encode_conversation(CASES[case], template, tok)
    hf_ids, hf_mask = _hf(hf_tok, record)
    assert ids.dtype == np.int32 and mask.dtype == bool
    assert ids.tolist() == hf_ids
    assert mask.astype(int).tolist() == hf_mask
    assert 0 < mask.sum() < len(mask)


def test_embedded_conversations_match_transformers(served, conversations):
    hf_tok, template, tok = served
    for record in conversations[::7]:
        ids, mask = qdata.encode_conversation(record, template, tok)
        assert (ids.tolist(), mask.astype(int).tolist()) == _hf(hf_tok, record), record["source"]


def test_tool_call_arguments_as_json_text_render_as_mappings(served):
    _, template, tok = served
    raw = CASES["tools"]
    parsed = json.loads(json.dumps(raw))
    parsed["messages"][2]["tool_calls"][0]["function"]["arguments"] = {"name": "os.path", "depth": 2}
    a, b = qdata.encode_conversation(raw, template, tok), qdata.encode_conversation(parsed, template, tok)
    np.testing.assert_array_equal(a[0], b[0])
    text = tok.decode(a[0].tolist(), skip_special_tokens=False)
    assert "<parameter=depth>\n2\n</parameter>" in text and '{"name"' not in text.split("</tools>")[-1]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_mask_is_each_assistant_turn_through_im_end_and_nothing_else(served, case):
    _, template, tok = served
    record = qdata.check_conversation(CASES[case])
    ids, mask = qdata.encode_conversation(record, template, tok)
    runs = _runs(mask)
    assistants = [m for m in record["messages"] if m["role"] == "assistant"]
    assert len(runs) == len(assistants)
    for (start, end), message in zip(runs, assistants):
        before = tok.decode(ids[:start].tolist(), skip_special_tokens=False)
        inside = tok.decode(ids[start:end].tolist(), skip_special_tokens=False)
        assert before.endswith("<|im_start|>assistant\n")  # the header stays unmasked
        assert inside.endswith("<|im_end|>") and inside.count("<|im_end|>") == 1
        assert "<|im_start|>" not in inside and "<tool_response>" not in inside
        content = message.get("content", "")
        content = content if isinstance(content, str) else content[0]["text"]
        assert content.strip() in inside
        for call in message.get("tool_calls", []):
            assert f"<function={call['function']['name']}>" in inside
    unmasked = tok.decode(ids[~mask].tolist(), skip_special_tokens=False)
    for message in record["messages"]:
        if message["role"] in ("system", "user", "tool"):
            assert message["content"] in unmasked


def test_template_without_generation_blocks_is_refused(served):
    _, template, tok = served
    plain = ChatTemplate("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    assert not plain.has_generation_blocks
    with pytest.raises(ValueError, match="no {% generation %} blocks"):
        qdata.encode_conversation(CASES["multi_turn"], plain, tok)
    with pytest.raises(ValueError, match="generation"):
        qdata.sft_batches([CASES["multi_turn"]], plain, tok, seq_len=512, batch_size=1)


# ---------------------------------------------------------------------------------------------------------------
# Reading and malformed records


BAD_ROWS = [
    ('{"messages": [{"role": "user", "content": "hi"}', "bad_json", "not valid JSON"),
    ('["not", "an", "object"]', "not_an_object", "must be a JSON object"),
    ('{"text": "no messages"}', "missing_messages", "no 'messages' field"),
    ('{"messages": []}', "empty_conversation", "messages is empty"),
    ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}', "missing_role",
     "messages[0] has no 'role'"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "unknown_role", "messages[0].role is 'bot'"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}', "missing_content",
     "messages[0]: a user message needs 'content'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}', "missing_content",
     "needs 'content' or 'tool_calls'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no_assistant_turn", "no assistant message"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"function": '
     '{"name": "f", "arguments": "{oops"}}]}]}', "bad_tool_call", "messages[1].tool_calls[0].function.arguments"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}', "bad_content",
     "messages[0].content must be a string"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, '
     '{"role": "assistant", "content": "x"}]}', "misplaced_system", "messages[1] is a system message"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}], "tools": "none"}',
     "bad_tools", "tools must be a list"),
]
GOOD_ROW = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})


@pytest.mark.parametrize("row,reason,message", BAD_ROWS, ids=[r for _, r, _ in BAD_ROWS])
def test_malformed_conversation_raises_naming_file_line_and_problem(tmp_path, row, reason, message):
    path = tmp_path / "chats.jsonl"
    path.write_text(GOOD_ROW + "\n\n" + row + "\n")
    with pytest.raises(qdata.RecordError, match=f"chats.jsonl:3: .*{re.escape(message)}") as e:
        qdata.read_conversations([str(path)])
    assert e.value.reason == reason


def test_malformed_conversations_are_skipped_and_counted(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join([GOOD_ROW] + [row for row, _, _ in BAD_ROWS] + [GOOD_ROW]) + "\n")
    records, skipped = qdata.read_conversations([str(path)], on_error="skip")
    assert len(records) == 2 and [r["source"] for r in records] == [f"{path}:1", f"{path}:{len(BAD_ROWS) + 2}"]
    assert skipped == collections.Counter(reason for _, reason, _ in BAD_ROWS)
    with pytest.raises(ValueError, match="on_error='ignore'"):
        qdata.read_conversations([str(path)], on_error="ignore")


def test_too_long_conversations_raise_or_are_skipped(tmp_path, bpe):
    template, tok = bpe
    long_row = json.dumps({"messages": [{"role": "user", "content": "word " * 400},
                                        {"role": "assistant", "content": "ok"}]})
    path = tmp_path / "chats.jsonl"
    path.write_text(GOOD_ROW + "\n" + long_row + "\n")
    records, _ = qdata.read_conversations([str(path)])
    with pytest.raises(qdata.RecordError, match=r"chats.jsonl:2: the conversation is \d+ tokens once rendered, "
                                                r"longer than seq_len=64"):
        qdata.sft_batches(records, template, tok, seq_len=64, batch_size=1)
    skipped = collections.Counter()
    ds = qdata.sft_batches(records, template, tok, seq_len=64, batch_size=1, on_error="skip", skipped=skipped)
    assert skipped == {"too_long": 1}
    assert next(iter(ds))["input_ids"].shape == (1, 1, 64)
    evals = qdata.sft_eval_batches(records, template, tok, seq_len=64, batch_size=2, max_batches=3,
                                   on_error="skip")
    assert len(evals) == 1 and evals[0]["weights"][1].sum() == 0


def test_parquet_conversations_as_json_text_and_nested_lists(tmp_path, served):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    _, template, tok = served
    record = qdata.check_conversation(CASES["tools"])
    as_text = {"messages": [json.dumps(CASES["tools"]["messages"])], "tools": [json.dumps(CASES["tools"]["tools"])]}
    pq.write_table(pa.table(as_text), tmp_path / "a.parquet")
    # Nested columns: structs fill absent fields with nulls, which are dropped again.
    nested = {"messages": [CASES["multi_turn"]["messages"][:2], [{"role": "user", "content": "x"}]]}
    pq.write_table(pa.table(nested), tmp_path / "b.parquet")
    records, skipped = qdata.read_conversations([str(tmp_path)], on_error="skip")
    assert skipped == {"no_assistant_turn": 1}
    assert [r["source"] for r in records] == [f"{tmp_path / 'a.parquet'}:1", f"{tmp_path / 'b.parquet'}:1"]
    assert records[0]["messages"] == record["messages"] and records[0]["tools"] == record["tools"]
    assert records[1]["messages"] == qdata.check_conversation({"messages": nested["messages"][0]})["messages"]
    np.testing.assert_array_equal(qdata.encode_conversation(records[0], template, tok)[0],
                                  qdata.encode_conversation(CASES["tools"], template, tok)[0])


# ---------------------------------------------------------------------------------------------------------------
# The embedded sets


def test_embedded_sets_are_shipped_small_varied_and_rebuild_identically(conversations, preferences, bpe):
    assert 1000 <= len(conversations) <= 1400 and len(preferences) >= 1000
    for path in (qdata.DEFAULT_CONVERSATIONS, qdata.DEFAULT_PREFERENCES):
        assert os.path.getsize(path) < 2 << 20
    with_tools = sum("tools" in r for r in conversations)
    assert 0.15 < with_tools / len(conversations) < 0.25
    assert sum(r["messages"][0]["role"] == "system" for r in conversations) > 200
    assert sum(any("reasoning_content" in m for m in r["messages"]) for r in conversations) > 200
    assert sum(sum(m["role"] == "user" for m in r["messages"]) > 1 for r in conversations) > 20
    built_conversations, built_preferences = build_conversations.build(build_conversations.read_corpus())
    for path, rows in ((qdata.DEFAULT_CONVERSATIONS, built_conversations),
                       (qdata.DEFAULT_PREFERENCES, built_preferences)):
        with open(path, encoding="utf-8") as f:
            assert f.read() == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    template, tok = bpe
    lengths = np.array([len(ids) for ids, _ in qdata.encode_conversations(conversations, template, tok,
                                                                         seq_len=4096)])
    assert (lengths <= 512).mean() > 0.85  # with the template text, in a 2048-token BPE


# ---------------------------------------------------------------------------------------------------------------
# SFT batches


def _segments(batch: dict) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    """(token ids, weights) of each conversation in a [..., L] batch."""
    out = []
    ids, seg, w = (batch[k].reshape(-1, batch[k].shape[-1]) for k in ("input_ids", "segment_ids", "weights"))
    for r in range(ids.shape[0]):
        for s in np.unique(seg[r][seg[r] > 0]):
            at = seg[r] == s
            out.append((tuple(ids[r][at].tolist()), tuple(w[r][at].tolist())))
    return out


def test_sft_rows_pack_whole_conversations_with_assistant_target_weights(conversations, bpe):
    template, tok = bpe
    records = conversations[:60]
    encoded = qdata.encode_conversations(records, template, tok, seq_len=1024)
    batches = qdata.sft_eval_batches(records, template, tok, seq_len=1024, batch_size=4, max_batches=100)
    assert all(set(b) == set(qdata.BATCH_KEYS) and b["input_ids"].shape == (4, 1024) for b in batches)
    found = _segments({k: np.stack([b[k] for b in batches]) for k in qdata.BATCH_KEYS})
    expected = {}
    for ids, mask in encoded:  # weight t: target t (token t+1) is an assistant token
        expected[tuple(ids.tolist())] = tuple(np.append(mask[1:], False).astype(np.float32).tolist())
    assert sorted(found) == sorted(expected.items())  # every conversation once, whole, in one row
    for b in batches:
        seg, pos = b["segment_ids"], b["position_ids"]
        for r in range(4):
            for s in np.unique(seg[r][seg[r] > 0]):
                np.testing.assert_array_equal(pos[r][seg[r] == s], np.arange((seg[r] == s).sum()))
            valid = seg[r][:-1] > 0
            np.testing.assert_array_equal(b["targets"][r][:-1][valid], b["input_ids"][r][1:][valid])
    assert sum(np.unique(b["segment_ids"][r]).size > 2 for b in batches for r in range(4)) > 3  # packing


def test_sft_batches_shape_seed_and_iterator_state_round_trip(conversations, bpe):
    template, tok = bpe
    records = conversations[:24]  # a few rows per epoch: 30 batches cross several epochs
    ds = qdata.sft_batches(records, template, tok, seq_len=1024, batch_size=2, grad_accum=2, seed=5)
    it = iter(ds)
    first = next(it)
    assert set(first) == set(qdata.BATCH_KEYS) and first["input_ids"].shape == (2, 2, 1024)
    assert first["weights"].dtype == np.float32 and first["input_ids"].dtype == np.int32
    for _ in range(3):
        next(it)
    expected = assert_resumes_the_same(ds, it, 30)
    # Packs hold consecutive conversations of the stream of epochs, so every conversation comes about equally
    # often; each epoch is reshuffled, so no batch comes back.
    counts = collections.Counter(s[0] for b in [first] + expected for s in _segments(b))
    assert len(counts) == len(records) and max(counts.values()) - min(counts.values()) <= 2
    assert not any(np.array_equal(first["input_ids"], b["input_ids"]) for b in expected)
    other = next(iter(qdata.sft_batches(records, template, tok, seq_len=1024, batch_size=2, grad_accum=2, seed=6)))
    assert not np.array_equal(first["input_ids"], other["input_ids"])


def test_processes_read_disjoint_shares(conversations, bpe):
    template, tok = bpe
    records = conversations[:30]
    everything = {tuple(ids.tolist()) for ids, _ in qdata.encode_conversations(records, template, tok,
                                                                             seq_len=1024)}
    shares = []
    for p in range(3):
        batches = qdata.sft_eval_batches(records, template, tok, seq_len=1024, batch_size=2, max_batches=100,
                                         process_index=p, process_count=3)
        shares.append({s[0] for b in batches for s in _segments(b)})
    assert set.union(*shares) == everything and sum(map(len, shares)) == len(everything) == 30
    firsts = [next(iter(qdata.sft_batches(records, template, tok, seq_len=1024, batch_size=1, process_index=p,
                                          process_count=3))) for p in range(3)]
    for p, b in enumerate(firsts):
        assert {s[0] for s in _segments(b)} <= shares[p]
    with pytest.raises(ValueError, match="process_index 3 outside"):
        qdata.sft_batches(records, template, tok, seq_len=1024, batch_size=1, process_index=3, process_count=3)


def _loss_fn(model):
    """jitted (batch [B, L] arrays) -> the weighted cross-entropy of each position's target [B, L] (0 where the
    weight is 0), float64."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    graphdef, state = nnx.split(model)

    @jax.jit
    def losses(state, ids, pos, seg, targets):
        logits = nnx.merge(graphdef, state)(ids, position_ids=pos, segment_ids=seg).logits
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    def run(batch: dict) -> np.ndarray:
        out = losses(state, batch["input_ids"], batch["position_ids"], batch["segment_ids"], batch["targets"])
        return np.asarray(out, np.float64) * batch["weights"]
    return run


@pytest.mark.slow
def test_packed_losses_equal_conversations_run_one_by_one(served, conversations):
    from flax import nnx

    import qwax
    _, template, tok = served
    cfg = qwax.get_preset("tiny-dense", vocab_size=tok.get_vocab_size())
    assert set(cfg.layer_types) == {"linear_attention", "full_attention"}  # Gated DeltaNet and attention layers
    token_losses = _loss_fn(qwax.QwaxForCausalLM(cfg, rngs=nnx.Rngs(0)))
    records = [r for r in conversations[:40] if "tools" not in r][:10] + [CASES["tools"], CASES["multi_turn"]]
    L = 1024
    encoded = qdata.encode_conversations(records, template, tok, seq_len=L)
    alone = {}
    for ids, mask in encoded:  # each conversation alone in its row (the padding after it cannot reach it)
        n = len(ids)
        row = {"input_ids": np.zeros((1, L), np.int32), "position_ids": np.zeros((1, L), np.int32),
               "segment_ids": np.zeros((1, L), np.int32), "targets": np.zeros((1, L), np.int32),
               "weights": np.zeros((1, L), np.float32)}
        row["input_ids"][0, :n], row["position_ids"][0, :n], row["segment_ids"][0, :n] = ids, np.arange(n), 1
        row["targets"][0, :n - 1], row["weights"][0, :n - 1] = ids[1:], mask[1:]
        alone[tuple(ids.tolist())] = token_losses(row)[0, :n]
    batches = qdata.sft_eval_batches(records, template, tok, seq_len=L, batch_size=2, max_batches=10)
    compared, worst = 0, 0.0
    for b in batches:
        losses = token_losses(b)
        for r in range(b["input_ids"].shape[0]):
            seg = b["segment_ids"][r]
            assert np.all(losses[r][seg == 0] == 0)
            for s in np.unique(seg[seg > 0]):
                key = tuple(b["input_ids"][r][seg == s].tolist())
                np.testing.assert_allclose(losses[r][seg == s], alone[key], atol=1e-5, rtol=0)
                worst = max(worst, float(np.abs(losses[r][seg == s] - alone[key]).max()))
                compared += 1
    assert compared == len(encoded) and max(np.unique(b["segment_ids"]).size for b in batches) > 3
    print(f"{compared} conversations in {len(batches)} packed batches: max |packed - alone| = {worst:.2e}")


# ---------------------------------------------------------------------------------------------------------------
# Preferences


def test_preference_forms_agree_and_masks_cover_only_the_completion(served):
    _, template, tok = served
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is os?"},
              {"role": "assistant", "content": "A module."}, {"role": "user", "content": "More detail?"}]
    good = {"role": "assistant", "reasoning_content": "Expand.", "content": "Operating system interfaces."}
    bad = {"role": "assistant", "content": "A kind of cheese."}
    explicit = qdata.encode_preference({"prompt": prompt, "chosen": [good], "rejected": bad}, template, tok)
    implicit = qdata.encode_preference({"chosen": prompt + [good], "rejected": prompt + [bad]}, template, tok)
    repeated = qdata.encode_preference({"prompt": prompt, "chosen": prompt + [good], "rejected": prompt + [bad]},
                                       template, tok)
    for a, b, c in zip(explicit, implicit, repeated):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    c_ids, c_mask, r_ids, r_mask = explicit
    for ids, mask, message in ((c_ids, c_mask, good), (r_ids, r_mask, bad)):
        full_ids, full_mask = qdata.encode_conversation({"messages": prompt + [message]}, template, tok)
        np.testing.assert_array_equal(ids, full_ids)
        runs = _runs(mask)
        assert len(runs) == 1 and len(_runs(full_mask)) == 2  # the prompt's assistant turn is not a target
        assert runs[0] == _runs(full_mask)[1] and runs[0][1] == len(ids) - 1  # through <|im_end|>, not the "\n"
        inside = tok.decode(ids[runs[0][0]:runs[0][1]].tolist(), skip_special_tokens=False)
        assert message["content"] in inside and inside.endswith("<|im_end|>")
    start = _runs(c_mask)[0][0]
    np.testing.assert_array_equal(c_ids[:start], r_ids[:start])  # the shared prompt
    as_text = qdata.encode_preference({"prompt": "What is os?", "chosen": "Interfaces.", "rejected": "Cheese."},
                                      template, tok)
    assert tok.decode(as_text[0].tolist(), skip_special_tokens=False).startswith("<|im_start|>user\nWhat is os?")


BAD_PREFERENCES = [
    ({"prompt": "q", "chosen": "a"}, "missing_completion", "no 'rejected' field"),
    ({"chosen": "a", "rejected": "b"}, "missing_prompt", "without a 'prompt'"),
    ({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "p"}]},
     "no_shared_prompt", "share no first message"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical_completions", "are the same"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}, "no_assistant_turn",
     "chosen completion"),
    ({"prompt": [{"role": "narrator", "content": "q"}], "chosen": "a", "rejected": "b"}, "unknown_role",
     "prompt[0].role is 'narrator'"),
]


def test_malformed_preferences_raise_or_are_counted(tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path.write_text("\n".join(json.dumps(r) for r in [good] + [r for r, _, _ in BAD_PREFERENCES]) + "\n")
    records, skipped = qdata.read_preferences([str(path)], on_error="skip")
    assert len(records) == 1 and skipped == collections.Counter(reason for _, reason, _ in BAD_PREFERENCES)
    for row, reason, message in BAD_PREFERENCES:
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(qdata.RecordError, match=f"prefs.jsonl:2: .*{re.escape(message)}") as e:
            qdata.read_preferences([str(path)])
        assert e.value.reason == reason


def test_dpo_batches_pair_chosen_and_rejected_rows(preferences, bpe):
    template, tok = bpe
    records = preferences[:20]
    pairs = {tuple(c.tolist()): (cm, tuple(r.tolist()), rm)
             for c, cm, r, rm in qdata.encode_preferences(records, template, tok, seq_len=512)}
    B, L = 3, 512
    ds = qdata.dpo_batches(records, template, tok, seq_len=L, batch_size=B, grad_accum=2, seed=1)
    it = iter(ds)
    batches = [next(it) for _ in range(4)]
    for batch in batches:
        assert set(batch) == set(qdata.BATCH_KEYS) and batch["input_ids"].shape == (2, 2 * B, L)
        for g in range(2):
            for i in range(B):
                rows = [{k: batch[k][g, j] for k in qdata.BATCH_KEYS} for j in (i, B + i)]
                (c_ids, c_w), (r_ids, r_w) = [(r["input_ids"][r["segment_ids"] == 1], r["weights"]) for r in rows]
                cm, rejected, rm = pairs[tuple(c_ids.tolist())]  # row B+i is the rejected side of row i's pair
                assert tuple(r_ids.tolist()) == rejected
                for r, mask in zip(rows, (cm, rm)):
                    n = int(r["segment_ids"].sum())
                    assert np.all(r["segment_ids"][:n] == 1) and np.all(r["segment_ids"][n:] == 0)
                    np.testing.assert_array_equal(r["position_ids"][:n], np.arange(n))
                    np.testing.assert_array_equal(r["weights"][:n - 1], mask[1:])
                    assert r["weights"][n - 1:].sum() == 0
                    np.testing.assert_array_equal(r["targets"][:n - 1], r["input_ids"][1:n])
                first = int(np.flatnonzero(c_w)[0])  # the completion starts after the shared prompt
                np.testing.assert_array_equal(c_ids[:first + 1], r_ids[:first + 1])
    expected = assert_resumes_the_same(ds, it, 8)  # 8 * 6 pairs: across epochs of 20


def test_dpo_eval_batches_are_fixed_and_padded_with_weight_zero_pairs(preferences, bpe):
    template, tok = bpe
    batches = qdata.dpo_eval_batches(preferences[:5], template, tok, seq_len=512, batch_size=2, max_batches=9)
    assert len(batches) == 3 and all(b["input_ids"].shape == (4, 512) for b in batches)
    last = batches[-1]
    assert last["weights"][[1, 3]].sum() == 0 and last["segment_ids"][[1, 3]].sum() == 0
    assert last["weights"][0].sum() > 0 and last["weights"][2].sum() > 0
    encoded = qdata.encode_preferences(preferences[:5], template, tok, seq_len=512)
    c, _, r, _ = encoded[2]
    np.testing.assert_array_equal(batches[1]["input_ids"][0, :len(c)], c)  # in order: pair 2 opens batch 1
    np.testing.assert_array_equal(batches[1]["input_ids"][2, :len(r)], r)
    assert len(qdata.dpo_eval_batches(preferences[:5], template, tok, seq_len=512, batch_size=2,
                                      max_batches=2)) == 2
