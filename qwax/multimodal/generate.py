"""Generation with images and videos: fuse once, prefill the fused embeddings, decode text with the rope delta.

The vision tower and the fusion run once on the prompt; the prompt's fused embeddings go through the engine's
chunked prefill with their multimodal (T, H, W) positions. Every generated token is text, so on all three rows its
position is the row's count of real tokens so far plus the row's rope delta (max prompt position + 1 - real
prompt tokens), as in transformers; the engine's decode step adds that delta.

With a mesh, the whole model's parameters (vision tower included) are laid out on it before the fusion, so the
tower runs sharded too; the fused embeddings and the cache follow the same rules.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qwax.inference.engine import MeshPlacement, Stream, check_request, generate_tokens
from qwax.inference.sampling import SamplingParams
from qwax.multimodal.model import QwaxForConditionalGeneration
from qwax.sharding.rules import Rules


def generate(model: QwaxForConditionalGeneration, input_ids: Any, *, max_new_tokens: int, attention_mask: Any = None,
             pixel_values: Any = None, image_grid_thw: Any = None, pixel_values_videos: Any = None,
             video_grid_thw: Any = None, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             repetition_penalty: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, seed: int | jax.Array = 0, stream: Stream | None = None,
             prefill_chunk_size: int = 512, mesh: Mesh | None = None, rules: str | Rules | None = None
             ) -> np.ndarray:
    """Generate up to `max_new_tokens` text tokens after each (multimodal) prompt.

    input_ids [B, L] with the placeholder runs of the images / videos (left-padded, attention_mask [B, L]);
    pixel_values / image_grid_thw and pixel_values_videos / video_grid_thw as for the model's forward. The other
    arguments (sampling from `seed`, stop tokens, streaming, mesh and rules) are those of qwax.generate.
    Returns [B, L + n] int32: the prompts, then n <= max_new_tokens tokens.
    """
    if not isinstance(model, QwaxForConditionalGeneration):
        raise ValueError(f"model must be a QwaxForConditionalGeneration, got {type(model).__name__}")
    cfg = model.config.text
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, presence_penalty=presence_penalty,
                              frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty)
    request = check_request(cfg, input_ids, attention_mask, max_new_tokens=max_new_tokens, sampling=sampling,
                            seed=seed, eos_token_id=eos_token_id,
                            pad_token_id=pad_token_id, stream=stream, prefill_chunk_size=prefill_chunk_size)
    placement = MeshPlacement(mesh, rules)
    with placement.scope():
        if placement.mesh is not None:
            graphdef, params = nnx.split(model)
            model = nnx.merge(graphdef, placement.params(params))
        # embed checks the placeholders against the grids, so it runs (and raises) before rope_index.
        embeds = model.embed(request.ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        positions, delta = model.rope_index(request.ids, request.mask, image_grid_thw, video_grid_thw)
        if int(positions.max()) + max_new_tokens >= cfg.max_position_embeddings:
            raise ValueError(f"prompt positions up to {int(positions.max())} + max_new_tokens={max_new_tokens} "
                             f"exceed max_position_embeddings={cfg.max_position_embeddings}")
        if max_new_tokens == 0:
            return request.ids
        embeds = placement.array(embeds, ("batch", "length", "act_embed"))
        new = generate_tokens(model.language_model, request, placement, inputs_embeds=embeds, position_ids=positions,
                              rope_delta=delta)
    return np.concatenate([request.ids, new], axis=1)
