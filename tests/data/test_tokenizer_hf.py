"""The main job's tokenizer as transformers loads it from the export: the same ids as qwax's on the held-out
corpus and on tricky text, the chat tokens as single ids, and a generation_config.json transformers reads."""

from __future__ import annotations

import json
import os
import warnings

import pytest

from qwax import data as qdata
from qwax.data import tokenizer as qtok
from qwax.train.loop import load_tokenizer_for
from qwax.train.recipes import get_recipe

transformers = pytest.importorskip("transformers")

# Indentation, CRLF, digit runs, a decomposed accent (NFC composes it), CJK, emoji and a ZWJ sequence.
SNIPPET = ("def parse(path):\r\n\tif path:\r\n        return 12345 + 0.5e-3  # café / cafe\u0301 / Ångström\n"
           "\n\n    x = '日本語のテキスト' + \"中文\"  # 😀 👩‍💻 naïve\u0308\r\n  \t \n")


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """(qwax tokenizer, held-out documents, export directory) built as `qwax train` (recipe tiny) builds them."""
    recipe = get_recipe("tiny", [])
    docs = qdata.read_documents(recipe.data, recipe.text_field)
    train_docs, held_out = qdata.split_documents(docs, recipe.eval_holdout_every)
    tok = load_tokenizer_for(recipe, str(tmp_path_factory.mktemp("workdir")), train_docs)
    export = str(tmp_path_factory.mktemp("hf"))
    eos = qdata.eos_id(tok)
    cfg = recipe.model_config(tok.get_vocab_size()).replace(eos_token_id=eos, pad_token_id=eos)
    with open(os.path.join(export, "config.json"), "w") as f:  # what save_hf writes beside the tokenizer
        json.dump(cfg.to_hf(), f)
    qdata.save_for_hf(tok, export)
    return tok, held_out, export


@pytest.fixture(scope="module")
def hf_tok(main_job):
    return transformers.AutoTokenizer.from_pretrained(main_job[2])


def test_the_main_job_tokenizer_fits_its_vocab_size_and_keeps_eos_first(main_job):
    tok, _, _ = main_job
    assert tok.get_vocab_size() <= get_recipe("tiny", []).vocab_size
    assert qdata.eos_id(tok) == tok.token_to_id(qdata.EOS) == 0
    assert [tok.token_to_id(t) for t in qtok.SPECIAL_TOKENS] == [0, 1, 2]
    added = {t.content: t for t in tok.get_added_tokens_decoder().values()}
    assert {t for t, a in added.items() if a.special} == set(qtok.SPECIAL_TOKENS)
    assert {t for t, a in added.items() if not a.special} == set(qtok.CHAT_TOKENS)
    assert not any(a.normalized for a in added.values())


def test_transformers_loads_the_export_as_the_qwen3_5_tokenizer(main_job, hf_tok):
    from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer
    assert type(hf_tok) is Qwen3_5Tokenizer
    tok = main_job[0]
    assert hf_tok.eos_token == hf_tok.pad_token == qdata.EOS and hf_tok.bos_token is None
    assert hf_tok.pad_token_id == qdata.eos_id(tok)
    assert set(hf_tok.all_special_tokens) == set(qtok.SPECIAL_TOKENS)
    assert len(hf_tok) == tok.get_vocab_size()
    # Without the config.json (tokenizer_class alone) it is the same class.
    alone = os.path.join(main_job[2], "alone")
    qdata.save_for_hf(tok, alone, template="")
    assert type(transformers.AutoTokenizer.from_pretrained(alone)) is Qwen3_5Tokenizer


def test_every_held_out_document_gets_the_same_ids_and_decodes_back(main_job, hf_tok):
    tok, held_out, _ = main_job
    assert len(held_out) > 20
    ours = [e.ids for e in tok.encode_batch(held_out)]
    theirs = hf_tok(held_out)["input_ids"]
    for i, (doc, a, b) in enumerate(zip(held_out, ours, theirs)):
        assert a == b, f"held-out document {i}: {doc[:80]!r}"
        assert tok.decode(a) == hf_tok.decode(b) == doc, i  # the corpus is NFC already


def test_a_snippet_with_crlf_digits_accents_cjk_and_emoji_gets_the_same_ids(main_job, hf_tok):
    import unicodedata
    tok = main_job[0]
    ids = tok.encode(SNIPPET).ids
    assert ids == hf_tok(SNIPPET)["input_ids"]
    assert tok.decode(ids) == hf_tok.decode(ids) == unicodedata.normalize("NFC", SNIPPET)
    digits = [tok.id_to_token(i) for i in tok.encode("12345").ids]
    assert digits == list("12345")  # one token per digit, as the Qwen regex splits them
    assert tok.encode("cafe\u0301").ids == tok.encode("caf\u00e9").ids


def test_chat_tokens_are_single_ids_in_both(main_job, hf_tok):
    tok = main_job[0]
    for t in qtok.SPECIAL_TOKENS + qtok.CHAT_TOKENS:
        assert tok.encode(t).ids == hf_tok(t)["input_ids"] == [tok.token_to_id(t)], t
    text = "<|im_start|>assistant\n<think>\nhm\n</think>\n<tool_call>\n{}\n</tool_call><|im_end|>\n<|endoftext|>"
    ids = tok.encode(text).ids
    assert ids == hf_tok(text)["input_ids"]
    for t in qtok.SPECIAL_TOKENS + qtok.CHAT_TOKENS[:4]:
        assert tok.token_to_id(t) in ids, t
    # The tags are ordinary text: skip_special_tokens drops only <|...|> tokens, in both.
    kept = "assistant\n<think>\nhm\n</think>\n<tool_call>\n{}\n</tool_call>\n"
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True) == kept


def test_generation_config_loads_with_both_stop_ids_and_no_warnings(main_job):
    tok, _, export = main_job
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gen = transformers.GenerationConfig.from_pretrained(export)
    assert gen.eos_token_id == [tok.token_to_id(qtok.IM_END), tok.token_to_id(qdata.EOS)]
    assert gen.pad_token_id == qdata.eos_id(tok) and gen.bos_token_id is None
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.top_k) == (True, 0.7, 0.8, 20)
    with open(os.path.join(export, "config.json")) as f:
        assert json.load(f)["eos_token_id"] == qdata.eos_id(tok)  # the model config keeps the document end


def test_the_export_ships_the_packaged_chat_template_and_transformers_renders_it(main_job, tmp_path):
    tok = main_job[0]
    qdata.save_for_hf(tok, str(tmp_path))
    with open(tmp_path / "chat_template.jinja", encoding="utf-8") as f:
        assert f.read() == qtok.chat_template()
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "and?"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = hf.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids == tok.encode(text).ids
    im_start, im_end = tok.token_to_id(qtok.IM_START), tok.token_to_id(qtok.IM_END)
    assert ids.count(im_start) == 4 and ids.count(im_end) == 3  # one id per marker: none split into bytes
