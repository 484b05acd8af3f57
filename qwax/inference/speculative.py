"""Self-speculative decoding with the MTP head: the head drafts token t+2, the main model verifies it.

Each iteration runs one MTP step (draft) and one 2-token main forward (verify) over [x, draft]:
  - the main model's choice after x equals the draft: both are committed, plus the main model's next choice
    (2 tokens per main forward);
  - otherwise only the main model's choice after x is committed (1 token per main forward), and the cache is
    rolled back by one token: attention slots are invalidated, and every Gated DeltaNet layer returns to the
    recurrent and conv state it had after x (the verify forward keeps the state after each token, see
    `keep_step_states`), so no recomputation is needed.
The MTP layer keeps its own KV cache; it only ever receives committed (hidden, next token) pairs, so it never
needs a rollback. Rows of a batch advance together: a draft is accepted only when every row accepts it, which
keeps one cache index and loses nothing but speed. Greedy decoding (temperature 0) only: the tokens are exactly
those of plain greedy decoding.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwax.config import QwaxConfig
from qwax.graph_jit import jit_with_graph
from qwax.inference.cache import Cache, init_cache
from qwax.inference.generate import cache_length, check_request, stop_tokens
from qwax.layers.attention import KVCache
from qwax.layers.gated_deltanet import GDNState
from qwax.model import QwaxForCausalLM


def init_mtp_cache(cfg: QwaxConfig, batch: int, max_len: int) -> Cache:
    """An empty cache for the MTP head's attention layers."""
    layers = tuple(KVCache.empty(batch, max_len, cfg.num_key_value_heads, cfg.head_dim, jnp.dtype(cfg.dtype))
                   for _ in range(cfg.mtp_num_hidden_layers))
    return Cache(layers=layers, valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
                 position=jnp.zeros((batch,), jnp.int32))


def rollback(cache: Cache, processed: int, keep: int) -> Cache:
    """Keep the first `keep` of the `processed` tokens of a keep_step_states forward."""
    def layer(c: Any) -> Any:
        if isinstance(c, GDNState):
            k = c.conv.shape[-2] - processed
            return GDNState(conv=jax.lax.slice_in_dim(c.conv, keep, keep + k, axis=c.conv.ndim - 2),
                            recurrent=jnp.take(c.recurrent, keep - 1, axis=c.recurrent.ndim - 4))
        return c  # attention: stale slots are invalidated below and overwritten by the next write

    start = cache.index - processed + keep
    valid = cache.valid
    if processed > keep:
        valid = jax.lax.dynamic_update_slice(valid, jnp.zeros((valid.shape[0], processed - keep), bool), (0, start))
    return Cache(layers=tuple(layer(c) for c in cache.layers), valid=valid, index=start,
                 position=cache.position - (processed - keep))


@jit_with_graph(donate_argnums=(1,))
def _prefill_chunk(graphdef, params, cache, ids, mask):
    out = nnx.merge(graphdef, params)(ids, attention_mask=mask, cache=cache)
    return out.logits[:, -1].astype(jnp.float32), out.hidden, out.cache


@jit_with_graph(donate_argnums=(1,))
def _mtp_step(graphdef, params, mtp_cache, hidden, next_ids, mask):
    out = nnx.merge(graphdef, params).mtp_forward(hidden, next_ids, attention_mask=mask, cache=mtp_cache)
    return out.logits[:, -1].astype(jnp.float32), out.cache


@jit_with_graph(static_argnums=(3,), donate_argnums=(1,))
def _verify(graphdef, params, cache, tokens, keep_after_reject):
    """Run [x, draft] and return (choices [B, 2], hidden [B, 2, H], cache if accepted, cache if rejected)."""
    out = nnx.merge(graphdef, params)(tokens, cache=cache, keep_step_states=True)
    choices = jnp.argmax(out.logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
    return choices, out.hidden, rollback(out.cache, 2, 2), rollback(out.cache, 2, keep_after_reject)


def _draft_tokens(mtp_logits: jax.Array, generated: int) -> np.ndarray:
    """The MTP head's greedy draft [B] (a seam for tests that inject an oracle draft)."""
    del generated
    return np.asarray(jnp.argmax(mtp_logits, axis=-1), np.int32)


def generate_mtp(model: QwaxForCausalLM, input_ids, *, max_new_tokens: int, attention_mask=None,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 stream: Callable[[np.ndarray], None] | None = None, prefill_chunk_size: int = 512,
                 stats: dict | None = None) -> np.ndarray:
    """Greedy generation accelerated by the MTP head; same arguments and result as `qwax.generate`.

    stats: if given, filled with {"drafts": n, "accepted": n, "acceptance_rate": f, "main_forwards": n}.
    """
    cfg = model.config
    if not cfg.mtp_num_hidden_layers:
        raise ValueError("speculative='mtp' needs a model with an MTP head (config.mtp_num_hidden_layers > 0)")
    ids, mask = check_request(cfg, input_ids, attention_mask, max_new_tokens)
    b, l = ids.shape
    eos, pad = stop_tokens(cfg, eos_token_id, pad_token_id)

    graphdef, params = nnx.split(model)
    chunk = min(prefill_chunk_size, -(-l // 16) * 16)
    padded = -(-l // chunk) * chunk
    max_len = cache_length(l, chunk, max_new_tokens)
    pids = np.zeros((b, padded), np.int32)
    pmask = np.zeros((b, padded), np.int32)
    pids[:, padded - l:], pmask[:, padded - l:] = ids, mask

    cache = init_cache(cfg, b, max_len)
    hidden = []
    for start in range(0, padded, chunk):
        sl = slice(start, start + chunk)
        logits, h, cache = _prefill_chunk(graphdef, params, cache, jnp.asarray(pids[:, sl]), jnp.asarray(pmask[:, sl]))
        hidden.append(h)
    x = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
    # MTP prefill: position j sees (hidden_j, token j+1); the last position's next token is the first choice x.
    next_ids = np.concatenate([pids[:, 1:], x[:, None]], axis=1)
    mtp_cache = init_mtp_cache(cfg, b, max_len)
    for i, start in enumerate(range(0, padded, chunk)):
        sl = slice(start, start + chunk)
        mtp_logits, mtp_cache = _mtp_step(graphdef, params, mtp_cache, hidden[i], jnp.asarray(next_ids[:, sl]),
                                          jnp.asarray(pmask[:, sl]))
    del hidden

    out, done = [ids.astype(np.int32)], np.zeros((b,), bool)
    generated, drafts, accepted, forwards = 0, 0, 0, 0

    def emit(tokens: np.ndarray) -> bool:
        nonlocal generated, done
        tokens = np.where(done, pad, tokens).astype(np.int32)
        out.append(tokens[:, None])
        if stream is not None:
            stream(tokens)
        done |= np.isin(tokens, eos)
        generated += 1
        return bool(done.all()) or generated >= max_new_tokens

    finished = max_new_tokens == 0 or emit(x)
    while not finished:
        draft = _draft_tokens(mtp_logits, generated)
        choices, h2, cache_if_accept, cache_if_reject = _verify(graphdef, params, cache,
                                                                jnp.asarray(np.stack([x, draft], 1)), 1)
        choices = np.asarray(choices)
        forwards, drafts = forwards + 1, drafts + 1
        if np.array_equal(choices[:, 0], draft):
            accepted += 1
            cache = cache_if_accept
            mtp_logits, mtp_cache = _mtp_step(graphdef, params, mtp_cache, h2, jnp.asarray(choices),
                                              jnp.ones((b, 2), jnp.int32))
            finished = emit(choices[:, 0]) or emit(choices[:, 1])
            x = choices[:, 1]
        else:
            cache = cache_if_reject
            mtp_logits, mtp_cache = _mtp_step(graphdef, params, mtp_cache, h2[:, :1], jnp.asarray(choices[:, :1]),
                                              jnp.ones((b, 1), jnp.int32))
            finished = emit(choices[:, 0])
            x = choices[:, 0]
    if stats is not None:
        stats.update(drafts=drafts, accepted=accepted, main_forwards=forwards,
                     acceptance_rate=accepted / drafts if drafts else 0.0)
    return np.concatenate(out, axis=1)
