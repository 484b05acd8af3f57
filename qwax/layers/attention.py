"""Gated full attention of Qwen3-Next / Qwen3.5 (shared/spec/ARCHITECTURE.md section 5).

q_proj yields, per head, the query (first head_dim values) and an output gate (next head_dim values); q and k get a
zero-centred RMSNorm over head_dim, then partial RoPE; grouped-query attention with a float32 softmax; the output
is multiplied by sigmoid(gate) before o_proj.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwax.config import QwaxConfig
from qwax.layers.common import Linear
from qwax.layers.norms import RMSNorm
from qwax.layers.rotary import apply_rotary


def attention_mask(kv_valid: jax.Array, q_pos: jax.Array, kv_pos: jax.Array,
                   q_segment: jax.Array | None = None, kv_segment: jax.Array | None = None) -> jax.Array:
    """[B, Lq, Lk] bool: causal (kv_pos <= q_pos), key not padding, and same segment when packing.

    kv_valid [B, Lk] bool; q_pos [B, Lq] / kv_pos [B, Lk] int sequence indices.
    """
    mask = (kv_pos[:, None, :] <= q_pos[:, :, None]) & kv_valid[:, None, :]
    if q_segment is not None:
        mask &= q_segment[:, :, None] == kv_segment[:, None, :]
    return mask


class KVCache(NamedTuple):
    """Keys and values of one attention layer, preallocated to the maximum length: k, v [B, T, Nkv, D]."""

    k: jax.Array
    v: jax.Array


class Attention(nnx.Module):
    """Gated grouped-query attention. Weights: q_proj [H, Nq*2D], k_proj/v_proj [H, Nkv*D], o_proj [Nq*D, H]."""

    def __init__(self, cfg: QwaxConfig, *, rngs: nnx.Rngs):
        h, nq, nkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = nq, nkv, d
        self.q_proj = Linear(h, nq * 2 * d, ("embed", "q_heads"), cfg=cfg, rngs=rngs)
        self.k_proj = Linear(h, nkv * d, ("embed", "kv_heads"), cfg=cfg, rngs=rngs)
        self.v_proj = Linear(h, nkv * d, ("embed", "kv_heads"), cfg=cfg, rngs=rngs)
        self.o_proj = Linear(nq * d, h, ("heads", "embed"), cfg=cfg, rngs=rngs)
        self.q_norm = RMSNorm(d, cfg=cfg, rngs=rngs)
        self.k_norm = RMSNorm(d, cfg=cfg, rngs=rngs)

    def project_qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """x [B, L, H] -> q [B, L, Nq, D], k, v [B, L, Nkv, D] (normed and rotated), gate [B, L, Nq*D]."""
        b, l, _ = x.shape
        qg = self.q_proj(x).reshape(b, l, self.num_heads, 2 * self.head_dim)
        q, gate = qg[..., : self.head_dim], qg[..., self.head_dim:]
        k = self.k_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
        q = apply_rotary(self.q_norm(q), cos, sin)
        k = apply_rotary(self.k_norm(k), cos, sin)
        return q, k, v, gate.reshape(b, l, -1)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """Softmax attention. q [B, Lq, Nq, D], k/v [B, Lk, Nkv, D], mask [B, Lq, Lk] bool -> [B, Lq, Nq*D]."""
        b, lq, nq, d = q.shape
        groups = nq // self.num_kv_heads
        q = q.reshape(b, lq, self.num_kv_heads, groups, d)
        scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k) * (d ** -0.5)
        # A finite fill keeps fully-masked rows (padding queries) NaN-free, in values and gradients.
        scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
        return out.reshape(b, lq, nq * d)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 cache: KVCache | None = None, cache_index: jax.Array | None = None,
                 valid: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """x [B, L, H], cos/sin [B, L, rotary_dim] -> (y [B, L, H], updated cache or None).

        Without a cache, mask is [B, L, L]. With one, the new keys/values are written at slots
        [cache_index, cache_index + L) and the queries attend over all T slots: mask is [B, L, T].
        valid [B, L] bool marks real tokens: padding slots of the cache hold zeros, so a cache does not depend
        on how the prompt was split into prefill chunks.
        """
        q, k, v, gate = self.project_qkv(x, cos, sin)
        if cache is not None:
            if valid is not None:
                k, v = (jnp.where(valid[:, :, None, None], t, 0) for t in (k, v))
            start = (0, cache_index, 0, 0)
            cache = KVCache(k=jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start),
                            v=jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start))
            k, v = cache.k.astype(q.dtype), cache.v.astype(q.dtype)
        out = self.attend(q, k, v, mask)
        return self.o_proj(out * jax.nn.sigmoid(gate)), cache
