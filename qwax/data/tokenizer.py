"""Tokenizers: a byte-level BPE trained on the corpus with the `tokenizers` library, or a checkpoint's
tokenizer.json. Every document ends with the end-of-text token, which is also the padding token."""

from __future__ import annotations

import json
import os
from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


def train_bpe(docs: Sequence[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with `vocab_size` entries (fewer if the corpus runs out of merges), EOS included.

    Training is deterministic for the same documents and vocab_size.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer.json file, or a directory holding one (e.g. a Hugging Face checkpoint)."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return Tokenizer.from_file(path)


def eos_id(tok: Tokenizer) -> int:
    """The id of the end-of-text token (EOS, or the first of the usual end markers of published tokenizers)."""
    for name in (EOS, "<|im_end|>", "</s>", "<eos>"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise ValueError(f"tokenizer has no end-of-text token (looked for {EOS!r}, '<|im_end|>', '</s>', '<eos>')")


def save_for_hf(tok: Tokenizer, directory: str) -> None:
    """Write tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer understands."""
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    eos = tok.id_to_token(eos_id(tok))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos,
              "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
