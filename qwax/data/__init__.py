"""Training data: document sources, tokenizers, the grain pipeline that packs documents into batches, and
conversation (SFT) and preference (DPO) data for post-training."""

from qwax.data.conversations import (DEFAULT_CONVERSATIONS, DEFAULT_PREFERENCES, RecordError, check_conversation,
                                     check_preference, dpo_batches, dpo_eval_batches, encode_conversation,
                                     encode_conversations, encode_preference, encode_preferences,
                                     read_conversations, read_preferences, sft_batches, sft_eval_batches)
from qwax.data.packing import (BATCH_KEYS, eval_batches, packed_rows, split_documents, tokenize_documents,
                               train_batches, unigram_entropy)
from qwax.data.sources import DEFAULT_CORPUS, read_documents
from qwax.data.tokenizer import EOS, chat_template, eos_id, load_tokenizer, save_for_hf, train_bpe

__all__ = ["BATCH_KEYS", "DEFAULT_CONVERSATIONS", "DEFAULT_CORPUS", "DEFAULT_PREFERENCES", "EOS", "RecordError",
           "chat_template", "check_conversation", "check_preference", "dpo_batches", "dpo_eval_batches",
           "encode_conversation", "encode_conversations", "encode_preference", "encode_preferences", "eos_id",
           "eval_batches", "load_tokenizer", "packed_rows", "read_conversations", "read_documents",
           "read_preferences", "save_for_hf", "sft_batches", "sft_eval_batches", "split_documents",
           "tokenize_documents", "train_batches", "train_bpe", "unigram_entropy"]
