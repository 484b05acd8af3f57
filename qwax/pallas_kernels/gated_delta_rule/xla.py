"""Chunked gated delta rule in plain JAX, shaped for XLA on the CPU.

The sequence is cut into chunks of C tokens. Per (batch, value head, chunk), positions i, j in [0, C):

  G_i      = g_0 + ... + g_i                   cumulative log decay inside the chunk
  D_ij     = exp(G_i - G_j)  for j <= i in the same segment, else 0
  M_ij     = beta_i (k_i . k_j) D_ij  for j < i, else 0
  T        = (I + M)^-1                        unit lower triangular (the UT / WY transform)
  V'       = T (beta * V - first * beta * exp(G) * (K S))      the true u_t of the recurrence
             (= U - W S with U = T (beta V), W = T (first beta exp(G) K), applying T only once)
  O        = scale * [first * exp(G) * (Q S) + ((Q K^T) * D) V']
  S_next   = first_{C-1} exp(G_{C-1}) S + K^T (last * exp(G_{C-1} - G) * V')

first_i says position i is still in the segment that was running when the chunk started (S applies to it),
last_j says position j is in the segment still running at the chunk's end (it survives into S_next). Without
segment_ids both are all ones.

How the work is split (measured on a 2-core CPU, see benchmarks/bench_gated_delta_rule.py):
- Everything of size [C, d] runs inside one `lax.scan` over chunks, batched over heads. XLA's CPU matmuls
  ran these moderately sized products faster than the same work as products batched over all chunks at
  once, and the per-chunk intermediates stay in cache instead of making several passes over [L, d]-sized
  arrays in memory (memory bandwidth, not arithmetic, limited the all-chunks-at-once version).
- T is the one step that needs a sequential loop (over its C rows). It is computed inside the scan step,
  where it does not depend on the state, so XLA overlaps it with the state matmuls on a second core; this
  was faster than computing T for all chunks (or groups of chunks) before the scan, and T is never stored.
- Chunks are token-major ([N, B, C, H, d]), a free reshape of the [B, L, H, d] input when B == 1, for
  autodiff (which stores them); the forward-only loop makes one head-major copy ([N, B, H, C, d]) of q, k, v
  before it and of the outputs after it instead of transposing every chunk. Q and K share one product with
  K^T and one with the state ([Q; K] stacked along the chunk axis).
- Autodiff stores one [dk, dv] state per chunk (the scan body is rematerialised), never one per token as
  the per-token scan does.
- The forward alone (prefill, evaluation) overwrites each chunk of beta * V with that chunk's outputs instead
  of scanning into a fresh output buffer, in a loop unrolled by `_CHUNK_UNROLL` chunks. A custom JVP sends
  differentiation (forward and reverse mode) to the scan form.
- The [C, C]-sized work (T, Q K^T, applying T) grows with C while the state work does not: on the CPU,
  chunk_size=32 is the default there (`default_chunk_size`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Chunks per iteration of the forward-only loop. On the CPU a loop iteration costs a fixed overhead on top of its
# small per-chunk products; unrolling 4-8 chunks took the L=4096 forward from ~68-74 ms to ~56-60 ms.
_CHUNK_UNROLL = 8


@jax.custom_jvp
def _unit_lower_inverse(m: jax.Array) -> jax.Array:
    """(I + M)^-1 for strictly lower-triangular M [..., C, C], batched over the leading axes.

    Forward substitution one row at a time, each step vectorised over the leading axes. It is exact up to
    rounding and stable. On the CPU it beat batched `solve_triangular` and the log-step product
    (I - M)(I + M^2)(I + M^4)... by several times; a blocked variant (16-row blocks merged pairwise) ran ~2x
    faster at C = 64 but took seconds longer to compile per shape, for ~4% of the whole forward.
    """
    c = m.shape[-1]
    eye = jnp.eye(c, dtype=m.dtype)

    def row(i, t):
        # Row i of T satisfies T_i = e_i - M_i T, and M_i is zero from column i on, so rows < i suffice.
        return t.at[..., i, :].set(eye[i] - jnp.einsum("...j,...jk->...k", m[..., i, :], t))

    return jax.lax.fori_loop(0, c, row, jnp.zeros_like(m))


@_unit_lower_inverse.defjvp
def _unit_lower_inverse_jvp(primals, tangents):
    # dT = -T dM T instead of differentiating the row loop. Reverse mode transposes it to M_bar = -T^T T_bar T^T;
    # the caller builds M with a strictly-lower mask, whose transpose keeps only that part of M_bar. Written with
    # T^T as the operand and dM negated first, the transpose is what the former hand-written VJP ran: plain
    # matmuls reading one materialised T^T, then the negation fused with the mask. Written as -(T dM T), XLA got
    # transposed-operand dots and a separate negation pass, ~5% slower forward+backward at C=32 on the CPU.
    (m,), (dm,) = primals, tangents
    t = _unit_lower_inverse(m)
    t_h = jnp.swapaxes(t, -1, -2)
    t_dm = jnp.einsum("...ji,...jk->...ik", t_h, -dm)  # T (-dM)
    return t, jnp.einsum("...ik,...lk->...il", t_dm, t_h)  # T (-dM) T


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _share_across_value_heads(x: jax.Array, r: int) -> jax.Array:
    """[..., Hk, C, C] -> [..., Hk, r, C, C]: a key-head quantity used by each of its r value heads."""
    return jnp.broadcast_to(x[..., None, :, :], (*x.shape[:-2], r, *x.shape[-2:]))


@_share_across_value_heads.defjvp
def _share_across_value_heads_jvp(r, primals, tangents):
    # The tangent is stacked, not broadcast: the transpose of a stack (reverse mode) sums the r slices with
    # r - 1 adds, where that of a broadcast is a reduce over the short middle axis, which XLA's CPU ran ~30x
    # slower. The primal stays a broadcast, which its consumers fuse.
    (x,), (dx,) = primals, tangents
    return _share_across_value_heads(x, r), jnp.stack([dx] * r, axis=-3)


def _segment_masks(
    segment_ids: jax.Array | None, b: int, n: int, c: int, pad: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-chunk segment masks, each shaped to broadcast against [N, B, Hk, r, C(, C)].

    Returns (same [N, B, 1, 1, C, C]: positions j <= i in one segment; first [N, B, 1, 1, C]: position still
    in the segment running at the chunk start; last [N, B, 1, 1, C]: position in the segment running at the
    chunk end). Without segment_ids `same` is None (the causal mask applies) and first, last are ones.
    """
    if segment_ids is None:
        ones = jnp.ones((n, b, 1, 1, c), jnp.float32)
        return None, ones, ones
    causal = jnp.tril(jnp.ones((c, c), bool))
    changed = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    # A running count of resets names segments even when an id value is reused later in the row.
    seg = jnp.cumsum(jnp.pad(changed, [(0, 0), (1, 0)]), axis=1)
    # Padding continues the last segment so the final state is carried through it untouched.
    seg = jnp.pad(seg, [(0, 0), (0, pad)], mode="edge").reshape(b, n, c)
    # The segment running when a chunk starts is that of the previous token; for the first chunk it is
    # segment 0, where initial_state applies.
    seg_start = jnp.pad(seg[:, :-1, -1], [(0, 0), (1, 0)])
    seg = jnp.swapaxes(seg, 0, 1)[:, :, None, None]  # [N, B, 1, 1, C]
    seg_start = jnp.swapaxes(seg_start, 0, 1)[:, :, None, None, None]
    same = causal & (seg[..., :, None] == seg[..., None, :])
    first = (seg == seg_start).astype(jnp.float32)
    last = (seg == seg[..., -1:]).astype(jnp.float32)
    return same, first, last


def gated_delta_rule_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """Chunked gated delta rule. Same contract as `gated_delta_rule` (shapes already validated there).

    Args:
      q, k: [B, L, Hk, dk]; v: [B, L, Hv, dv]; g, beta: [B, L, Hv].
      initial_state: [B, Hv, dk, dv] or None. segment_ids: [B, L] or None.
      chunk_size: tokens per chunk; L is padded up to a multiple of it (capped at L for short inputs).

    Returns:
      (o [B, L, Hv, dv] in v.dtype, final_state [B, Hv, dk, dv] float32).
    """
    b, length, _, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    scale = dk**-0.5 if scale is None else scale
    if initial_state is None:
        initial_state = jnp.zeros((b, hv, dk, dv), jnp.float32)
    return _chunked(q, k, v, g, beta, initial_state.astype(jnp.float32), segment_ids, scale, min(chunk_size, length))


def _chunked_loop(q, k, v, g, beta, initial_state, segment_ids, scale: float, c: int, *, in_place: bool):
    """gated_delta_rule_xla with chunk size c. in_place: the forward-only loop (see `_chunked`), else a scan."""
    out_dtype = v.dtype
    b, length, hk, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    r = hv // hk
    n = -(-length // c)
    pad = n * c - length

    f32 = jnp.float32
    q, k, v, g, beta = (x.astype(f32) for x in (q, k, v, g, beta))
    # Padding with k = v = beta = g = 0 leaves outputs and the final state unchanged (zero write, unit decay).
    if pad:
        q, k, v, g, beta = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in (q, k, v, g, beta))

    # Token-major chunks [N, B, C, ...]; value heads split as [Hk, r] so key-head work is done once per key head.
    def to_chunks(x: jax.Array) -> jax.Array:
        return jnp.swapaxes(x.reshape(b, n, c, *x.shape[2:]), 0, 1)

    q, k = to_chunks(q), to_chunks(k)  # [N, B, C, Hk, dk]
    v = to_chunks(v.reshape(b, n * c, hk, r, dv))  # [N, B, C, Hk, r, dv]
    # Gates are small: put C last so they broadcast against [C, C] matrices.
    g, beta = (jnp.moveaxis(to_chunks(x.reshape(b, n * c, hk, r)), 2, -1) for x in (g, beta))  # [N, B, Hk, r, C]

    same, first, last = _segment_masks(segment_ids, b, n, c, pad)
    causal = jnp.tril(jnp.ones((c, c), bool))
    strictly_lower = jnp.tril(jnp.ones((c, c), bool), -1)
    gcum = jnp.cumsum(g, axis=-1)  # [N, B, Hk, r, C]

    # Per-position scalings, all <= 1 in magnitude since G <= 0 (no overflow for strong decay).
    decay_from_start = jnp.exp(gcum)
    q_scale = scale * first * decay_from_start  # reads of the start state
    w_scale = first * beta * decay_from_start  # writes that the start state corrects
    to_end = last * jnp.exp(gcum[..., -1:] - gcum)  # how much of each write survives to the chunk end
    chunk_decay = (first * decay_from_start)[..., -1]  # [N, B, Hk, r]; 0 if a segment starts in the chunk

    v_scaled = v * jnp.moveaxis(beta, -1, 2)[..., None]  # beta * V, [N, B, C, Hk, r, dv]

    def chunk_step(s, v_n, xs):
        # Head-major: q_n, k_n [B, Hk, C, dk], v_n [B, Hk, r, C, dv]; returns o in v_n's layout.
        # s is the transposed state S^T [B, Hk, r, dv, dk], the layout the update matmul produces.
        q_n, k_n, beta_n, same_n, gcum_n, q_scale_n, w_scale_n, to_end_n, chunk_decay_n = xs
        # D [B, Hk, r, C, C]. Mask the exponent, not the result: G_i - G_j is >= 0 above the diagonal and
        # could overflow exp.
        mask = causal if same_n is None else same_n
        decay = jnp.exp(jnp.where(mask, gcum_n[..., :, None] - gcum_n[..., None, :], -jnp.inf))
        # T does not depend on the state: XLA runs its row loop alongside the K S and Q S matmuls.
        # Q and K stacked along the chunk axis: one product each for [Q; K] K^T and [Q; K] S.
        qk_n = jnp.concatenate([q_n, k_n], axis=2)  # [B, Hk, 2C, dk]
        both_k = jnp.einsum("bhid,bhjd->bhij", qk_n, k_n)  # [B, Hk, 2C, C]
        qk, kk = (_share_across_value_heads(x, r) for x in (both_k[..., :c, :], both_k[..., c:, :]))
        both_s = jnp.einsum("bhcd,bhred->bhrce", qk_n, s)  # [B, Hk, r, 2C, dv]
        t_n = _unit_lower_inverse(jnp.where(strictly_lower, beta_n[..., :, None] * kk * decay, 0.0))
        # V' = U - W S = T (beta V - w_scale * (K S)): T is applied once, to the corrected values.
        residual = v_n - w_scale_n[..., None] * both_s[..., c:, :]
        v_new = jnp.einsum("bhrij,bhrje->bhrie", t_n, residual)  # [B, Hk, r, C, dv]
        o = q_scale_n[..., None] * both_s[..., :c, :]
        o = o + jnp.einsum("bhrij,bhrje->bhrie", scale * qk * decay, v_new)
        s = chunk_decay_n[..., None, None] * s + jnp.einsum(
            "bhrce,bhcd->bhred", to_end_n[..., None] * v_new, k_n
        )
        return s, o

    def token_major_step(s, v_n, q_n, k_n, *rest):  # chunk_step on [B, C, H, ...] chunks
        s, o = chunk_step(s, jnp.moveaxis(v_n, 1, 3), (jnp.moveaxis(q_n, 1, 2), jnp.moveaxis(k_n, 1, 2), *rest))
        return s, jnp.moveaxis(o, 3, 1)

    s0 = jnp.swapaxes(initial_state.reshape(b, hk, r, dk, dv), -1, -2)
    xs = (q, k, beta, same, gcum, q_scale, w_scale, to_end, chunk_decay)
    if in_place:
        # Head-major copies made once, rather than transposed copies of each chunk inside the loop (autodiff
        # would store them: the scan below works on the token-major chunks, free views of the input when B == 1).
        q, k = (jnp.moveaxis(x, 2, 3) for x in (q, k))  # [N, B, Hk, C, dk]
        v_scaled = jnp.moveaxis(v_scaled, 2, 4)  # [N, B, Hk, r, C, dv]
        xs = (q, k, *xs[2:])

        # Chunk i of beta * V is read only by step i: overwrite it with that chunk's outputs.
        def body(i, carry):
            s, buf = carry
            at_i = lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False)
            s, o_i = chunk_step(s, at_i(buf), jax.tree.map(at_i, xs))
            return s, jax.lax.dynamic_update_index_in_dim(buf, o_i, i, 0)

        s_final, o = jax.lax.fori_loop(0, n, body, (s0, v_scaled), unroll=_CHUNK_UNROLL)
        o = jnp.moveaxis(o, 4, 2)  # [N, B, C, Hk, r, dv]
    else:
        # Rematerialise the step in the backward pass: autodiff then keeps only the per-chunk start states.
        s_final, o = jax.lax.scan(jax.checkpoint(lambda s, x: token_major_step(s, x[0], *x[1])), s0,
                                  (v_scaled, xs))
    o = jnp.swapaxes(o, 0, 1).reshape(b, n * c, hv, dv)[:, :length]
    return o.astype(out_dtype), jnp.swapaxes(s_final, -1, -2).reshape(b, hv, dk, dv)


@functools.partial(jax.custom_jvp, nondiff_argnums=(7, 8))
def _chunked(q, k, v, g, beta, initial_state, segment_ids, scale: float, c: int):
    """The primal alone runs the in-place loop: a scan would zero-fill a fresh [L, Hv, dv] output buffer and
    write every chunk into it, ~10% of the forward at L=4096 on the CPU. Differentiation (forward mode, and
    reverse mode, which transposes this JVP) runs the scan, whose autodiff needs beta * V intact and stores one
    state per chunk."""
    return _chunked_loop(q, k, v, g, beta, initial_state, segment_ids, scale, c, in_place=True)


@_chunked.defjvp
def _chunked_jvp(scale, c, primals, tangents):
    *floats, segment_ids = primals  # segment_ids are integers: their tangent (float0) is dropped

    def scanned(*args):
        return _chunked_loop(*args, segment_ids, scale, c, in_place=False)

    return jax.jvp(scanned, tuple(floats), tuple(tangents[:6]))
