"""Context parallelism: one sequence split over the `context` mesh axis, for training and prefill.

With C context shards, shard i holds tokens [i * Lc, (i + 1) * Lc) of every row (Lc = L / C; the rule tables map
"length" to `context`). Token-local work (projections, norms, the MoE, the loss) runs on the local tokens
unchanged; the three sequence mixers exchange what crosses a shard boundary:

  causal conv     each shard receives the last K - 1 inputs of the previous shard (a halo, one `ppermute`);
                  shard 0 reads the cache's history (or zeros), as the unsharded op does.
  gated delta     the final state of a segment of tokens is affine in its initial state: S_out = A S_in + B,
  rule            A [dk, dk] the product of the tokens' transitions exp(g_t) (I - beta_t k_t k_t^T), B the state
                  reached from zero. Each shard runs its chunks twice with the local kernel: from a zero state
                  (outputs o0, and B), and from the identity with v = 0 (per-token reads o^A_t = scale A_t^T q_t,
                  and A). A log-depth prefix scan over the context axis (ppermute by 1, 2, 4, ...) composes the
                  maps (A_i, B_i) o (A_j, B_j) = (A_i A_j, A_i B_j + B_i), giving each shard its true incoming
                  state S_in; its outputs are then o_t = o0_t + S_in^T o^A_t. A document that starts exactly at
                  a shard's first token (segment ids) does not receive the incoming state; resets inside a shard
                  already zero A. The backward pass is autodiff through the scan: the state gradient travels
                  the ppermutes in reverse.
  attention       ring attention: the queries stay, the key/value block (with its validity and segment ids)
                  goes around the ring in C steps, each step merged with an online softmax; causal, padding and
                  packed-document masks use global sequence indices. Each step is rematerialised in the backward
                  pass, so one step's [Lc, Lc] scores are live at a time. Over a KV cache (prefill chunks,
                  decoding; `cached_attention`) the cache stays split by slots and the shards' softmax states
                  are combined instead.

Used by the layers through `gated_delta_rule`, `causal_depthwise_conv` and `attention` below: the same arguments
and results as the single-device ops, context-parallel when the active `qwax.sharding.use_sharding` mesh has a
`context` axis > 1 that the rules use for "length" and the sequence (or the cache) divides into whole shards;
otherwise the plain op runs. The shard_maps use check_vma=False as in expert parallelism; tests compare logits and every gradient
with one device.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from qwax.pallas_kernels.attention import attend_cache as attend_cache_op
from qwax.pallas_kernels.attention import attention as attention_op
from qwax.pallas_kernels.attention import write_kv as write_kv_op
from qwax.pallas_kernels.attention.xla import attend_cache_stats
from qwax.pallas_kernels.causal_conv import causal_depthwise_conv as conv_op
from qwax.pallas_kernels.gated_delta_rule import gated_delta_rule as gdr_op
from qwax.sharding.mesh import mesh_sizes
from qwax.sharding.rules import Rules, active_sharding, partition_spec

AXIS = "context"
# Masked scores: a finite stand-in for -inf, so that no exp or gradient ever sees an infinity.
_NEG = -1e30
_HIGHEST = jax.lax.Precision.HIGHEST

logger = logging.getLogger("qwax.sharding")
_REPORTED: set[tuple[str, int, int]] = set()


def context_mesh(length: int, what: str, min_shard: int = 1) -> tuple[Mesh | AbstractMesh, Rules] | None:
    """(mesh, rules) when a sequence of `length` tokens runs context-parallel under the active sharding, else None.

    It does when the mesh has a `context` axis > 1, the rules shard "length" over it, and the axis divides
    `length` into shards of at least `min_shard` tokens; a sequence that cannot be split is logged (once per
    case) and runs on whole sequences.
    """
    active = active_sharding()
    if active is None:
        return None
    mesh, rules = active
    c = mesh_sizes(mesh).get(AXIS, 1)
    if c == 1 or AXIS not in rules.get("length", ()):
        return None
    if length % c or length // c < min_shard:
        key = (what, length, c)
        if length >= c * min_shard and key not in _REPORTED:  # (decoding steps are short by design: no warning)
            _REPORTED.add(key)
            logger.warning("context parallelism: %s over %d tokens does not split into %d shards of at least %d "
                           "tokens: it runs on whole sequences", what, length, c, min_shard)
        return None
    return mesh, rules


def _row_specs(mesh: Mesh | AbstractMesh, rules: Rules, batch: int, length: int) -> tuple[Any, Any]:
    """Mesh axes of the batch dim and of the length dim (always `context` here) of [B, L] arrays."""
    spec = tuple(partition_spec(("batch", "length"), (batch, length), rules, mesh)) + (None, None)
    return spec[0], spec[1]


def _head_axis(mesh: Mesh | AbstractMesh, *heads: int) -> str | None:
    """`tensor` when it splits every head count evenly (heads stay whole per shard), else None."""
    tp = mesh_sizes(mesh).get("tensor", 1)
    return "tensor" if tp > 1 and all(h % tp == 0 for h in heads) else None


def _shift(x: jax.Array, c: int, by: int = 1) -> jax.Array:
    """Shard i receives shard i - by's x (shards < by receive zeros)."""
    return jax.lax.ppermute(x, AXIS, [(j, j + by) for j in range(c - by)])


# ------------------------------------------------------------------ causal conv
def causal_depthwise_conv(x: jax.Array, kernel: jax.Array, history: jax.Array | None = None,
                          segment_ids: jax.Array | None = None, *, impl: str = "auto") -> jax.Array:
    """`qwax.pallas_kernels.causal_conv.causal_depthwise_conv` (x [B, L, C], kernel [C, K], history [B, K-1, C],
    segment_ids [B, L] -> [B, L, C]), with a halo exchange when the sequence is split over `context`."""
    k = kernel.shape[-1]
    active = context_mesh(x.shape[1], "the causal conv", min_shard=k - 1)
    if active is None:
        return conv_op(x, kernel, history, segment_ids, impl=impl)
    mesh, rules = active
    b, l, ch = x.shape
    c = mesh_sizes(mesh)[AXIS]
    rows, seq = _row_specs(mesh, rules, b, l)
    if history is None:
        history = jnp.zeros((b, k - 1, ch), x.dtype)
    # Only shard 0 reads the history: give it a leading context dim so that each shard holds its own copy.
    history = jnp.broadcast_to(history[None], (c, *history.shape))

    def body(x, kernel, history, segment_ids):
        i = jax.lax.axis_index(AXIS)
        halo = _shift(x[:, -(k - 1):], c)
        before = jnp.where(i == 0, history[0].astype(x.dtype), halo)
        if segment_ids is None:
            return conv_op(x, kernel, before, None, impl=impl)
        # With documents, the op keeps a tap only inside t's document; the unsharded op marks the positions
        # before the row with id -1, so shard 0 does the same and the others use the previous shard's ids.
        halo_ids = _shift(segment_ids[:, -(k - 1):], c)
        before_ids = jnp.where(i == 0, -1, halo_ids)
        out = conv_op(jnp.concatenate([before, x], axis=1), kernel, None,
                      jnp.concatenate([before_ids, segment_ids], axis=1), impl=impl)
        return out[:, k - 1:]

    seg_spec = None if segment_ids is None else P(rows, seq)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(P(rows, seq, None), P(), P(None, rows, None, None), seg_spec),
                       out_specs=P(rows, seq, None), check_vma=False)
    return fn(x, kernel, history, segment_ids)


# ------------------------------------------------------------------ gated delta rule
def _compose(a: jax.Array, b: jax.Array, a_prev: jax.Array, b_prev: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The map "S -> a_prev S + b_prev, then S -> a S + b" as one (A [B, Hv, dk, dk], B [B, Hv, dk, dv])."""
    return (jnp.einsum("bhij,bhjk->bhik", a, a_prev, precision=_HIGHEST),
            jnp.einsum("bhij,bhjv->bhiv", a, b_prev, precision=_HIGHEST) + b)


def gated_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, *,
                     initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                     chunk_size: int | None = None, impl: str = "auto") -> tuple[jax.Array, jax.Array]:
    """`qwax.pallas_kernels.gated_delta_rule.gated_delta_rule` (q, k [B, L, Hk, dk]; v [B, L, Hv, dv]; g, beta
    [B, L, Hv]; initial_state [B, Hv, dk, dv]; segment_ids [B, L] -> (o [B, L, Hv, dv], final state)),
    context-parallel by the affine-map prefix scan of the module docstring when the sequence is split."""
    kwargs = dict(chunk_size=chunk_size, impl=impl)
    active = context_mesh(q.shape[1], "the gated delta rule")
    if active is None:
        return gdr_op(q, k, v, g, beta, initial_state=initial_state, segment_ids=segment_ids,
                                        **kwargs)
    mesh, rules = active
    b, l, hk, dk = q.shape
    hv, dv = v.shape[-2:]
    c = mesh_sizes(mesh)[AXIS]
    rows, seq = _row_specs(mesh, rules, b, l)
    heads = _head_axis(mesh, hk, hv)
    start = jnp.zeros((b, hv, dk, dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    start = jnp.broadcast_to(start[None], (c, *start.shape))  # one copy per shard (its gradient sums over them)

    def body(q, k, v, g, beta, segment_ids, start):
        i = jax.lax.axis_index(AXIS)
        bl, lc, hvl = v.shape[0], v.shape[1], v.shape[2]
        run = lambda v, s0: gdr_op(q, k, v, g, beta, initial_state=s0,  # noqa: E731
                                                     segment_ids=segment_ids, **kwargs)
        o0, b_local = run(v, None)
        eye = jnp.broadcast_to(jnp.eye(dk, dtype=jnp.float32), (bl, hvl, dk, dk))
        o_a, a_local = run(jnp.zeros((bl, lc, hvl, dk), jnp.float32), eye)
        if segment_ids is not None:  # a document starting at this shard's first token ignores the incoming state
            prev_last = _shift(segment_ids[:, -1], c)
            carries = (i == 0) | (segment_ids[:, 0] == prev_last)
            a_local = a_local * carries[:, None, None, None]
        else:
            carries = None
        a, bm = a_local, b_local
        d = 1
        while d < c:  # inclusive scan: shard i ends with the map of shards 0..i
            a_new, b_new = _compose(a, bm, _shift(a, c, d), _shift(bm, c, d))
            a, bm = jnp.where(i >= d, a_new, a), jnp.where(i >= d, b_new, bm)
            d *= 2
        a_in = jnp.where(i == 0, eye, _shift(a, c))  # maps of shards 0..i-1 (identity for shard 0)
        b_in = jnp.where(i == 0, 0.0, _shift(bm, c))
        s_in = jnp.einsum("bhij,bhjv->bhiv", a_in, start[0], precision=_HIGHEST) + b_in
        if carries is not None:
            s_in = s_in * carries[:, None, None, None]
        o = o0.astype(jnp.float32) + jnp.einsum("blhk,bhkv->blhv", o_a, s_in, precision=_HIGHEST)
        final = jnp.einsum("bhij,bhjv->bhiv", a_local, s_in, precision=_HIGHEST) + b_local
        return o.astype(v.dtype), final[None]

    tokens4 = P(rows, seq, heads, None)
    tokens3 = P(rows, seq, heads)
    state = P(AXIS, rows, heads, None, None)
    seg_spec = None if segment_ids is None else P(rows, seq)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(tokens4, tokens4, tokens4, tokens3, tokens3, seg_spec, state),
                       out_specs=(tokens4, state), check_vma=False)
    o, finals = fn(q, k, v, g, beta, segment_ids, start)
    return o, finals[-1]


# ------------------------------------------------------------------ attention
# Rematerialised in the backward pass: autodiff then keeps each step's running statistics and key/value block, and
# recomputes one step's [Lc, Lc] scores at a time, instead of keeping every step's scores (C x the memory).
@jax.checkpoint
def _ring_step(qh: jax.Array, q_pos: jax.Array, q_seg: jax.Array | None, kb: jax.Array, vb: jax.Array,
               valid_b: jax.Array, seg_b: jax.Array | None, first: jax.Array, carry: tuple) -> tuple:
    """Fold one key/value block into the online softmax (m, denominator [B, Nkv, G, Lq], acc [.., Lq, D]).

    qh [B, Lq, Nkv, G, D] pre-scaled float32 queries at sequence indices q_pos [Lq]; kb, vb [B, Lk, Nkv, D] the
    block of tokens first + [0, Lk), valid_b [B, Lk] bool, seg_b / q_seg [B, Lk] / [B, Lq] segment ids or None.
    Unlike the cache read's step (pallas_kernels/attention/xla.py), which is forward-only and marks unseen rows
    with m = -inf, masked scores here get a finite fill: this step is differentiated, and an infinity in either
    branch of a select would turn the gradients of rows with no visible key into NaN.
    """
    m, denom, acc = carry
    kv_pos = first + jnp.arange(kb.shape[1])
    visible = (kv_pos[None, None, :] <= q_pos[None, :, None]) & valid_b[:, None, :]  # [B, Lq, Lk]
    if q_seg is not None:
        visible &= q_seg[:, :, None] == seg_b[:, None, :]
    visible = visible[:, None, None]
    scores = jnp.einsum("bqngd,bknd->bngqk", qh, kb.astype(jnp.float32), precision=_HIGHEST)
    scores = jnp.where(visible, scores, _NEG)
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
    p = jnp.where(visible, jnp.exp(scores - m_new[..., None]), 0.0)
    rescale = jnp.exp(m - m_new)
    denom = denom * rescale + jnp.sum(p, axis=-1)
    acc = acc * rescale[..., None] + jnp.einsum("bngqk,bknd->bngqd", p, vb.astype(jnp.float32), precision=_HIGHEST)
    return m_new, denom, acc


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, kv_valid: jax.Array | None = None,
              segment_ids: jax.Array | None = None, impl: str = "auto") -> jax.Array:
    """`qwax.pallas_kernels.attention.attention` (q [B, L, Nq, D]; k, v [B, L, Nkv, D]; mask [B, L, L] bool
    -> [B, L, Nq, D]). When the sequence is split over `context`, ring attention replaces the op, and the mask
    is not read: it is rebuilt per block from kv_valid [B, L] bool (None: no padding) and segment_ids [B, L],
    which must then describe it (causal in sequence index, as `qwax.layers.attention.attention_mask` builds)."""
    active = context_mesh(q.shape[1], "attention")
    if active is None:
        return attention_op(q, k, v, mask, impl=impl)
    mesh, rules = active
    b, l, nq, d = q.shape
    nkv = k.shape[2]
    c = mesh_sizes(mesh)[AXIS]
    rows, seq = _row_specs(mesh, rules, b, l)
    heads = _head_axis(mesh, nq, nkv)
    if kv_valid is None:
        kv_valid = jnp.ones((b, l), bool)

    def body(q, k, v, kv_valid, segment_ids):
        i = jax.lax.axis_index(AXIS)
        bl, lc, nql, _ = q.shape
        nkvl = k.shape[2]
        g = nql // nkvl
        qh = q.reshape(bl, lc, nkvl, g, d).astype(jnp.float32) * (d ** -0.5)
        q_pos = i * lc + jnp.arange(lc)
        m = jnp.full((bl, nkvl, g, lc), _NEG, jnp.float32)
        denom = jnp.zeros((bl, nkvl, g, lc), jnp.float32)
        acc = jnp.zeros((bl, nkvl, g, lc, d), jnp.float32)
        block = (k, v, kv_valid, segment_ids)
        carry = (m, denom, acc)
        for step in range(c):
            kb, vb, valid_b, seg_b = block
            source = (i - step) % c  # the shard whose keys this step holds
            carry = _ring_step(qh, q_pos, segment_ids, kb, vb, valid_b, seg_b, source * lc, carry)
            if step + 1 < c:  # pass the block on around the ring
                block = tuple(None if t is None else jax.lax.ppermute(t, AXIS, [(j, (j + 1) % c) for j in range(c)])
                              for t in block)
        _, denom, acc = carry
        out = acc / jnp.maximum(denom, 1e-30)[..., None]  # rows with no visible key: zeros
        return out.transpose(0, 3, 1, 2, 4).reshape(bl, lc, nql, d).astype(v.dtype)

    tokens = P(rows, seq, heads, None)
    seg_spec = None if segment_ids is None else P(rows, seq)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(tokens, tokens, tokens, P(rows, seq), seg_spec),
                       out_specs=tokens, check_vma=False)
    return fn(q, k, v, kv_valid, segment_ids)


# ------------------------------------------------------------------ attention over a KV cache
def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     kv_valid: jax.Array, index: jax.Array, group: jax.Array | None = None, *, impl: str = "auto"
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Write the new keys and values k, v [B, L, Nkv, D] at slots [index, index + L) of the cache (entry `group`
    when stacked; `qwax.pallas_kernels.attention.write_kv`), then attend the queries q [B, L, Nq, D] over its
    valid slots kv_valid [B, T] (`attend_cache`). Returns (out [B, L, Nq, D], k_cache, v_cache).

    With the cache's slots split over `context` (T divisible by it), each shard writes the new tokens that fall
    in its own slots and attends all L queries over them (the chunk's queries are gathered: they are few next
    to the cache), and the shards' online-softmax states are combined by a max and two sums over the axis: the
    work and the cache are split by slots, and no shard reads another's keys.
    """
    active = context_mesh(k_cache.shape[-1], "cached attention")
    if active is None or impl == "reference":
        k_cache, v_cache = write_kv_op(k_cache, v_cache, k, v, index, group)
        return attend_cache_op(q, k_cache, v_cache, kv_valid, index, group, impl=impl), k_cache, v_cache
    mesh, rules = active
    b, l, nq, d = q.shape
    nkv, t = k.shape[2], k_cache.shape[-1]
    lead = k_cache.ndim - 4
    rows, _ = _row_specs(mesh, rules, b, t)
    heads = _head_axis(mesh, nq, nkv)
    group = jnp.zeros((), jnp.int32) if group is None else group

    def body(q, k, v, k_cache, v_cache, kv_valid, index, group):
        i = jax.lax.axis_index(AXIS)
        ts = k_cache.shape[-1]
        first = i * ts
        # The new token for each local slot (where one lands there): a select over the shard, since the chunk
        # may straddle two shards.
        offset = first + jnp.arange(ts) - index
        lands = (offset >= 0) & (offset < l)
        pick = jnp.clip(offset, 0, l - 1)

        def write(buf, new, slot_axis):  # new: [B, Nkv, D, L] or [B, Nkv, L, D], slots on `slot_axis`
            entry = buf if lead == 0 else jax.lax.dynamic_index_in_dim(buf, group, 0, keepdims=False)
            taken = jnp.take(new.astype(buf.dtype), pick, axis=slot_axis)
            shape = [1] * entry.ndim
            shape[slot_axis] = ts
            entry = jnp.where(lands.reshape(shape), taken, entry)
            return entry if lead == 0 else jax.lax.dynamic_update_index_in_dim(buf, entry, group, 0)

        k_cache = write(k_cache, k.transpose(0, 2, 3, 1), 3)
        v_cache = write(v_cache, v.transpose(0, 2, 1, 3), 2)
        acc, m, den = attend_cache_stats(q, k_cache, v_cache, kv_valid, index, None if lead == 0 else group,
                                         first_slot=first)
        m_all = jax.lax.pmax(m, AXIS)
        scale = jnp.where(jnp.isinf(m), 0.0, jnp.exp(m - jnp.where(jnp.isinf(m_all), 0.0, m_all)))
        den = jax.lax.psum(den * scale, AXIS)
        acc = jax.lax.psum(acc * scale[..., None], AXIS)
        out = acc / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)[..., None]  # [B, Nkv, G, L, D]
        return out.transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype), k_cache, v_cache

    tokens = P(rows, None, heads, None)
    cache_k = P(*(None,) * lead, rows, heads, None, AXIS)
    cache_v = P(*(None,) * lead, rows, heads, AXIS, None)
    fn = jax.shard_map(body, mesh=mesh,
                       in_specs=(tokens, tokens, tokens, cache_k, cache_v, P(rows, AXIS), P(), P()),
                       out_specs=(tokens, cache_k, cache_v), check_vma=False)
    return fn(q, k, v, k_cache, v_cache, kv_valid, jnp.asarray(index, jnp.int32), group)
