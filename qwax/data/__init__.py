"""Training data: document sources, tokenizers, and the grain pipeline that packs documents into batches."""

from qwax.data.packing import (BATCH_KEYS, eval_batches, packed_rows, split_documents, tokenize_documents,
                               train_batches, unigram_entropy)
from qwax.data.sources import DEFAULT_CORPUS, read_documents
from qwax.data.tokenizer import EOS, eos_id, load_tokenizer, save_for_hf, train_bpe

__all__ = ["BATCH_KEYS", "DEFAULT_CORPUS", "EOS", "eos_id", "eval_batches", "load_tokenizer", "packed_rows",
           "read_documents", "save_for_hf", "split_documents", "tokenize_documents", "train_batches", "train_bpe",
           "unigram_entropy"]
