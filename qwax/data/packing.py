"""The grain input pipeline: documents -> tokens -> packed fixed-length rows -> batches of model inputs.

    docs -> shard by process -> shuffle(seed), reshuffled every epoch -> tokenize (+ EOS) ->
    concat-then-split into rows of `seq_len` tokens -> next-token targets -> batch [grad_accum, batch, seq_len]

Packing keeps documents apart: each row carries `segment_ids` (1, 2, ... per document piece, 0 for padding)
and `position_ids` that restart at 0 in every piece, so attention never crosses documents and the Gated
DeltaNet state resets at each boundary. A document longer than a row continues in the next row as a new piece.
The target of position t is token t+1 when both are in the same piece; other positions get weight 0.

The pipeline is a grain IterDataset whose iterator state (a few integers) is checkpointed with the model, so a
resumed run reads exactly the batches the interrupted run would have read.
"""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np
from tokenizers import Tokenizer

from qwax.data.tokenizer import eos_id

BATCH_KEYS = ("input_ids", "segment_ids", "position_ids", "targets", "weights")


def tokenize_documents(docs: Sequence[str], tok: Tokenizer) -> list[np.ndarray]:
    """Token ids of each document followed by EOS, as int32 arrays."""
    eos = eos_id(tok)
    return [np.asarray(e.ids + [eos], np.int32) for e in tok.encode_batch(list(docs))]


def with_targets(row: dict) -> dict:
    """A packed row {tokens, tokens_segment_ids, tokens_positions} -> the model's inputs and targets [L]."""
    tokens, seg = row["tokens"], row["tokens_segment_ids"]
    targets = np.zeros_like(tokens)
    targets[:-1] = tokens[1:]
    same = np.zeros(tokens.shape, bool)
    same[:-1] = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)
    return {"input_ids": tokens.astype(np.int32), "segment_ids": seg.astype(np.int32),
            "position_ids": row["tokens_positions"].astype(np.int32), "targets": targets.astype(np.int32),
            "weights": same.astype(np.float32)}


def packed_rows(docs: Sequence[str], tok: Tokenizer, seq_len: int, *, seed: int | None, repeat: bool,
                process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Packed rows (dicts of [seq_len] arrays, see BATCH_KEYS) of this process's share of `docs`.

    seed None keeps document order; repeat loops over the documents forever, reshuffling each epoch.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, process_count={process_count})")
    eos = eos_id(tok)
    ds = grain.MapDataset.source(list(docs))[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"process {process_index} of {process_count} has no documents (only {len(docs)} in all)")
    if seed is not None:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    ds = ds.map(lambda doc: {"tokens": np.asarray(tok.encode(doc).ids + [eos], np.int32)})
    rows = grain.experimental.ConcatThenSplitIterDataset(ds.to_iter_dataset(), length_struct={"tokens": seq_len})
    return rows.map(with_targets)


def train_batches(docs: Sequence[str], tok: Tokenizer, *, seq_len: int, batch_size: int, grad_accum: int = 1,
                  seed: int = 0, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Endless training batches: dicts of [grad_accum, batch_size, seq_len] arrays (this process's rows)."""
    rows = packed_rows(docs, tok, seq_len, seed=seed, repeat=True, process_index=process_index,
                       process_count=process_count)
    n = grad_accum * batch_size
    return rows.batch(n, drop_remainder=True).map(
        lambda b: {k: v.reshape(grad_accum, batch_size, seq_len) for k, v in b.items()})


def eval_batches(docs: Sequence[str], tok: Tokenizer, *, seq_len: int, batch_size: int, max_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[dict]:
    """A fixed list of at most `max_batches` evaluation batches ([batch_size, seq_len] arrays) over `docs`
    in order; the last batch is padded with weight-0 rows so every batch has the same shape."""
    rows = iter(packed_rows(docs, tok, seq_len, seed=None, repeat=False, process_index=process_index,
                            process_count=process_count))
    batches = []
    while len(batches) < max_batches:
        chunk = [r for _, r in zip(range(batch_size), rows)]
        if not chunk:
            break
        while len(chunk) < batch_size:
            chunk.append({k: np.zeros_like(v) for k, v in chunk[0].items()})
        batches.append({k: np.stack([r[k] for r in chunk]) for k in BATCH_KEYS})
    return batches


def unigram_entropy(token_arrays: Sequence[np.ndarray], vocab_size: int) -> float:
    """Entropy in nats of the corpus's token frequencies: the loss of the best context-free predictor."""
    counts = np.bincount(np.concatenate(token_arrays), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def split_documents(docs: Sequence[str], eval_every: int) -> tuple[list[str], list[str]]:
    """(train, eval): every `eval_every`-th document (0, n, 2n, ...) is held out; eval_every 0 holds none."""
    if eval_every <= 0:
        return list(docs), []
    train = [d for i, d in enumerate(docs) if i % eval_every]
    held = [d for i, d in enumerate(docs) if i % eval_every == 0]
    return train, held


