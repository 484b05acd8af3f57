"""Everything `qwax serve` and `qwax chat` load from a checkpoint directory: the model, tokenizer, chat template
and generation defaults, gathered in a ServedModel."""

from __future__ import annotations

import functools
import os
from typing import Any

from qwax.convert.hf import load_hf
from qwax.inference.chat_template import ChatTemplate, ChatTemplateError
from qwax.inference.engine import stop_tokens
from qwax.inference.generation_config import load_generation_config
from qwax.inference.tokenizer import load_tokenizer
from qwax.serve.app import ServedModel
from qwax.serve.scheduler import Scheduler


def load_served(checkpoint: str | os.PathLike, *, dtype: str = "auto", max_batch: int = 8,
                batch_window_s: float = 0.001, **config_overrides: Any) -> ServedModel:
    """Load `checkpoint` for serving. Raises FileNotFoundError / ValueError naming a missing or malformed file.

    A checkpoint without a chat template still serves /v1/completions (chat requests get a 400).
    config_overrides: QwaxConfig fields for `load_hf` (e.g. the rope scaling of `qwax.config.rope_overrides`)."""
    checkpoint = os.fspath(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    defaults = load_generation_config(checkpoint)
    model = load_hf(checkpoint, dtype=dtype, **config_overrides)
    cfg = model.config
    try:
        ChatTemplate.from_checkpoint(checkpoint)
        chat_template = functools.lru_cache(maxsize=2)(
            lambda tools: ChatTemplate.from_checkpoint(checkpoint, tools=tools))
    except ChatTemplateError:
        chat_template = None

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    eos, pad = stop_tokens(cfg, defaults.eos_token_id, defaults.pad_token_id)
    scheduler = Scheduler(model, decode, max_batch=max_batch, batch_window_s=batch_window_s, pad_token_id=pad)
    return ServedModel(scheduler=scheduler, encode=encode, decode=decode, chat_template=chat_template,
                       defaults=defaults, eos=tuple(eos.tolist()), context_length=cfg.max_position_embeddings,
                       vocab_size=cfg.vocab_size)
