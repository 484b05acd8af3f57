"""Batched generation with the hybrid cache: chunked prefill, then one jitted decode step per token.

Prompts of different lengths are left-padded; padding never enters the attention keys or the GDN state. The
prefill processes the prompt in fixed-size chunks (bounded memory for long prompts; one compilation per chunk
size), and both steps are jitted once per shape bucket (batch, chunk, cache length).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwax.config import QwaxConfig
from qwax.graph_jit import jit_with_graph
from qwax.inference.cache import CACHE_BUCKET, Cache, init_cache
from qwax.inference.sampling import sample
from qwax.model import QwaxForCausalLM, check_token_ids


@jit_with_graph(donate_argnums=(1,))
def prefill_chunk(graphdef: nnx.GraphDef, params: nnx.State, cache: Cache, input_ids: jax.Array,
                  attention_mask: jax.Array) -> tuple[jax.Array, Cache]:
    """Run L prompt tokens [B, L] through the model into `cache`; returns (last-position logits [B, V], cache)."""
    out = nnx.merge(graphdef, params)(input_ids, attention_mask=attention_mask, cache=cache)
    return out.logits[:, -1].astype(jnp.float32), out.cache


@jit_with_graph(donate_argnums=(1,))
def decode_step(graphdef: nnx.GraphDef, params: nnx.State, cache: Cache, tokens: jax.Array
                ) -> tuple[jax.Array, Cache]:
    """One token per row [B] -> (logits [B, V] float32, cache)."""
    out = nnx.merge(graphdef, params)(tokens[:, None], cache=cache)
    return out.logits[:, -1].astype(jnp.float32), out.cache


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def _choose(logits: jax.Array, key: jax.Array, done: jax.Array, pad: int, *, temperature: float,
            top_k: int | None, top_p: float | None) -> tuple[jax.Array, jax.Array]:
    """(next tokens [B] int32, with `pad` in the rows that are `done`; the key for the step after)."""
    key, sub = jax.random.split(key)
    tokens = sample(logits, sub, temperature=temperature, top_k=top_k, top_p=top_p)
    return jnp.where(done, pad, tokens).astype(jnp.int32), key


def prefill(graphdef: nnx.GraphDef, params: nnx.State, cache: Cache, input_ids: np.ndarray,
            attention_mask: np.ndarray, chunk_size: int) -> tuple[jax.Array, Cache]:
    """Left-pad [B, L] to a multiple of `chunk_size` and run the chunks in order; returns (logits, cache)."""
    b, l = input_ids.shape
    padded = -(-l // chunk_size) * chunk_size
    ids = np.zeros((b, padded), np.int32)
    mask = np.zeros((b, padded), np.int32)
    ids[:, padded - l:], mask[:, padded - l:] = input_ids, attention_mask
    logits = None
    for start in range(0, padded, chunk_size):
        sl = slice(start, start + chunk_size)
        logits, cache = prefill_chunk(graphdef, params, cache, jnp.asarray(ids[:, sl]), jnp.asarray(mask[:, sl]))
    return logits, cache


def check_request(cfg: QwaxConfig, input_ids, attention_mask, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a generation request for a text model of config `cfg`; returns (ids [B, L], mask [B, L]) int32."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be an integer array [batch, length], got {ids.dtype} {ids.shape}")
    mask = np.ones_like(ids, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if ids.shape[1] + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt of {ids.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"maximum length max_position_embeddings={cfg.max_position_embeddings}")
    if ids.shape[1] == 0 or not mask[:, -1].all():
        raise ValueError("every prompt needs at least one token, with padding on the left (attention_mask[:, -1] "
                         "must be 1)")
    check_token_ids(ids[mask > 0], cfg.vocab_size)
    return ids.astype(np.int32), mask


def stop_tokens(cfg: QwaxConfig, eos_token_id, pad_token_id) -> tuple[np.ndarray, int]:
    """(eos ids [n], pad id): the arguments, else the config's; pad falls back to the first eos id, else 0."""
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos = np.atleast_1d(np.asarray([] if eos is None else eos, np.int32))
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    return eos, int(pad if pad is not None else (eos[0] if eos.size else 0))


def cache_length(prompt_length: int, chunk: int, max_new_tokens: int) -> int:
    """Cache slots for a left-padded prompt of `prompt_length` in chunks of `chunk`, rounded to a bucket."""
    padded = -(-prompt_length // chunk) * chunk
    return -(-(padded + max_new_tokens + 2) // CACHE_BUCKET) * CACHE_BUCKET


def generate(model: QwaxForCausalLM, input_ids, *, max_new_tokens: int, attention_mask=None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None, seed: int = 0,
             stream: Callable[[np.ndarray], None] | None = None, prefill_chunk_size: int = 512,
             speculative: str | None = None, mesh=None, rules="fsdp", **vision_inputs) -> np.ndarray:
    """Generate up to `max_new_tokens` tokens after each prompt.

    input_ids [B, L] int (left-padded when rows differ in length, with attention_mask [B, L] 1/0).
    Greedy when temperature == 0, else sampling with optional top_k / top_p, from `seed`. Rows stop at any of
    `eos_token_id` (default: the config's); finished rows are filled with `pad_token_id` (default: the config's,
    else the first eos id, else 0). Generation ends early when every row has finished.
    stream(tokens [B]) is called with each new token column as soon as it is chosen.
    speculative="mtp": draft with the model's MTP head and verify with the main model (greedy only; the same
    tokens, fewer main-model forwards; see qwax.inference.speculative).
    mesh, rules: run on a device mesh (jax.sharding.Mesh, e.g. qwax.sharding.mesh.make_mesh("data=2,tensor=4"))
    with parameters and cache laid out by a qwax.sharding strategy name or rule table.
    vision_inputs (a multimodal QwaxForConditionalGeneration only): pixel_values, image_grid_thw,
    pixel_values_videos, video_grid_thw as for its forward; see qwax.multimodal.generate.

    Returns [B, L + n] int32, the prompts followed by the n <= max_new_tokens generated tokens.
    """
    from qwax.multimodal.model import QwaxForConditionalGeneration

    if isinstance(model, QwaxForConditionalGeneration):
        if speculative is not None:
            raise ValueError("speculative decoding is not supported for multimodal models")
        from qwax.multimodal.generate import generate as generate_multimodal

        return generate_multimodal(model, input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                                   temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                                   pad_token_id=pad_token_id, seed=seed, stream=stream,
                                   prefill_chunk_size=prefill_chunk_size, **vision_inputs)
    if vision_inputs:
        raise ValueError(f"{sorted(vision_inputs)} need a multimodal model (QwaxForConditionalGeneration); this is a "
                         f"{type(model).__name__}")
    if speculative is not None:
        if speculative != "mtp":
            raise ValueError(f"speculative={speculative!r}: the only supported drafter is 'mtp'")
        if temperature != 0.0:
            raise ValueError("speculative='mtp' decodes greedily: pass temperature=0")
        from qwax.inference.speculative import generate_mtp

        return generate_mtp(model, input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                            eos_token_id=eos_token_id, pad_token_id=pad_token_id, stream=stream,
                            prefill_chunk_size=prefill_chunk_size)
    cfg = model.config
    ids, mask = check_request(cfg, input_ids, attention_mask, max_new_tokens)
    b, l = ids.shape
    eos, pad = stop_tokens(cfg, eos_token_id, pad_token_id)

    graphdef, params = nnx.split(model)
    chunk = min(prefill_chunk_size, -(-l // 16) * 16)
    cache = init_cache(cfg, b, cache_length(l, chunk, max_new_tokens))
    with _on_mesh(mesh, rules) as place:
        params, cache = place(params, cache)
        logits, cache = prefill(graphdef, params, cache, ids, mask, chunk)
        new = sample_loop(lambda tokens, cache: decode_step(graphdef, params, cache, jnp.asarray(tokens)),
                          logits, cache, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, eos=eos, pad=pad, seed=seed, stream=stream)
    return np.concatenate([ids, new], axis=1)


@contextlib.contextmanager
def _on_mesh(mesh, rules):
    """Yields place(params, cache) -> both laid out on `mesh` by the sharding `rules` (identity without a mesh),
    with the mesh active while the steps are traced."""
    if mesh is None:
        yield lambda params, cache: (params, cache)
        return
    from qwax.inference.cache import cache_logical_axes
    from qwax.sharding.rules import get_rules, param_shardings, tree_shardings, use_sharding

    rules = get_rules(rules) if isinstance(rules, str) else rules

    def place(params, cache):
        return (jax.device_put(params, param_shardings(params, rules, mesh)),
                jax.device_put(cache, tree_shardings(cache, cache_logical_axes(cache), rules, mesh)))

    with use_sharding(mesh, rules):
        yield place


def sample_loop(decode: Callable[[jax.Array, Cache], tuple[jax.Array, Cache]], logits: jax.Array, cache: Cache, *,
                max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, eos: np.ndarray,
                pad: int, seed: int, stream: Callable[[np.ndarray], None] | None) -> np.ndarray:
    """Choose a token from `logits`, then `decode(tokens, cache) -> (logits, cache)`, until every row has hit
    an eos id or max_new_tokens are out. Finished rows get `pad`. Returns the new tokens [B, n]."""
    key = jax.random.key(seed)
    out = []
    done = np.zeros((logits.shape[0],), bool)
    for step in range(max_new_tokens):
        tokens_dev, key = _choose(logits, key, done, pad, temperature=float(temperature), top_k=top_k, top_p=top_p)
        if step < max_new_tokens - 1:
            # Queue the next decode step before waiting for this step's tokens: the host's work below (the copy,
            # the stream callback, the stop test) then overlaps the device's. When every row has stopped, this
            # one step is wasted.
            logits, cache = decode(tokens_dev, cache)
        tokens = np.asarray(tokens_dev)
        out.append(tokens[:, None])
        if stream is not None:
            stream(tokens)
        done |= np.isin(tokens, eos)
        if done.all():
            break
    return np.concatenate(out, axis=1) if out else np.zeros((logits.shape[0], 0), np.int32)
