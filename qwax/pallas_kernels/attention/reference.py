"""Plain masked softmax attention with grouped-query heads and a float32 softmax: the oracle for xla.py.

Query head h reads KV head h // G (G = Nq / Nkv); scores are q.k / sqrt(D); a query with no visible key
gives zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, Lq, Nq, D], k, v [B, Lk, Nkv, D], mask [B, Lq, Lk] bool -> [B, Lq, Nq, D] in v.dtype."""
    b, lq, nq, d = q.shape
    nkv = k.shape[2]
    qg = q.reshape(b, lq, nkv, nq // nkv, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    mask = mask[:, None, None]  # [B, 1, 1, Lq, Lk]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isinf(m), 0.0, m)), 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32))
    return out.reshape(b, lq, nq, d).astype(v.dtype)


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, L, Nq, D], k, v [B, L, Nkv, D], mask [B, L, L] bool -> [B, L, Nq, D]."""
    return _softmax_attention(q, k, v, mask)


def attend_cache_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, kv_valid: jax.Array,
                           index: jax.Array, group: jax.Array | None = None) -> jax.Array:
    """The queries at slots [index, index + L) over every valid slot up to their own.

    q [B, L, Nq, D]; k_cache [*lead, B, Nkv, D, T], v_cache [*lead, B, Nkv, T, D] (cache.py); kv_valid [B, T]
    bool -> [B, L, Nq, D].
    """
    if group is not None:
        k_cache, v_cache = k_cache[group], v_cache[group]
    keys, values = k_cache.transpose(0, 3, 1, 2), v_cache.transpose(0, 2, 1, 3)  # [B, T, Nkv, D]
    slots = jnp.arange(keys.shape[1], dtype=jnp.int32)
    q_slot = index + jnp.arange(q.shape[1], dtype=jnp.int32)
    mask = kv_valid[:, None, :] & (slots[None, None, :] <= q_slot[None, :, None])
    return _softmax_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask).astype(q.dtype)
