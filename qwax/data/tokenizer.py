"""Tokenizers: a byte-level BPE trained on the corpus with the `tokenizers` library, or a checkpoint's
tokenizer.json. Every document ends with the end-of-text token, which is also the padding token.

The trained BPE uses the Qwen3.5 tokenizer's own text pipeline (NFC normalisation, a split by the Qwen
pre-tokenize regex, byte-level mapping without a regex of its own, byte-level decoding), because that is the
pipeline transformers rebuilds around the vocabulary and merges of a Qwen3.5 checkpoint's tokenizer.json: a
tokenizer trained with any other pipeline would give different ids in transformers than in qwax.
It carries the chat tokens of the Qwen3.5 chat template: `<|endoftext|>`, `<|im_start|>` and `<|im_end|>` as
special tokens, and the reasoning / tool tags as ordinary (non-special) added tokens, as Qwen ships them.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Special tokens, in id order from 0: EOS keeps id 0 (document end and padding).
SPECIAL_TOKENS = (EOS, IM_START, IM_END)
# Tags of the chat template that Qwen treats as ordinary text tokens: decoded even with skip_special_tokens.
CHAT_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
# The Qwen3.5 pre-tokenize regex: English contractions, letter runs with their combining marks (one optional
# leading non-letter, e.g. a space), single digits, punctuation runs with the line breaks after them, line breaks
# with the spaces before them, and whitespace runs (keeping the last space for the next word).
QWEN3_5_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                             r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE_RESOURCE = "inference/templates/qwen3_5.jinja"  # inside the qwax package
# Sampling defaults Qwen recommends for the family's non-thinking mode.
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}


def use_qwen3_5_pipeline(tok: Tokenizer) -> None:
    """Give `tok` the Qwen3.5 tokenizer's normalizer, pre-tokenizer and decoder (in place)."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN3_5_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # the split above is the only regex
    ])
    tok.decoder = decoders.ByteLevel()


def _added(content: str, special: bool) -> AddedToken:
    # normalized=False: matched in the raw text, before NFC, so the tag is always one token.
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)


def train_bpe(docs: Sequence[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` entries, the added tokens included (fewer if the corpus runs out of
    merges); never fewer than the 256 byte symbols plus the 9 added tokens, whatever `vocab_size` asks.

    Ids: 0 `<|endoftext|>`, 1 `<|im_start|>`, 2 `<|im_end|>`, then the byte alphabet and the merges, then the
    non-special CHAT_TOKENS. Training is deterministic for the same documents and vocab_size.
    """
    tok = Tokenizer(models.BPE())
    use_qwen3_5_pipeline(tok)
    # The trainer's vocab_size counts its special tokens and the alphabet; leave room for the CHAT_TOKENS.
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size - len(CHAT_TOKENS), 0),
                                  special_tokens=[_added(t, special=True) for t in SPECIAL_TOKENS],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    # Added after training so that they take the ids after the merges (the trainer would put them first).
    tok.add_tokens([_added(t, special=False) for t in CHAT_TOKENS])
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
    for name in (EOS, IM_END, "</s>", "<eos>"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise ValueError(f"tokenizer has no end-of-text token (looked for {EOS!r}, {IM_END!r}, '</s>', '<eos>')")


def chat_template() -> str:
    """The packaged Qwen3.5 chat template (Jinja source)."""
    path = resources.files("qwax") / CHAT_TEMPLATE_RESOURCE
    if not path.is_file():
        raise FileNotFoundError(f"the qwax package has no {CHAT_TEMPLATE_RESOURCE} (a broken installation?)")
    return path.read_text(encoding="utf-8")


def _added_tokens_decoder(tok: Tokenizer) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json's `added_tokens_decoder`: id (a string) -> the added token's fields."""
    out = {}
    for i, t in sorted(tok.get_added_tokens_decoder().items()):
        out[str(i)] = {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                       "single_word": t.single_word, "special": t.special}
    return out


def save_for_hf(tok: Tokenizer, directory: str, template: str | None = None) -> None:
    """Write the files a Hugging Face export needs from its tokenizer: tokenizer.json, a tokenizer_config.json
    that transformers' AutoTokenizer understands, chat_template.jinja (`template`, default the packaged Qwen3.5
    chat template) and generation_config.json (the stop ids and sampling defaults, `generation_config`)."""
    template = chat_template() if template is None else template
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    eos = tok.id_to_token(eos_id(tok))
    # Transformers rebuilds the Qwen3.5 pipeline itself for a Qwen3.5 config (the same as the file's); an unknown
    # class name falls back to the file's pipeline. There is no unknown token: every byte has one.
    # extra_special_tokens: the other special tokens, so that transformers lists them among its special ids.
    extra = [t for t in SPECIAL_TOKENS if t != eos and tok.token_to_id(t) is not None]
    config = {"tokenizer_class": "Qwen3_5Tokenizer", "backend": "tokenizers", "add_prefix_space": False,
              "added_tokens_decoder": _added_tokens_decoder(tok), "bos_token": None, "eos_token": eos,
              "pad_token": eos, "unk_token": None, "extra_special_tokens": extra, "errors": "replace",
              "split_special_tokens": False, "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(template)
    save_generation_config(tok, directory)


def generation_config(tok: Tokenizer) -> dict[str, Any]:
    """generation_config.json of a model with this tokenizer: stop at `<|im_end|>` (a chat turn's end) and
    `<|endoftext|>` (a document's end), pad with the document end, no BOS, the family's sampling defaults."""
    stops = [i for i in (tok.token_to_id(IM_END), tok.token_to_id(EOS)) if i is not None] or [eos_id(tok)]
    return {"bos_token_id": None, "eos_token_id": stops if len(stops) > 1 else stops[0],
            "pad_token_id": eos_id(tok), **GENERATION_DEFAULTS}


def save_generation_config(tok: Tokenizer, directory: str) -> None:
    """Write `generation_config(tok)` as `directory`/generation_config.json."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation_config(tok), f, indent=2)
