"""Grouped matmul (gmm) and transposed grouped matmul (tgmm) Pallas kernels for GPU (Triton lowering).

Triton-style Pallas has no scalar prefetch, so instead of a work-item grid (see ``tpu.py``) each
program owns one output tile and loops over what contributes to it:

gmm: grid ``(M / tm, N / tn)``. The row tile ``[m0, m0 + tm)`` overlaps the groups
``[group_lo[m], group_hi[m])`` (computed in plain JAX from the group offsets). For each such
non-empty group the program accumulates ``lhs_tile @ rhs[g]`` over K in registers and keeps the rows
that belong to g. Output tiles are disjoint between programs, so there are no races and no atomics;
rows past ``sum(group_sizes)`` belong to no group and stay zero.

tgmm: grid ``(G, K / tk, N / tn)``. Program (g, ki, ni) loops over the row tiles of group g, loading
``lhs`` and ``grad`` tiles with row masks (rows of neighbouring groups read as 0), and accumulates
``lhs_tile^T @ grad_tile``; an empty group loops zero times and writes zeros.

Operands are zero-padded so every tile is full; tiles must be powers of two >= 16 (Triton ``tl.dot``).
The big operands are passed as whole-array blocks and sliced in the kernel with ``pl.ds`` (the
paged-attention idiom), because the rhs slab each program reads depends on data (the group).

Verified: values in Pallas interpret mode (``interpret=True``) on the CPU. Not verified here: Triton
lowering and performance on a real GPU (none available).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qwax.pallas_kernels.moe.common import round_up

_F32 = jnp.float32

DEFAULT_TILES = (64, 32, 64)  # (tm, tk, tn)


def _check_tiles(tiling: tuple[int, int, int]) -> None:
    for t in tiling:
        if t < 16 or t & (t - 1):
            raise ValueError(f"GPU tiling entries must be powers of two >= 16, got tiling={tiling}")


def _offsets(group_sizes: jax.Array, m: int) -> jax.Array:
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends]).astype(jnp.int32)


def _whole(shape: tuple[int, ...]) -> pl.BlockSpec:
    """A block covering the whole array (sliced inside the kernel)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _gmm_kernel(glo_ref, ghi_ref, offs_ref, lhs_ref, rhs_ref, out_ref, *, tm, tk, tn, nk, transpose_rhs):
    mi = pl.program_id(0)
    ni = pl.program_id(1)
    m0 = mi * tm
    rows = m0 + jnp.arange(tm, dtype=jnp.int32)

    def group_body(g, out):
        start = offs_ref[g]
        end = offs_ref[g + 1]

        def compute(out):
            def k_body(kk, acc):
                a = lhs_ref[pl.ds(m0, tm), pl.ds(kk * tk, tk)]
                if transpose_rhs:
                    b = rhs_ref[g, pl.ds(ni * tn, tn), pl.ds(kk * tk, tk)]
                    return acc + plgpu.dot(a, b, trans_b=True).astype(_F32)
                b = rhs_ref[g, pl.ds(kk * tk, tk), pl.ds(ni * tn, tn)]
                return acc + plgpu.dot(a, b).astype(_F32)

            acc = jax.lax.fori_loop(0, nk, k_body, jnp.zeros((tm, tn), _F32))
            keep = (rows >= start) & (rows < end)
            return jnp.where(keep[:, None], acc, out)

        # Empty groups inside the tile's range would cost a full K loop for nothing.
        return jax.lax.cond(end > start, compute, lambda o: o, out)

    out = jax.lax.fori_loop(glo_ref[mi], ghi_ref[mi], group_body, jnp.zeros((tm, tn), _F32))
    out_ref[...] = out.astype(out_ref.dtype)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    tiling: tuple[int, int, int] = DEFAULT_TILES,
    interpret: bool = False,
) -> jax.Array:
    """Grouped matmul on GPU: ``out[r] = lhs[r] @ rhs[g(r)]`` (``rhs[g(r)].T`` if ``transpose_rhs``).

    Args:
      lhs: [M, K] rows sorted by group; rhs: [G, K, N] (or [G, N, K] with ``transpose_rhs``);
      group_sizes: [G] int32 with ``sum <= M`` (rows past the sum come out as zeros).
      tiling: (tm, tk, tn), powers of two >= 16.
    Returns:
      [M, N] in ``lhs.dtype``.
    """
    _check_tiles(tiling)
    m, kdim = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiling
    m_pad, k_pad, n_pad = round_up(m, tm), round_up(kdim, tk), round_up(n, tn)
    lhs_p = jnp.pad(lhs, ((0, m_pad - m), (0, k_pad - kdim)))
    if transpose_rhs:
        rhs_p = jnp.pad(rhs, ((0, 0), (0, n_pad - n), (0, k_pad - kdim)))
    else:
        rhs_p = jnp.pad(rhs, ((0, 0), (0, k_pad - kdim), (0, n_pad - n)))
    offs = _offsets(group_sizes, m)
    tile_start = jnp.arange(m_pad // tm, dtype=jnp.int32) * tm
    # Groups overlapping [m0, m0 + tm): first group ending after m0 .. last group starting before m0 + tm.
    glo = jnp.searchsorted(offs[1:], tile_start, side="right").astype(jnp.int32)
    ghi = jnp.minimum(jnp.searchsorted(offs[:-1], tile_start + tm, side="left"), g).astype(jnp.int32)
    kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, tn=tn, nk=k_pad // tk, transpose_rhs=transpose_rhs)
    out = pl.pallas_call(
        kernel,
        grid=(m_pad // tm, n_pad // tn),
        in_specs=[
            _whole(glo.shape),
            _whole(ghi.shape),
            _whole(offs.shape),
            _whole(lhs_p.shape),
            _whole(rhs_p.shape),
        ],
        out_specs=pl.BlockSpec((tm, tn), lambda mi, ni: (mi, ni)),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), lhs.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="qwax_moe_gmm_gpu",
    )(glo, ghi, offs, lhs_p, rhs_p)
    return out[:m, :n]


def _tgmm_kernel(offs_ref, lhs_ref, grad_ref, out_ref, *, tm, tk, tn):
    g = pl.program_id(0)
    ki = pl.program_id(1)
    ni = pl.program_id(2)
    start = offs_ref[g]
    end = offs_ref[g + 1]

    def body(mi, acc):
        m0 = mi * tm
        rows = m0 + jnp.arange(tm, dtype=jnp.int32)
        keep = (rows >= start) & (rows < end)
        a = plgpu.load(lhs_ref.at[pl.ds(m0, tm), pl.ds(ki * tk, tk)],
                       mask=jnp.broadcast_to(keep[:, None], (tm, tk)), other=0)
        b = plgpu.load(grad_ref.at[pl.ds(m0, tm), pl.ds(ni * tn, tn)],
                       mask=jnp.broadcast_to(keep[:, None], (tm, tn)), other=0)
        return acc + plgpu.dot(a, b, trans_a=True).astype(_F32)

    # An empty group has start == end: zero iterations, zero output.
    m_lo = start // tm
    m_hi = jnp.where(end > start, (end + tm - 1) // tm, m_lo)
    acc = jax.lax.fori_loop(m_lo, m_hi, body, jnp.zeros((tk, tn), _F32))
    out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    tiling: tuple[int, int, int] = DEFAULT_TILES,
    interpret: bool = False,
) -> jax.Array:
    """Per-group ``lhs_g^T @ grad_g`` on GPU.

    Args:
      lhs: [M, K], grad: [M, N], rows sorted by group; group_sizes: [G] int32 (``sum <= M``).
      tiling: (tm, tk, tn), powers of two >= 16; tm is the contraction tile here.
    Returns:
      [G, K, N] in ``lhs.dtype``; empty groups are zero.
    """
    _check_tiles(tiling)
    m, kdim = lhs.shape
    n = grad.shape[1]
    g = group_sizes.shape[0]
    tm, tk, tn = tiling
    m_pad, k_pad, n_pad = round_up(m, tm), round_up(kdim, tk), round_up(n, tn)
    lhs_p = jnp.pad(lhs, ((0, m_pad - m), (0, k_pad - kdim)))
    grad_p = jnp.pad(grad, ((0, m_pad - m), (0, n_pad - n)))
    offs = _offsets(group_sizes, m)
    kernel = functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn)
    out = pl.pallas_call(
        kernel,
        grid=(g, k_pad // tk, n_pad // tn),
        in_specs=[_whole(offs.shape), _whole(lhs_p.shape), _whole(grad_p.shape)],
        out_specs=pl.BlockSpec((None, tk, tn), lambda gi, ki, ni: (gi, ki, ni)),
        out_shape=jax.ShapeDtypeStruct((g, k_pad, n_pad), lhs.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="qwax_moe_tgmm_gpu",
    )(offs, lhs_p, grad_p)
    return out[:, :kdim, :n]
