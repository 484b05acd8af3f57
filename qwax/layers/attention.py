"""Gated full attention of Qwen3-Next / Qwen3.5 (docs/model.md, Gated attention).

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
from qwax.options import RunOptions
from qwax.pallas_kernels.attention import K_DIMS, V_DIMS, kv_cache_shapes
from qwax.pallas_kernels.attention import attend_cache as attend_cache_op
from qwax.pallas_kernels.attention import write_kv as write_kv_op
from qwax.sharding.context_parallel import attention, cached_attention

# Logical axis name (qwax.sharding rules) of each dim of the attention op's cache arrays.
_CACHE_AXES = {"batch": "cache_batch", "kv_heads": "cache_kv_heads", "slots": "cache_len", "head_dim": None}


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
    """Keys and values of one attention layer, preallocated to the maximum length T, in the attention op's layout
    (`qwax.pallas_kernels.attention.kv_cache_shapes`). `lead` is () for one layer, or (num_groups,) for the
    scanned stack, where a layer addresses its entry with `LayerContext.cache_group`.
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def empty(cls, cfg: QwaxConfig, opts: RunOptions, batch: int, max_len: int, lead: tuple[int, ...] = ()
              ) -> "KVCache":
        """Zeros for `batch` rows of `max_len` slots in the compute dtype (`lead`: stacked-layer dims)."""
        k_shape, v_shape = kv_cache_shapes(batch, cfg.num_key_value_heads, cfg.head_dim, max_len, lead)
        return cls(k=jnp.zeros(k_shape, opts.dtype), v=jnp.zeros(v_shape, opts.dtype))

    def logical_axes(self) -> "KVCache":
        """The same structure with a tuple of logical axis names per array (for qwax.sharding rules)."""
        lead = ("layers",) * (self.k.ndim - len(K_DIMS))
        return KVCache(k=(*lead, *(_CACHE_AXES[d] for d in K_DIMS)),
                       v=(*lead, *(_CACHE_AXES[d] for d in V_DIMS)))

    def rollback(self, processed: int, keep: int) -> "KVCache":
        """Keep the first `keep` of the last `processed` tokens: a no-op, since the slots of the dropped tokens
        are marked invalid by the cache's slot bookkeeping and overwritten by the next write."""
        del processed, keep
        return self


def write_kv(cache: KVCache, k: jax.Array, v: jax.Array, index: jax.Array, group: jax.Array | None) -> KVCache:
    """Write k, v [B, L, Nkv, D] at slots [index, index + L) of the layer's cache (of group `group` if stacked)."""
    return KVCache(*write_kv_op(cache.k, cache.v, k, v, index, group))


def attend_cache(q: jax.Array, cache: KVCache, kv_valid: jax.Array, index: jax.Array,
                 group: jax.Array | None = None, block: int | None = None, impl: str = "auto") -> jax.Array:
    """Causal attention of the queries q [B, L, Nq, D] at slots [index, index + L) over the valid slots
    (kv_valid [B, T] bool) of a cache that already holds them -> [B, L, Nq*D] (see the op's attend_cache)."""
    out = attend_cache_op(q, cache.k, cache.v, kv_valid, index, group, block=block, impl=impl)
    return out.reshape(*q.shape[:2], -1)


class Attention(nnx.Module):
    """Gated grouped-query attention. Weights: q_proj [H, Nq*2D], k_proj/v_proj [H, Nkv*D], o_proj [Nq*D, H]."""

    def __init__(self, cfg: QwaxConfig, opts: RunOptions, *, rngs: nnx.Rngs):
        h, nq, nkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = nq, nkv, d
        self.impl = opts.attention_impl
        self.q_proj = Linear(h, nq * 2 * d, ("embed", "q_heads"), cfg=cfg, opts=opts, rngs=rngs)
        self.k_proj = Linear(h, nkv * d, ("embed", "kv_heads"), cfg=cfg, opts=opts, rngs=rngs)
        self.v_proj = Linear(h, nkv * d, ("embed", "kv_heads"), cfg=cfg, opts=opts, rngs=rngs)
        self.o_proj = Linear(nq * d, h, ("heads", "embed"), cfg=cfg, opts=opts, rngs=rngs)
        self.q_norm = RMSNorm(d, cfg=cfg, opts=opts, rngs=rngs)
        self.k_norm = RMSNorm(d, cfg=cfg, opts=opts, rngs=rngs)

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

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None,
                 cache: KVCache | None = None, cache_index: jax.Array | None = None,
                 valid: jax.Array | None = None, kv_valid: jax.Array | None = None,
                 cache_group: jax.Array | None = None, segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        """x [B, L, H], cos/sin [B, L, rotary_dim] -> (y [B, L, H], updated cache or None).

        Without a cache, mask [B, L, L] bool (causal), built from valid [B, L] and segment_ids [B, L] (which
        context parallelism reads instead of the mask, qwax.sharding.context_parallel). With one, the new keys/values are written at slots
        [cache_index, cache_index + L) (of stack entry `cache_group` when the cache is stacked over layer groups)
        and the queries attend over the filled slots that kv_valid [B, T] marks; mask is unused. valid [B, L]
        marks real tokens: padding slots hold zeros, so a cache does not depend on how a prompt was chunked.
        """
        b, l, _ = x.shape
        q, k, v, gate = self.project_qkv(x, cos, sin)
        if cache is None:
            out = attention(q, k, v, mask, kv_valid=valid, segment_ids=segment_ids, impl=self.impl).reshape(b, l, -1)
        else:
            if valid is not None:
                k, v = (jnp.where(valid[:, :, None, None], t, 0) for t in (k, v))
            out, k_cache, v_cache = cached_attention(q, k, v, cache.k, cache.v, kv_valid, cache_index, cache_group,
                                                     impl=self.impl)
            cache, out = KVCache(k_cache, v_cache), out.reshape(b, l, -1)
        return self.o_proj(out * jax.nn.sigmoid(gate)), cache
