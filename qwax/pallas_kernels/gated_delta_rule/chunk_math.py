"""Per-chunk math of the gated delta rule in the TPU Pallas kernels (tpu.py, decode.py); gpu.py writes the same
math with Mosaic GPU's warpgroup matmuls.

Every function here works on values already loaded from refs, one (batch, value head, chunk) at a time, and uses
only ops that Mosaic (TPU) lowers: 2-D matmuls with float32 accumulation (`_dot`), iota,
compare/select, shifts, exp and reductions along one axis. In particular there is no triangular solve (T comes
from `unit_lower_inverse`, matmuls only), no transpose of a value (transposed products are dot_general
contractions) and no cumulative sum: the cumulative log decays arrive precomputed.

Notation (as xla.py; docs/model.md, Gated DeltaNet, the chunked form), for C positions i, j of one chunk, start state S [dk, dv]:

  G        cumulative log decay in the chunk (input, precomputed by the wrapper)
  D_ij     = exp(G_i - G_j) if j <= i and i, j are in the same segment, else 0
  A_ij     = beta_i (k_i . k_j) D_ij for j < i, else 0;    T = (I + A)^-1
  V'       = T (beta * V - first * beta * exp(G) * (K S))          (the u_t of the recurrence)
  O        = scale * first * exp(G) * (Q S) + (scale * (Q K^T) * D) V'
  S_next   = first_{C-1} exp(G_{C-1}) S + K^T (last * exp(G_{C-1} - G) * V')

first_i / last_i are 1 when position i is in the segment running at the chunk's start / end (all ones without
segment ids); seg_i is a running segment number (float32, exact below 2^24 segments).

Per-position scalars arrive as rows [1, C] (the layout the [B, H, N, C] gate arrays give); the math needs them
as columns [C, 1] too, which `_col` makes with a masked lane reduction (no value transpose needed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST  # float32 matmuls must not drop to one bf16 pass on TPU

_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _dot(a: jax.Array, b: jax.Array, dims=_NN) -> jax.Array:
    return jax.lax.dot_general(a, b, dims, precision=_HIGHEST, preferred_element_type=_F32)


def _iotas(c: int) -> tuple[jax.Array, jax.Array]:
    """(row index, column index), each [C, C] int32."""
    return jax.lax.broadcasted_iota(jnp.int32, (c, c), 0), jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)


def _col(row: jax.Array) -> jax.Array:
    """[1, C] -> [C, 1] (the diagonal of the broadcast, summed along lanes)."""
    i, j = _iotas(row.shape[-1])
    return jnp.sum(jnp.where(i == j, row, 0.0), axis=1, keepdims=True)


def _lane(row: jax.Array, index: int) -> jax.Array:
    """Element `index` of a [1, C] row as [1, 1], by a masked reduction (no unaligned lane slice)."""
    lanes = jax.lax.broadcasted_iota(jnp.int32, row.shape, 1)
    return jnp.sum(jnp.where(lanes == index, row, 0.0), axis=1, keepdims=True)


def _row(col: jax.Array) -> jax.Array:
    """[C, 1] -> [1, C]."""
    i, j = _iotas(col.shape[0])
    return jnp.sum(jnp.where(i == j, col, 0.0), axis=0, keepdims=True)


_INVERSE_BLOCK = 16


def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """T = (I + A)^-1 for strictly lower-triangular A [C, C], with matmuls only (MXU / tl.dot).

    1. Diagonal blocks of 16 (all at once): forward substitution where step s finalises row s of every block,
       T_i = e_i - A_bd[i] T (A_bd: A's diagonal blocks; row i only reads rows already final). Each step is one
       [C, C] matmul whose other rows are discarded: 16 sequential matmuls instead of C dependent row updates.
    2. Merge: I + A = (I + A_bd)(I + N) with N = T_bd A_off (A_off: A below the diagonal blocks), so
       T = (I + N)^-1 T_bd, and N is nilpotent of degree nb = C / 16: (I + N)^-1 = (I - N)(I + N^2)(I + N^4)...
       with log2(nb) factors (4 matmuls in all at C = 64).
    The plain log-step product (I - A)(I + A^2)(I + A^4)... over the whole chunk would be shorter, but its
    partial powers grow like binomial coefficients when keys repeat (A -> all ones below the diagonal,
    C(63, 31) ~ 1e18 at C = 64) and cancellation loses every digit in float32. Substitution inside blocks is
    exact up to rounding, and the merge only has powers of N up to nb - 1 (3 at C = 64), whose entries stay
    small in that case (T_bd A_off has entries of size 1 there).
    """
    c = a.shape[0]
    i, j = _iotas(c)
    bs = _INVERSE_BLOCK if c % _INVERSE_BLOCK == 0 and c > _INVERSE_BLOCK else c
    eye = jnp.where(i == j, 1.0, 0.0)
    if bs == c:
        a_bd, pos = a, i
    else:
        shift = bs.bit_length() - 1  # bs is a power of two: shifts and masks, no vector integer division
        same_block = jax.lax.shift_right_logical(i, shift) == jax.lax.shift_right_logical(j, shift)
        a_bd, pos = jnp.where(same_block, a, 0.0), i & (bs - 1)

    def step(s, t):
        return jnp.where(pos == s, eye - _dot(a_bd, t), t)

    t = jax.lax.fori_loop(0, bs, step, jnp.zeros((c, c), _F32))
    if bs == c:
        return t
    n = _dot(t, jnp.where(same_block, 0.0, a))
    t = t - _dot(n, t)  # (I - N) T_bd
    power, reach = n, 2
    while reach < c // bs:  # N^(2^m) is zero once 2^m >= nb
        power = _dot(power, power)
        t = t + _dot(power, t)
        reach *= 2
    return t


def _prepare(k, g_row, b_row, seg_row):
    """Masks, decays and T for one chunk. Returns a dict of [C, C] and [C, 1] intermediates."""
    c = k.shape[0]
    i, j = _iotas(c)
    g_col, b_col, seg_col = _col(g_row), _col(b_row), _col(seg_row)
    same = (i >= j) & (seg_col == seg_row)
    # Mask the exponent, not the result: G_i - G_j >= 0 above the diagonal and could overflow exp.
    decay = jnp.where(same, jnp.exp(jnp.where(same, g_col - g_row, 0.0)), 0.0)
    kk = _dot(k, k, _NT)
    t = unit_lower_inverse(jnp.where(i > j, b_col * kk * decay, 0.0))
    return dict(g_col=g_col, b_col=b_col, decay=decay, kk=kk, t=t)


def _scalings(g_col, b_col, g_row, f_row, l_row, scale):
    f_col, l_col = _col(f_row), _col(l_row)
    e = jnp.exp(g_col)  # <= 1: G <= 0
    c = g_row.shape[-1]
    g_last = _lane(g_row, c - 1)  # [1, 1]
    chunk_decay = _lane(f_row, c - 1) * jnp.exp(g_last)  # [1, 1]; 0 if a segment starts inside the chunk
    to_end = l_col * jnp.exp(g_last - g_col)  # [C, 1]; <= 1 since G is non-increasing
    return dict(f_col=f_col, e=e, q_scale=scale * f_col * e, w=f_col * b_col * e, chunk_decay=chunk_decay,
                to_end=to_end)


def chunk_forward(q, k, v, g_row, b_row, seg_row, f_row, l_row, s, *, scale: float):
    """One chunk forward.

    Args:
      q, k: [C, dk] float32; v: [C, dv]; g_row (cumulative log decay), b_row (beta), seg_row, f_row, l_row: [1, C];
      s: [dk, dv] start state.
    Returns:
      (o [C, dv], s_next [dk, dv]), float32.
    """
    p = _prepare(k, g_row, b_row, seg_row)
    sc = _scalings(p["g_col"], p["b_col"], g_row, f_row, l_row, scale)
    residual = p["b_col"] * v - sc["w"] * _dot(k, s)
    v_new = _dot(p["t"], residual)
    o = sc["q_scale"] * _dot(q, s) + _dot(scale * _dot(q, k, _NT) * p["decay"], v_new)
    s_next = sc["chunk_decay"] * s + _dot(k, sc["to_end"] * v_new, _TN)
    return o, s_next


def chunk_backward(q, k, v, g_row, b_row, seg_row, f_row, l_row, s, do, ds_next, *, scale: float):
    """One chunk backward: cotangents of `chunk_forward`'s inputs from those of its outputs.

    Recomputes the forward intermediates from the stored start state s. Args as `chunk_forward`, plus do [C, dv]
    and ds_next [dk, dv]. Returns (dq [C, dk], dk [C, dk], dv [C, dv], dg_row [1, C] (w.r.t. the cumulative
    decays G), db_row [1, C], ds [dk, dv]).
    """
    c = q.shape[0]
    i, j = _iotas(c)
    p = _prepare(k, g_row, b_row, seg_row)
    g_col, b_col, decay, kk, t = p["g_col"], p["b_col"], p["decay"], p["kk"], p["t"]
    sc = _scalings(g_col, b_col, g_row, f_row, l_row, scale)
    ks, qs = _dot(k, s), _dot(q, s)
    residual = b_col * v - sc["w"] * ks
    v_new = _dot(t, residual)
    qk = _dot(q, k, _NT)
    p_mat = scale * qk * decay

    # S_next = chunk_decay * S + K^T (to_end * V')
    ds = sc["chunk_decay"] * ds_next
    d_chunk_decay = jnp.sum(jnp.sum(s * ds_next, axis=1, keepdims=True), axis=0, keepdims=True)  # [1, 1]
    dv_end = _dot(k, ds_next)  # d(to_end * V')
    dk = _dot(sc["to_end"] * v_new, ds_next, _NT)
    dv_new = sc["to_end"] * dv_end
    d_to_end = jnp.sum(v_new * dv_end, axis=1, keepdims=True)  # [C, 1]

    # O = q_scale * (Q S) + P V',  P = scale * (Q K^T) * D
    dq = sc["q_scale"] * _dot(do, s, _NT)
    ds = ds + _dot(q, sc["q_scale"] * do, _TN)
    d_q_scale = jnp.sum(qs * do, axis=1, keepdims=True)
    dp = _dot(do, v_new, _NT)
    dv_new = dv_new + _dot(p_mat, do, _TN)
    dqk = scale * dp * decay
    d_decay = scale * dp * qk
    dq = dq + _dot(dqk, k)
    dk = dk + _dot(dqk, q, _TN)

    # V' = T R and T = (I + A)^-1: dR = T^T dV', dA = -T^T dV' R^T T^T = -dR V'^T (strictly lower part).
    dr = _dot(t, dv_new, _TN)
    da = jnp.where(i > j, -_dot(dr, v_new, _NT), 0.0)
    # A = strict * beta_i * KK * D
    dkk = da * b_col * decay
    db_col = jnp.sum(da * kk * decay, axis=1, keepdims=True)
    d_decay = d_decay + da * b_col * kk
    dk = dk + _dot(dkk, k) + _dot(dkk, k, _TN)

    # R = beta * V - w * (K S),  w = first * beta * exp(G)
    dv = b_col * dr
    db_col = db_col + jnp.sum(v * dr, axis=1, keepdims=True)
    dw = -jnp.sum(ks * dr, axis=1, keepdims=True)
    dks = -sc["w"] * dr
    dk = dk + _dot(dks, s, _NT)
    ds = ds + _dot(k, dks, _TN)
    db_col = db_col + sc["f_col"] * sc["e"] * dw

    # Cumulative decays: through exp(G) (q_scale, w), D_ij = exp(G_i - G_j), to_end and chunk_decay.
    de = sc["f_col"] * b_col * dw + scale * sc["f_col"] * d_q_scale
    e_mat = d_decay * decay
    dg_col = sc["e"] * de + jnp.sum(e_mat, axis=1, keepdims=True) - d_to_end * sc["to_end"]
    dg_last = jnp.sum(d_to_end * sc["to_end"], axis=0, keepdims=True) + d_chunk_decay * sc["chunk_decay"]  # [1, 1]
    last_lane = jax.lax.broadcasted_iota(jnp.int32, (1, c), 1) == c - 1
    dg_row = _row(dg_col) - jnp.sum(e_mat, axis=0, keepdims=True) + jnp.where(last_lane, dg_last, 0.0)
    return dq, dk, dv, dg_row, _row(db_col), ds


def decode_step(q_col, k_col, v_row, g, beta, s, *, scale: float):
    """One token. q_col, k_col: [dk, 1]; v_row: [1, dv]; g, beta: [1, 1]; s: [dk, dv]. Returns (o [1, dv], s').

    Only broadcasts and reductions: a one-row matmul would waste the MXU.
    """
    s = s * jnp.exp(g)
    u = beta * (v_row - jnp.sum(k_col * s, axis=0, keepdims=True))
    s = s + k_col * u
    o = scale * jnp.sum(q_col * s, axis=0, keepdims=True)
    return o, s
