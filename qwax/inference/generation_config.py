"""A checkpoint's `generation_config.json`: the stop ids and sampling settings it ships as defaults.

transformers' conventions: `do_sample` false means greedy whatever the temperature says; `eos_token_id` may be one
id or a list (Qwen3.5 lists `<|im_end|>` and `<|endoftext|>`). `presence_penalty` / `frequency_penalty` are not
transformers fields, but the OpenAI-style servers read them when a checkpoint ships them, and so does qwax.
A missing file gives greedy decoding and the config's stop ids.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from qwax.inference.sampling import SamplingParams
from qwax.json_files import read_json_object

FILE = "generation_config.json"


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """eos_token_id: the stop ids (None: the model config's, as qwax.generate takes them); pad_token_id;
    sampling: the default settings; max_new_tokens: the checkpoint's suggested output budget, or None."""

    eos_token_id: tuple[int, ...] | None = None
    pad_token_id: int | None = None
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int | None = None


def _ids(value: Any, key: str, path: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{path}: {key} must be a token id or a list of token ids, got {value!r}")
    return tuple(values)


def load_generation_config(checkpoint_dir: str | os.PathLike) -> GenerationDefaults:
    """The defaults of `checkpoint_dir`/generation_config.json (GenerationDefaults() when there is none).

    Raises ValueError naming the file and the key for a malformed value.
    """
    path = os.path.join(os.fspath(checkpoint_dir), FILE)
    if not os.path.isfile(path):
        return GenerationDefaults()
    raw = read_json_object(path)
    sampled = bool(raw.get("do_sample", False))
    top_k = raw.get("top_k")
    try:
        sampling = SamplingParams(
            temperature=float(raw.get("temperature", 1.0)) if sampled else 0.0,
            top_k=int(top_k) if sampled and top_k else None,
            top_p=float(raw["top_p"]) if sampled and raw.get("top_p") is not None else None,
            presence_penalty=float(raw.get("presence_penalty", 0.0)),
            frequency_penalty=float(raw.get("frequency_penalty", 0.0)),
            repetition_penalty=float(raw.get("repetition_penalty", 1.0)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    pad = raw.get("pad_token_id")
    pad_ids = _ids(pad, "pad_token_id", path)
    max_new = raw.get("max_new_tokens")
    if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1):
        raise ValueError(f"{path}: max_new_tokens must be an int >= 1, got {max_new!r}")
    return GenerationDefaults(eos_token_id=_ids(raw.get("eos_token_id"), "eos_token_id", path),
                              pad_token_id=pad_ids[0] if pad_ids else None, sampling=sampling,
                              max_new_tokens=max_new)
