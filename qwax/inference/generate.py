"""`generate`: batched generation with the hybrid cache, for text, MTP speculative and multimodal models.

The public entry point dispatches to one of three thin layers over qwax.inference.engine (which holds the chunked
prefill, the jitted decode step, mesh placement and the sampling loop): plain text generation (here), MTP
self-speculative decoding (qwax.inference.speculative) and generation with images / videos
(qwax.multimodal.generate).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from qwax.inference.engine import MeshPlacement, Stream, as_key, check_request, generate_tokens
from qwax.inference.engine import decode_step, prefill  # noqa: F401  (their former home; kept importable here)
from qwax.inference.sampling import SamplingParams
from qwax.inference.speculative import generate_mtp
from qwax.model import QwaxForCausalLM
from qwax.multimodal.generate import generate as generate_multimodal
from qwax.multimodal.model import QwaxForConditionalGeneration
from qwax.sharding.rules import Rules


def generate(model: QwaxForCausalLM | QwaxForConditionalGeneration, input_ids: Any, *, max_new_tokens: int,
             attention_mask: Any = None, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             repetition_penalty: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, seed: int | jax.Array = 0, stream: Stream | None = None,
             prefill_chunk_size: int = 512, speculative: str | None = None, mesh: Mesh | None = None,
             rules: str | Rules | None = None, pixel_values: Any = None, image_grid_thw: Any = None,
             pixel_values_videos: Any = None, video_grid_thw: Any = None) -> np.ndarray:
    """Generate up to `max_new_tokens` tokens after each prompt.

    input_ids [B, L] int (left-padded when rows differ in length, with attention_mask [B, L] 1/0).
    Greedy when temperature == 0, else sampling with optional top_k / top_p from `seed` (an int or a
    jax.random key; row i draws from fold_in(key, i)); top_k, top_p and seed only act when temperature > 0 (greedy
    has nothing to draw). presence_penalty / frequency_penalty (OpenAI's, on the generated tokens; 0: off) and
    repetition_penalty (transformers', on prompt and generated tokens; 1: off) apply before either; new values of
    any of these never recompile (see qwax.inference.sampling). Rows stop
    at any of `eos_token_id` (default: the config's; [] never stops); finished rows are filled with `pad_token_id`
    (default: the config's, else the first eos id, else 0). Generation ends early when every row has finished.
    stream(tokens [B]) is called with each new token column as soon as it is chosen; it may return a bool array
    [B] of rows to finish now (e.g. a stop string), else None.
    prefill_chunk_size: the prompt is prefilled in chunks of this many tokens (bounded memory for long prompts).
    speculative="mtp": draft with the model's MTP head and verify with the main model (greedy only: needs
    temperature=0; the same tokens, fewer main-model forwards; see qwax.inference.speculative).
    mesh, rules: run on a device mesh (jax.sharding.Mesh, e.g. qwax.sharding.mesh.make_mesh("data=2,tensor=4"))
    with parameters and caches laid out by a qwax.sharding strategy name or rule table (default "fsdp"); rules
    without a mesh raise. Every path (text, speculative, multimodal) honours them.
    pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw (a multimodal QwaxForConditionalGeneration
    only): as for its forward; see qwax.multimodal.generate.

    Returns [B, L + n] int32, the prompts followed by the n <= max_new_tokens generated tokens.
    """
    common = dict(max_new_tokens=max_new_tokens, attention_mask=attention_mask, eos_token_id=eos_token_id,
                  pad_token_id=pad_token_id, stream=stream, prefill_chunk_size=prefill_chunk_size, mesh=mesh,
                  rules=rules)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, presence_penalty=presence_penalty,
                    frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty, seed=seed)
    if isinstance(model, QwaxForConditionalGeneration):
        if speculative is not None:
            raise ValueError(f"speculative={speculative!r}: speculative decoding is not supported for multimodal "
                             "models (pass speculative=None)")
        return generate_multimodal(model, input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                                   pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                                   **sampling, **common)
    if not isinstance(model, QwaxForCausalLM):
        raise ValueError(f"model must be a QwaxForCausalLM or a QwaxForConditionalGeneration, got "
                         f"{type(model).__name__}")
    vision = {name: value for name, value in (("pixel_values", pixel_values), ("image_grid_thw", image_grid_thw),
                                              ("pixel_values_videos", pixel_values_videos),
                                              ("video_grid_thw", video_grid_thw)) if value is not None}
    if vision:
        raise ValueError(f"{sorted(vision)} need a multimodal model (QwaxForConditionalGeneration); this is a "
                         f"{type(model).__name__}")
    if speculative is not None:
        if speculative != "mtp":
            raise ValueError(f"speculative={speculative!r}: the only supported drafter is 'mtp'")
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty)
        if params.samples or params.penalised:
            raise ValueError(f"speculative='mtp' decodes greedily without penalties: pass temperature=0 and no "
                             f"penalties, got {params}")
        # Greedy: top_k, top_p and seed cannot change the tokens, exactly as on the plain greedy path; they are
        # still checked (above and here) so that a malformed value raises on every path.
        as_key(seed)
        return generate_mtp(model, input_ids, **common)
    return generate_text(model, input_ids, **sampling, **common)


def generate_text(model: QwaxForCausalLM, input_ids: Any, *, max_new_tokens: int, attention_mask: Any = None,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  presence_penalty: float = 0.0, frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
                  eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                  seed: int | jax.Array = 0, stream: Stream | None = None, prefill_chunk_size: int = 512,
                  mesh: Mesh | None = None, rules: str | Rules | None = None) -> np.ndarray:
    """Plain (non-speculative) generation with a text model; the arguments and result of `generate`."""
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, presence_penalty=presence_penalty,
                              frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty)
    request = check_request(model.config, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                            sampling=sampling, seed=seed, eos_token_id=eos_token_id,
                            pad_token_id=pad_token_id, stream=stream, prefill_chunk_size=prefill_chunk_size)
    new = generate_tokens(model, request, MeshPlacement(mesh, rules))
    return np.concatenate([request.ids, new], axis=1)
