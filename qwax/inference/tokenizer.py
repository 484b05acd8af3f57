"""Tokenizers for generation: the `tokenizer.json` stored beside a checkpoint, read with the `tokenizers` library."""

from __future__ import annotations

import os

from tokenizers import Tokenizer


def load_tokenizer(checkpoint_dir: str | os.PathLike) -> Tokenizer:
    """The checkpoint's tokenizer.json. Raises FileNotFoundError naming the expected file when it is missing."""
    path = os.path.join(os.fspath(checkpoint_dir), "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer at {path}: qwax needs the checkpoint's tokenizer.json "
                                "(a Hugging Face `tokenizers` file) to turn text into token ids")
    return Tokenizer.from_file(path)
