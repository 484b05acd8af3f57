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
    """Keys and values of one attention layer, preallocated to the maximum length T.

    k [*lead, B, Nkv, D, T] (keys transposed) and v [*lead, B, Nkv, T, D]: a block of slots is then, as stored, the
    right-hand operand of both attention matmuls (q @ K_blk and p @ V_blk), which on the CPU reads a 16k-slot cache
    ~2.5x faster than slicing keys stored [T, D]. `lead` is () for one layer, or (num_groups,) for the scanned
    stack, where a layer addresses its entry with `LayerContext.cache_group`.
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def empty(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype, lead: tuple[int, ...] = ()
              ) -> "KVCache":
        return cls(k=jnp.zeros((*lead, batch, num_kv_heads, head_dim, max_len), dtype),
                   v=jnp.zeros((*lead, batch, num_kv_heads, max_len, head_dim), dtype))


# Cache slots per step of the blocked attention over a cache (decode and prefill read only the filled blocks):
# at most KV_BLOCK, fewer for long query chunks so one step's scores stay under KV_BLOCK_SCORES per (row, KV head).
KV_BLOCK = 2048
KV_BLOCK_SCORES = 2**19
# Scores per (batch row, KV head) up to which attend_cache may read a whole cache in one pass.
DENSE_CACHE_SCORES = 2**20

# Queries per block of the training-path attention (Attention.attend): ATTN_Q_BLOCK, or more for sequences long
# enough to need over ATTN_MAX_BLOCKS blocks (the blocks are unrolled, so their number bounds compile time).
ATTN_Q_BLOCK = 128
ATTN_MAX_BLOCKS = 32


def kv_block_size(queries: int, groups: int, slots: int) -> int:
    """Slots per attention step for `queries` new tokens with `groups` query heads per KV head: a power of two
    in [256, KV_BLOCK] (the whole cache when it is shorter)."""
    block = KV_BLOCK
    while block > 256 and block * queries * groups > KV_BLOCK_SCORES:
        block //= 2
    return min(block, slots)


def _at(group: jax.Array | None, *index) -> tuple:
    """Start indices into a cache array, with the stacked-layer index first when there is one."""
    return index if group is None else (group, *index)


def write_kv(cache: KVCache, k: jax.Array, v: jax.Array, index: jax.Array, group: jax.Array | None) -> KVCache:
    """Write k, v [B, L, Nkv, D] at slots [index, index + L) of the layer's cache (of group `group` if stacked)."""
    def write(buf, new, start):
        new = new.astype(buf.dtype)
        return jax.lax.dynamic_update_slice(buf, new if group is None else new[None], _at(group, *start))

    return KVCache(k=write(cache.k, k.transpose(0, 2, 3, 1), (0, 0, 0, index)),  # [B, Nkv, D, L]
                   v=write(cache.v, v.transpose(0, 2, 1, 3), (0, 0, index, 0)))  # [B, Nkv, L, D]


def _grouped_queries(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """q [B, L, Nq, D] -> head-major [B, Nkv, G, L, D], pre-scaled by D^-0.5.

    Head-major operands let both attention matmuls read and write the scores and probabilities in place, with
    no transposed copy of them (on the CPU those copies cost more than the matmuls); transposing q is O(L).
    """
    b, l, nq, d = q.shape
    return q.reshape(b, l, num_kv_heads, nq // num_kv_heads, d).transpose(0, 2, 3, 1, 4) * (d ** -0.5)


def _merged_heads(out: jax.Array) -> jax.Array:
    """Head-major [B, Nkv, G, L, D] -> [B, L, Nq*D]."""
    b, nkv, g, l, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, l, nkv * g * d)


def _online_softmax_step(qg: jax.Array, kb: jax.Array, vb: jax.Array, mask: jax.Array, carry: tuple) -> tuple:
    """Fold one block of slots into the running (acc, max, denominator) of an online softmax.

    qg [B, Nkv, G, L, D] (pre-scaled), kb [B, Nkv, D, S], vb [B, Nkv, S, D], mask [B, 1, 1, L, S] bool.
    """
    acc, m, den = carry
    s = jnp.einsum("bhgqd,bhdk->bhgqk", qg, kb.astype(qg.dtype), preferred_element_type=jnp.float32)
    m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1))
    # Masked scores are selected away (never a finite fill), so they add nothing even to a row that has seen no
    # key yet, whose running max stays -inf.
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isinf(m_new), 0.0, m_new)[..., None]), 0.0)
    rescale = jnp.where(jnp.isinf(m), 0.0, jnp.exp(m - m_new))
    acc = acc * rescale[..., None] + jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(vb.dtype), vb,
                                                 preferred_element_type=jnp.float32)
    return acc, m_new, den * rescale + jnp.sum(p, axis=-1)


def attend_cache(q: jax.Array, cache: KVCache, kv_valid: jax.Array, index: jax.Array,
                 group: jax.Array | None = None, block: int | None = None) -> jax.Array:
    """Causal attention of L new queries over the filled part of a cache.

    q [B, L, Nq, D] for the tokens at slots [index, index + L), which the cache already holds; kv_valid [B, T]
    bool marks slots holding real tokens. Returns [B, L, Nq*D]; queries with no visible key (padding) give zeros.
    No [B, L, T] mask or score tensor is built for long caches, and a step costs O(context), not O(capacity):
    - blocked: only the ceil((index + L) / block) filled blocks are read, one block of slots at a time (a while
      loop with an online softmax);
    - dense (a cache of one layer, `group` None, at least half full, and few scores: decoding): one pass over
      all T slots. Slicing a block out of the cache copies it, which on the CPU cost more than the attention
      matmuls that read it (16k context: 1.3 of 2.0 ms per token); the empty half costs at most what the
      filled half does.
    `block` forces the blocked form with that block size (tests).
    """
    b, l, nq, d = q.shape
    t, nkv = cache.v.shape[-2], cache.v.shape[-3]
    groups = nq // nkv
    qg = _grouped_queries(q, nkv)  # [B, Nkv, G, L, D]
    q_slot = index + jnp.arange(l, dtype=jnp.int32)
    stats = qg.shape[:-1]
    init = (jnp.zeros(qg.shape, jnp.float32), jnp.full(stats, -jnp.inf, jnp.float32), jnp.zeros(stats, jnp.float32))

    def finish(carry):
        acc, _, den = carry
        out = acc / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)[..., None]
        return _merged_heads(out).astype(q.dtype)

    def dense():
        slots = jnp.arange(t, dtype=jnp.int32)
        mask = kv_valid[:, None, :] & (slots[None, None, :] <= q_slot[None, :, None])
        return finish(_online_softmax_step(qg, cache.k, cache.v, mask[:, None, None], init))

    def blocked():
        size = kv_block_size(l, groups, t) if block is None else min(block, t)
        lead = () if group is None else (1,)

        def step(i, carry):
            nominal = i * size
            start = jnp.minimum(nominal, t - size)  # the last block may overlap the previous one: masked below
            kb = jax.lax.dynamic_slice(cache.k, _at(group, 0, 0, 0, start), (*lead, b, nkv, d, size))
            vb = jax.lax.dynamic_slice(cache.v, _at(group, 0, 0, start, 0), (*lead, b, nkv, size, d))
            slots = start + jnp.arange(size, dtype=jnp.int32)
            mask = (jax.lax.dynamic_slice_in_dim(kv_valid, start, size, axis=1)[:, None, :]
                    & (slots[None, None, :] <= q_slot[None, :, None]) & (slots >= nominal)[None, None, :])
            return _online_softmax_step(qg, kb.reshape(b, nkv, d, size), vb.reshape(b, nkv, size, d),
                                        mask[:, None, None], carry)

        return finish(jax.lax.fori_loop(0, (index + l + size - 1) // size, step, init))

    if block is None and group is None and l * groups * t <= DENSE_CACHE_SCORES:
        return jax.lax.cond(2 * (index + l) >= t, dense, blocked)
    return blocked()


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
        """Causal softmax attention. q [B, L, Nq, D], k/v [B, L, Nkv, D], mask [B, L, L] bool -> [B, L, Nq*D].

        mask must be causal in sequence index (as `attention_mask` builds it): query block i then needs only keys
        [0, end of block i), so the fully masked upper-triangle blocks are never computed. Blocks of
        ATTN_Q_BLOCK queries also keep each block's scores cache-resident, which on the CPU matters more than
        the FLOPs saved. Seq 2048, forward+backward of the bench layer: 0.91 s unblocked, ~0.25 s blocked.
        """
        q = _grouped_queries(q, self.num_kv_heads)  # [B, Nkv, G, L, D]
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Nkv, L, D]
        b, nkv, groups, l, d = q.shape
        block = max(ATTN_Q_BLOCK, -(-l // ATTN_MAX_BLOCKS))
        outs = []
        for start in range(0, l, block):
            end = min(start + block, l)
            rows = groups * (end - start)
            # Groups x queries as one axis of the matmuls: each matmul of the backward then contracts a single
            # axis, so XLA's CPU backend reads dS and P in place instead of copying them transposed first.
            qb = q[:, :, :, start:end].reshape(b, nkv, rows, d)
            scores = jnp.einsum("bhqd,bhkd->bhqk", qb, k[:, :, :end], preferred_element_type=jnp.float32)
            scores = scores.reshape(b, nkv, groups, end - start, end)
            # A finite fill keeps fully-masked rows (padding queries) NaN-free, in values and gradients. Added
            # rather than selected: the gradient then passes through unmasked (it is zero where the mask is off,
            # since exp gives 0 there), so the backward recomputes no mask per element of dS.
            scores = scores + jnp.where(mask[:, None, None, start:end, :end], 0.0, -1e30)
            # Softmax with the normalisation applied to the [.., D] output instead of the [.., keys] weights (one
            # pass fewer over the scores, forward and backward); the max is a constant shift, so no gradient.
            p = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
            out = jnp.einsum("bhqk,bhkd->bhqd", p.reshape(b, nkv, rows, end).astype(v.dtype), v[:, :, :end],
                             preferred_element_type=jnp.float32).reshape(b, nkv, groups, end - start, d)
            outs.append((out / jnp.sum(p, axis=-1, keepdims=True)).astype(v.dtype))
        return _merged_heads(jnp.concatenate(outs, axis=3))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None,
                 cache: KVCache | None = None, cache_index: jax.Array | None = None,
                 valid: jax.Array | None = None, kv_valid: jax.Array | None = None,
                 cache_group: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """x [B, L, H], cos/sin [B, L, rotary_dim] -> (y [B, L, H], updated cache or None).

        Without a cache, mask [B, L, L] bool. With one, the new keys/values are written at slots
        [cache_index, cache_index + L) (of stack entry `cache_group` when the cache is stacked over layer groups)
        and the queries attend over the filled slots that kv_valid [B, T] marks; mask is unused. valid [B, L]
        marks real tokens: padding slots hold zeros, so a cache does not depend on how a prompt was chunked.
        """
        q, k, v, gate = self.project_qkv(x, cos, sin)
        if cache is None:
            out = self.attend(q, k, v, mask)
        else:
            if valid is not None:
                k, v = (jnp.where(valid[:, :, None, None], t, 0) for t in (k, v))
            cache = write_kv(cache, k, v, cache_index, cache_group)
            out = attend_cache(q, cache, kv_valid, cache_index, cache_group)
        return self.o_proj(out * jax.nn.sigmoid(gate)), cache
