"""Grouped matmul (gmm) and transposed grouped matmul (tgmm) Pallas kernels for TPU (Mosaic).

Both kernels walk a list of *work items*. The rows of ``lhs`` are sorted by group, so each group g
covers rows ``[offsets[g], offsets[g+1])``, which overlap some range of ``tm``-row tiles. A work item
is one (group, row tile) pair with a non-empty overlap; items are ordered by group, hence by row
tile as well. The item list is built in plain JAX (``make_work_items``) and handed to the kernel as
*scalar prefetch* operands (SMEM), so the BlockSpec index maps can pick, for grid step ``w``, the
``lhs`` row tile ``m_tile_ids[w]`` and the ``rhs`` slab of group ``group_ids[w]``: the pipeline then
DMAs exactly the blocks each item needs. The static number of items is bounded by
``num_row_tiles + num_groups`` (a group adds at most one tile it shares with its predecessor); the
surplus grid steps repeat the last item's block indices (no new DMA) and skip compute.

gmm: grid ``(N / tn, items, K / tk)``. The K axis is innermost and accumulates into a float32 VMEM
scratch; on the last K step the rows of the item's group are merged into the output tile with a
row mask. Consecutive items that share a row tile keep the same output block index, so Pallas keeps
that tile resident in VMEM and each group fills in its own rows before the tile is written back.
Rows past ``sum(group_sizes)`` belong to an extra "tail" group whose items write zeros, so every
output row is written.

tgmm: grid ``(K / tk, N / tn, items)``. Items of one group are consecutive; the accumulator is reset
on a group's first item and written to ``out[g]`` on its last. Empty groups get one item whose row
mask is empty, so their output block is written with zeros.

Tiles respect the TPU (8, 128) layout: ``tm`` is a multiple of 8 (sublanes), ``tk``/``tn`` are
multiples of 128 (lanes) unless they span the whole (padded) dimension, which Mosaic also accepts.
Operands are zero-padded to tile multiples by the wrappers.

Verified: forward/backward values in TPU interpret mode (``pltpu.InterpretParams()``) on the CPU.
Not verified here: Mosaic lowering on real TPU hardware (no TPU available). The kernels only use
ops Mosaic supports (2-D dot / dot_general with f32 accumulation, iota, compare, select, SMEM scalar
reads) but the transposed-lhs dot in tgmm relies on Mosaic's transpose support for the tile shape.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwax.pallas_kernels.moe.common import round_up

_F32 = jnp.float32

# tm = 128 keeps the work wasted on tiles shared by two groups small (each such tile is computed once per
# group); 512-wide K/N tiles keep the MXU busy and fit comfortably in VMEM (~3.5 MB double-buffered, f32).
DEFAULT_TILES = (128, 512, 512)  # (tm, tk, tn)


class WorkItems(NamedTuple):
    """Scalar-prefetch metadata for the TPU kernels (all int32, placed in SMEM).

    group_ids: [W] group of each item (may be ``G``, the tail group, in gmm).
    m_tile_ids: [W] row tile of each item.
    offsets: [G' + 1] row offsets of the groups (G' = G + 1 with the tail group).
    num_items: [1] number of real items; grid steps ``w >= num_items`` are no-ops.
    """

    group_ids: jax.Array
    m_tile_ids: jax.Array
    offsets: jax.Array
    num_items: jax.Array


def make_work_items(
    group_sizes: jax.Array, m: int, m_pad: int, tm: int, *, tail_group: bool, visit_empty: bool
) -> tuple[WorkItems, int]:
    """Enumerate (group, row tile) work items; returns the items and their static maximum count W.

    Args:
      group_sizes: [G] int rows per group; groups are clipped to the first ``m`` rows.
      m: number of real rows; m_pad: rows after padding to a multiple of ``tm``.
      tail_group: add a group covering ``[sum(group_sizes), m_pad)`` (gmm: it writes the zero rows).
      visit_empty: give each empty group one item (tgmm: it writes the group's zero gradient).
    """
    g = group_sizes.shape[0]
    num_tiles = m_pad // tm
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    if tail_group:
        ends = jnp.concatenate([ends, jnp.full((1,), m_pad, jnp.int32)])
    gx = ends.shape[0]
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    nonempty = ends > starts
    first_tile = jnp.minimum(starts // tm, num_tiles - 1)
    last_tile = jnp.maximum(ends - 1, 0) // tm
    count = jnp.where(nonempty, last_tile - first_tile + 1, 1 if visit_empty else 0).astype(jnp.int32)
    cum = jnp.cumsum(count)
    item_start = cum - count
    num_items = cum[-1]
    w_max = num_tiles + gx  # sum over groups of (tiles overlapped) <= num_tiles + gx - 1
    # Steps past the last real item replay it: same block indices, so no extra DMA happens.
    w = jnp.minimum(jnp.arange(w_max, dtype=jnp.int32), jnp.maximum(num_items - 1, 0))
    gid = jnp.minimum(jnp.searchsorted(cum, w, side="right"), gx - 1).astype(jnp.int32)
    m_tile = (first_tile[gid] + (w - item_start[gid])).astype(jnp.int32)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends]).astype(jnp.int32)
    items = WorkItems(gid, jnp.clip(m_tile, 0, num_tiles - 1), offsets, num_items.reshape(1).astype(jnp.int32))
    return items, w_max


def _lane_tile(dim: int, t: int) -> tuple[int, int]:
    """(tile, padded dim) for a lane dimension: the whole dim if it fits in one tile, else tiles of ``t``."""
    if dim <= t:
        return dim, dim
    return t, round_up(dim, t)


def _row_tile(m: int, tm: int) -> tuple[int, int]:
    tm = min(tm, round_up(m, 8))
    return tm, round_up(m, tm)


# ----------------------------------------------------------------------------------------------------
# gmm
# ----------------------------------------------------------------------------------------------------


def _gmm_kernel(gids, mids, offs, num, lhs_ref, rhs_ref, out_ref, acc_ref, *, num_groups, nk, tm, transpose_rhs):
    w = pl.program_id(1)
    kk = pl.program_id(2)
    gid = gids[w]
    active = w < num[0]

    @pl.when(kk == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    # The tail group (gid == num_groups) has no weights: its rows stay zero.
    @pl.when(active & (gid < num_groups))
    def _accumulate():
        rhs_contract = 1 if transpose_rhs else 0
        acc_ref[...] += jax.lax.dot_general(
            lhs_ref[...], rhs_ref[...], (((1,), (rhs_contract,)), ((), ())), preferred_element_type=_F32
        )

    @pl.when(active & (kk == nk - 1))
    def _store():
        start = offs[gid]
        end = offs[gid + 1]
        rows = mids[w] * tm + jax.lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
        mask = (rows >= start) & (rows < end)
        # The first item of a tile sees uninitialised output; select() never propagates it.
        out_ref[...] = jnp.where(mask, acc_ref[...], out_ref[...].astype(_F32)).astype(out_ref.dtype)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    tiling: tuple[int, int, int] = DEFAULT_TILES,
    interpret: Any = False,
) -> jax.Array:
    """Grouped matmul on TPU: ``out[r] = lhs[r] @ rhs[g(r)]`` (``rhs[g(r)].T`` if ``transpose_rhs``).

    Args:
      lhs: [M, K] rows sorted by group.
      rhs: [G, K, N] (or [G, N, K] with ``transpose_rhs``).
      group_sizes: [G] int32, ``sum <= M``; rows past the sum come out as zeros.
      tiling: (tm, tk, tn) tile sizes.
      interpret: passed to ``pl.pallas_call`` (``pltpu.InterpretParams()`` to simulate on CPU).
    Returns:
      [M, N] in ``lhs.dtype``.
    """
    m, kdim = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiling
    tm, m_pad = _row_tile(m, tm)
    tk, k_pad = _lane_tile(kdim, tk)
    tn, n_pad = _lane_tile(n, tn)
    lhs_p = jnp.pad(lhs, ((0, m_pad - m), (0, k_pad - kdim)))
    if transpose_rhs:
        rhs_p = jnp.pad(rhs, ((0, 0), (0, n_pad - n), (0, k_pad - kdim)))
    else:
        rhs_p = jnp.pad(rhs, ((0, 0), (0, k_pad - kdim), (0, n_pad - n)))
    items, w_max = make_work_items(group_sizes, m, m_pad, tm, tail_group=True, visit_empty=False)
    nk = k_pad // tk

    def lhs_map(ni, w, kk, gids, mids, offs, num):
        return mids[w], kk

    def rhs_map(ni, w, kk, gids, mids, offs, num):
        gi = jnp.minimum(gids[w], g - 1)  # tail group: fetch any slab, it is not used
        return (gi, ni, kk) if transpose_rhs else (gi, kk, ni)

    def out_map(ni, w, kk, gids, mids, offs, num):
        return mids[w], ni

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(n_pad // tn, w_max, nk),
        in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
        out_specs=pl.BlockSpec((tm, tn), out_map),
        scratch_shapes=[pltpu.VMEM((tm, tn), _F32)],
    )
    kernel = functools.partial(_gmm_kernel, num_groups=g, nk=nk, tm=tm, transpose_rhs=transpose_rhs)
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), lhs.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="qwax_moe_gmm",
    )(*items, lhs_p, rhs_p)
    return out[:m, :n]


# ----------------------------------------------------------------------------------------------------
# tgmm
# ----------------------------------------------------------------------------------------------------


def _tgmm_kernel(gids, mids, offs, num, lhs_ref, grad_ref, out_ref, acc_ref, *, tm, w_max):
    w = pl.program_id(2)
    gid = gids[w]
    n_items = num[0]
    active = w < n_items
    first = (w == 0) | (gid != gids[jnp.maximum(w - 1, 0)])
    last = (w == n_items - 1) | (gid != gids[jnp.minimum(w + 1, w_max - 1)])

    @pl.when(active & first)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active)
    def _accumulate():
        start = offs[gid]
        end = offs[gid + 1]
        row = mids[w] * tm
        lhs_rows = row + jax.lax.broadcasted_iota(jnp.int32, lhs_ref.shape, 0)
        grad_rows = row + jax.lax.broadcasted_iota(jnp.int32, grad_ref.shape, 0)
        # Mask both operands: rows of other groups must not contribute, and 0 * non-finite would.
        lhs = jnp.where((lhs_rows >= start) & (lhs_rows < end), lhs_ref[...], 0)
        grad = jnp.where((grad_rows >= start) & (grad_rows < end), grad_ref[...], 0)
        acc_ref[...] += jax.lax.dot_general(lhs, grad, (((0,), (0,)), ((), ())), preferred_element_type=_F32)

    @pl.when(active & last)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    tiling: tuple[int, int, int] = DEFAULT_TILES,
    interpret: Any = False,
) -> jax.Array:
    """Per-group ``lhs_g^T @ grad_g`` on TPU.

    Args:
      lhs: [M, K], grad: [M, N], rows sorted by group; group_sizes: [G] int32 (``sum <= M``).
      tiling: (tm, tk, tn); tm is the contraction tile here.
    Returns:
      [G, K, N] in ``lhs.dtype``; empty groups are zero.
    """
    m, kdim = lhs.shape
    n = grad.shape[1]
    g = group_sizes.shape[0]
    tm, tk, tn = tiling
    tm, m_pad = _row_tile(m, tm)
    tk, k_pad = _lane_tile(kdim, tk)
    tn, n_pad = _lane_tile(n, tn)
    lhs_p = jnp.pad(lhs, ((0, m_pad - m), (0, k_pad - kdim)))
    grad_p = jnp.pad(grad, ((0, m_pad - m), (0, n_pad - n)))
    items, w_max = make_work_items(group_sizes, m, m_pad, tm, tail_group=False, visit_empty=True)

    def lhs_map(ki, ni, w, gids, mids, offs, num):
        return mids[w], ki

    def grad_map(ki, ni, w, gids, mids, offs, num):
        return mids[w], ni

    def out_map(ki, ni, w, gids, mids, offs, num):
        return gids[w], ki, ni

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(k_pad // tk, n_pad // tn, w_max),
        in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), grad_map)],
        out_specs=pl.BlockSpec((None, tk, tn), out_map),
        scratch_shapes=[pltpu.VMEM((tk, tn), _F32)],
    )
    kernel = functools.partial(_tgmm_kernel, tm=tm, w_max=w_max)
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((g, k_pad, n_pad), lhs.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="qwax_moe_tgmm",
    )(*items, lhs_p, grad_p)
    return out[:, :kdim, :n]
