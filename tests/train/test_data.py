"""The grain pipeline: sources, tokenizer, packing, shuffling, process sharding, iterator state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qwax import data as qdata
from pipeline_checks import assert_resumes_the_same

DOCS = [f"document {i}: " + " ".join(f"word{j % (i + 3)}" for j in range(5 + 7 * i)) for i in range(30)]


@pytest.fixture(scope="module")
def tok():
    return qdata.train_bpe(DOCS, 300)


def test_sources_read_text_jsonl_and_directories_in_order(tmp_path):
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "row one"}) + "\n\n" + json.dumps({"text": "row two"}))
    (tmp_path / "c.txt").write_text("part one\n\n\npart two")
    assert qdata.read_documents([str(tmp_path)]) == ["row one", "row two", "second file", "part one\n\n\npart two"]
    from qwax.data.sources import read_file
    assert list(read_file(str(tmp_path / "c.txt"), separator="\n\n\n")) == ["part one", "part two"]
    with pytest.raises(FileNotFoundError, match="nope"):
        qdata.read_documents([str(tmp_path / "nope")])
    with pytest.raises(KeyError, match="content"):
        qdata.read_documents([str(tmp_path / "a.jsonl")], text_field="content")


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["x one", "x two"]}), tmp_path / "d.parquet")
    assert qdata.read_documents([str(tmp_path / "d.parquet")]) == ["x one", "x two"]


def test_embedded_corpus_is_shipped_and_large_enough():
    docs = qdata.read_documents(["default"])
    assert len(docs) > 1000 and sum(map(len, docs)) > 800_000


def test_bpe_training_is_deterministic_and_round_trips(tok, tmp_path):
    assert qdata.train_bpe(DOCS, 300).to_str() == tok.to_str()
    text = "document 7: word1 word2\n  indented"
    assert tok.decode(tok.encode(text).ids) == text
    qdata.save_for_hf(tok, str(tmp_path))
    assert qdata.load_tokenizer(str(tmp_path)).to_str() == tok.to_str()
    assert qdata.eos_id(tok) == tok.token_to_id(qdata.EOS)


def test_packed_rows_keep_documents_apart(tok):
    rows = list(qdata.packed_rows(DOCS, tok, 48, seed=None, repeat=False))
    eos = qdata.eos_id(tok)
    stream = np.concatenate(qdata.tokenize_documents(DOCS, tok))
    got = np.concatenate([r["input_ids"][r["segment_ids"] > 0] for r in rows])
    np.testing.assert_array_equal(got, stream)  # every token once, in order
    for r in rows:
        seg, pos, w = r["segment_ids"], r["position_ids"], r["weights"]
        for s in np.unique(seg[seg > 0]):
            np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))  # restart at 0
        same = np.append((seg[:-1] == seg[1:]) & (seg[:-1] > 0), False)
        np.testing.assert_array_equal(w, same.astype(np.float32))
        np.testing.assert_array_equal(r["targets"][:-1][same[:-1]], r["input_ids"][1:][same[:-1]])
    assert (stream == eos).sum() == len(DOCS)


def test_shuffle_is_seeded_and_batches_have_the_accumulation_shape(tok):
    def first(seed, n=6):
        it = iter(qdata.train_batches(DOCS, tok, seq_len=32, batch_size=2, grad_accum=3, seed=seed))
        return [next(it) for _ in range(n)]

    a, b, c = first(0), first(0), first(1)
    assert a[0]["input_ids"].shape == (3, 2, 32) and a[0]["weights"].dtype == np.float32
    assert all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_iterator_state_restores_the_exact_batch_sequence(tok):
    ds = qdata.train_batches(DOCS, tok, seq_len=40, batch_size=2, seed=3)
    it = iter(ds)
    for _ in range(7):
        next(it)
    expected = assert_resumes_the_same(ds, it, 20)  # crosses an epoch boundary (reshuffled)


def test_processes_read_disjoint_shares(tok):
    shares = [list(qdata.packed_rows(DOCS, tok, 1000, seed=None, repeat=False, process_index=i, process_count=3))
              for i in range(3)]
    tokens = [np.concatenate([r["input_ids"][r["segment_ids"] > 0] for r in rows]) for rows in shares]
    assert sum(len(t) for t in tokens) == len(np.concatenate(qdata.tokenize_documents(DOCS, tok)))
    first_docs = [tok.decode(t[:4].tolist()) for t in tokens]
    assert len(set(first_docs)) == 3


def test_eval_batches_are_padded_to_a_fixed_shape(tok):
    batches = qdata.eval_batches(DOCS[:3], tok, seq_len=64, batch_size=4, max_batches=5)
    assert all(b["input_ids"].shape == (4, 64) for b in batches)
    assert batches[-1]["weights"][-1].sum() == 0


def test_unigram_entropy():
    assert qdata.unigram_entropy([np.array([0, 1, 0, 1])], 4) == pytest.approx(np.log(2))
    assert qdata.unigram_entropy([np.array([3, 3, 3])], 4) == pytest.approx(0.0)
