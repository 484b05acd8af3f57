"""Generation with images and videos: fuse once, prefill the fused embeddings, decode text with the rope delta.

The vision tower and the fusion run once on the prompt; the prompt's fused embeddings go through the text model's
chunked prefill with their multimodal (T, H, W) positions. Every generated token is text, so on all three rows its
position is the row's count of real tokens so far plus the row's rope delta (max prompt position + 1 - real
prompt tokens), as in transformers.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwax.graph_jit import jit_with_graph
from qwax.inference.cache import Cache, init_cache
from qwax.inference.generate import cache_length, check_request, sample_loop, stop_tokens
from qwax.multimodal.model import QwaxForConditionalGeneration

@jit_with_graph(donate_argnums=(1,))
def prefill_embeds_chunk(graphdef: nnx.GraphDef, params: nnx.State, cache: Cache, embeds: jax.Array,
                         attention_mask: jax.Array, position_ids: jax.Array) -> tuple[jax.Array, Cache]:
    """Fused embeddings [B, L, H] with positions [3, B, L] into `cache`; (last logits [B, V] float32, cache)."""
    out = nnx.merge(graphdef, params)(None, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                      inputs_embeds=embeds)
    return out.logits[:, -1].astype(jnp.float32), out.cache


@jit_with_graph(donate_argnums=(1,))
def decode_step(graphdef: nnx.GraphDef, params: nnx.State, cache: Cache, tokens: jax.Array, rope_delta: jax.Array
                ) -> tuple[jax.Array, Cache]:
    """One text token per row [B] at position (real tokens so far) + rope_delta [B] -> (logits [B, V], cache)."""
    position = jnp.broadcast_to((cache.position + rope_delta)[None, :, None], (3, tokens.shape[0], 1))
    out = nnx.merge(graphdef, params)(tokens[:, None], position_ids=position, cache=cache)
    return out.logits[:, -1].astype(jnp.float32), out.cache


def generate(model: QwaxForConditionalGeneration, input_ids: Any, *, max_new_tokens: int, attention_mask: Any = None,
             pixel_values: Any = None, image_grid_thw: Any = None, pixel_values_videos: Any = None,
             video_grid_thw: Any = None, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, seed: int = 0, stream: Callable[[np.ndarray], None] | None = None,
             prefill_chunk_size: int = 512) -> np.ndarray:
    """Generate up to `max_new_tokens` text tokens after each (multimodal) prompt.

    input_ids [B, L] with the placeholder runs of the images / videos (left-padded, attention_mask [B, L]);
    pixel_values / image_grid_thw and pixel_values_videos / video_grid_thw as for the model's forward. The other
    arguments are those of qwax.generate. Returns [B, L + n] int32: the prompts, then n <= max_new_tokens tokens.
    """
    cfg = model.config.text
    ids, mask = check_request(cfg, input_ids, attention_mask, max_new_tokens)
    b, l = ids.shape
    eos, pad = stop_tokens(cfg, eos_token_id, pad_token_id)

    embeds = model.embed(ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
    positions, delta = model.rope_index(ids, mask, image_grid_thw, video_grid_thw)
    if int(positions.max()) + max_new_tokens >= cfg.max_position_embeddings:
        raise ValueError(f"prompt positions up to {int(positions.max())} + max_new_tokens={max_new_tokens} exceed "
                         f"max_position_embeddings={cfg.max_position_embeddings}")

    graphdef, params = nnx.split(model.language_model)
    chunk = min(prefill_chunk_size, -(-l // 16) * 16)
    padded = -(-l // chunk) * chunk
    cache = init_cache(cfg, b, cache_length(l, chunk, max_new_tokens))
    # Left-pad the prompt to whole chunks: padding slots are invalid in the cache and never seen again.
    x = jnp.zeros((b, padded, embeds.shape[-1]), embeds.dtype).at[:, padded - l:].set(embeds)
    m = np.zeros((b, padded), np.int32)
    m[:, padded - l:] = mask
    p = np.zeros((3, b, padded), np.int32)
    p[:, :, padded - l:] = positions
    logits = None
    for start in range(0, padded, chunk):
        sl = slice(start, start + chunk)
        logits, cache = prefill_embeds_chunk(graphdef, params, cache, x[:, sl], jnp.asarray(m[:, sl]),
                                             jnp.asarray(p[:, :, sl]))

    delta = jnp.asarray(delta, jnp.int32)
    new = sample_loop(lambda tokens, cache: decode_step(graphdef, params, cache, jnp.asarray(tokens), delta),
                      logits, cache, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      eos=eos, pad=pad, seed=seed, stream=stream)
    return np.concatenate([ids.astype(np.int32), new], axis=1)
