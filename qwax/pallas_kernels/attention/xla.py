"""Blocked softmax attention for XLA: the training form (causal query blocks) and the read of a KV cache.

Both keep the scores of one block at a time: on the CPU, cache-resident blocks matter more than the FLOPs they
save. The training form skips the fully masked upper-triangle blocks (seq 2048, forward+backward of the bench
layer: 0.91 s unblocked, ~0.25 s blocked); the cache read visits only the filled blocks of the cache, or reads a
small, at least half full single-layer cache in one pass (decoding), because slicing a block out of the cache
copies it, which on the CPU cost more than the attention matmuls that read it (16k context: 1.3 of 2.0 ms per
token); the empty half then costs at most what the filled half does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwax.pallas_kernels.attention.cache import at

# Cache slots per step of the blocked attention over a cache (decode and prefill read only the filled blocks):
# at most KV_BLOCK, fewer for long query chunks so one step's scores stay under KV_BLOCK_SCORES per (row, KV head).
KV_BLOCK = 2048
KV_BLOCK_SCORES = 2**19
# Scores per (batch row, KV head) up to which attend_cache may read a whole cache in one pass.
DENSE_CACHE_SCORES = 2**20

# Queries per block of the training-path attention: ATTN_Q_BLOCK, or more for sequences long enough to need
# over ATTN_MAX_BLOCKS blocks (the blocks are unrolled, so their number bounds compile time).
ATTN_Q_BLOCK = 128
ATTN_MAX_BLOCKS = 32


def kv_block_size(queries: int, groups: int, slots: int) -> int:
    """Slots per attention step for `queries` new tokens with `groups` query heads per KV head: a power of two
    in [256, KV_BLOCK] (the whole cache when it is shorter)."""
    block = KV_BLOCK
    while block > 256 and block * queries * groups > KV_BLOCK_SCORES:
        block //= 2
    return min(block, slots)


def _grouped_queries(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """q [B, L, Nq, D] -> head-major [B, Nkv, G, L, D], pre-scaled by D^-0.5.

    Head-major operands let both attention matmuls read and write the scores and probabilities in place, with
    no transposed copy of them (on the CPU those copies cost more than the matmuls); transposing q is O(L).
    """
    b, l, nq, d = q.shape
    return q.reshape(b, l, num_kv_heads, nq // num_kv_heads, d).transpose(0, 2, 3, 1, 4) * (d ** -0.5)


def _merged_heads(out: jax.Array) -> jax.Array:
    """Head-major [B, Nkv, G, L, D] -> [B, L, Nq, D]."""
    b, nkv, g, l, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, l, nkv * g, d)


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Causal softmax attention in query blocks. q [B, L, Nq, D], k/v [B, L, Nkv, D], mask [B, L, L] bool
    -> [B, L, Nq, D] in v.dtype.

    mask must be causal in sequence index: query block i then needs only keys [0, end of block i). Rows with
    no visible key give finite values that mean nothing.
    """
    q = _grouped_queries(q, k.shape[2])  # [B, Nkv, G, L, D]
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


def attend_cache_xla(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, kv_valid: jax.Array,
                     index: jax.Array, group: jax.Array | None = None, block: int | None = None) -> jax.Array:
    """Causal attention of L new queries over the filled part of a cache, without a [B, L, T] mask or score
    tensor for long caches; a step costs O(context), not O(capacity).

    q [B, L, Nq, D] for the tokens at slots [index, index + L), which the cache already holds; k_cache, v_cache
    in the layout of cache.py; kv_valid [B, T] bool. Returns [B, L, Nq, D]; queries with no visible key give
    zeros. Forms:
    - blocked: only the ceil((index + L) / block) filled blocks are read, one block of slots at a time (a while
      loop with an online softmax);
    - dense (a cache of one layer, `group` None, at least half full, and few scores): one pass over all T slots.
    `block` forces the blocked form with that block size (tests).
    """
    acc, _, den = attend_cache_stats(q, k_cache, v_cache, kv_valid, index, group, block)
    out = acc / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)[..., None]
    return _merged_heads(out).astype(q.dtype)


def attend_cache_stats(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, kv_valid: jax.Array,
                       index: jax.Array, group: jax.Array | None = None, block: int | None = None,
                       first_slot: jax.Array | int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The unnormalised online-softmax state of `attend_cache_xla` over the slots a cache (or a shard of one)
    holds: (acc [B, Nkv, G, L, D], running max m and denominator [B, Nkv, G, L]), float32, queries grouped per
    KV head as `_grouped_queries` lays them out.

    The arrays' slot j is the sequence's slot first_slot + j (a context-parallel shard of a cache holds
    [first_slot, first_slot + T)); everything else as `attend_cache_xla`. Rows that saw no key have m = -inf and
    den = 0. Shards' states combine by rescaling to the largest m (qwax.sharding.context_parallel).
    """
    b, l, nq, d = q.shape
    t, nkv = v_cache.shape[-2], v_cache.shape[-3]
    groups = nq // nkv
    qg = _grouped_queries(q, nkv)  # [B, Nkv, G, L, D]
    q_slot = index + jnp.arange(l, dtype=jnp.int32)
    filled = jnp.clip(index + l - first_slot, 0, t)  # this cache's slots that hold tokens up to the last query
    stats = qg.shape[:-1]
    init = (jnp.zeros(qg.shape, jnp.float32), jnp.full(stats, -jnp.inf, jnp.float32), jnp.zeros(stats, jnp.float32))

    def dense():
        slots = first_slot + jnp.arange(t, dtype=jnp.int32)
        mask = kv_valid[:, None, :] & (slots[None, None, :] <= q_slot[None, :, None])
        return _online_softmax_step(qg, k_cache, v_cache, mask[:, None, None], init)

    def blocked():
        size = kv_block_size(l, groups, t) if block is None else min(block, t)
        lead = () if group is None else (1,)

        def step(i, carry):
            nominal = i * size
            start = jnp.minimum(nominal, t - size)  # the last block may overlap the previous one: masked below
            kb = jax.lax.dynamic_slice(k_cache, at(group, 0, 0, 0, start), (*lead, b, nkv, d, size))
            vb = jax.lax.dynamic_slice(v_cache, at(group, 0, 0, start, 0), (*lead, b, nkv, size, d))
            local = start + jnp.arange(size, dtype=jnp.int32)
            mask = (jax.lax.dynamic_slice_in_dim(kv_valid, start, size, axis=1)[:, None, :]
                    & ((first_slot + local)[None, None, :] <= q_slot[None, :, None])
                    & (local >= nominal)[None, None, :])
            return _online_softmax_step(qg, kb.reshape(b, nkv, d, size), vb.reshape(b, nkv, size, d),
                                        mask[:, None, None], carry)

        return jax.lax.fori_loop(0, (filled + size - 1) // size, step, init)

    if block is None and group is None and l * groups * t <= DENSE_CACHE_SCORES:
        return jax.lax.cond(2 * filled >= t, dense, blocked)
    return blocked()
