"""Grouped matmul (gmm) and transposed grouped matmul (tgmm) for Hopper GPUs in Pallas Mosaic GPU.

Both kernels are written after jax's library kernels ``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu``
(gmm) and ``transposed_ragged_dot_mgpu`` (tgmm): a persistent kernel with one program per SM
(``plgpu.nd_loop`` over the output tiles, ``collective_axes="sm"``), a TMA pipeline
(``plgpu.emit_pipeline``) feeding warpgroup matmuls (``plgpu.wgmma``) into a float32 register
accumulator, and TMA stores of the result. qwax does not call those kernels directly because:

* ``ragged_dot`` finds each tile's group by an unrolled scan over all G group sizes in every tile
  (O(G) scalar work and GMEM loads per tile: heavy with Qwen3-Next's 512 experts), has no
  ``group_offset`` (expert parallelism) and leaves rows outside the groups unwritten;
* ``transposed_ragged_dot`` reads ``jax.devices()[0].core_count`` while tracing, so it cannot be traced
  without a GPU (neither in interpret mode on the CPU nor for ``jax.export``), and has no ``group_offset``.

Here the per-tile schedule is precomputed in plain JAX (like megablox's group metadata) and read by
each program with a few scalar GMEM loads:

gmm: the rows ``[0, M)`` are cut into segments: the rows before the local groups, each local group
``group_offset .. group_offset + G_local - 1``, the rows after them. A *work item* is one (segment, row
tile) pair that overlap; there are at most ``cdiv(M, tm) + G_local + 1``. An item of a local group runs
the K pipeline on its row tile and that group's weights; an item of the outer segments does no matmul
(zero accumulator). Each item stores only its own rows, with a ladder of power-of-two TMA stores (TMA
cannot mask rows), so items sharing a row tile (a group boundary inside the tile) write disjoint rows
and may run on different SMs at once; every output row is written (rows outside the local groups
with zeros).

tgmm: one program per (local group, K tile, N tile) pipelines over the ``tm``-row blocks overlapping
its group; the first and last block are masked (rows of neighbouring groups are set to zero in shared
memory before the wgmma, in both operands, so non-finite values there cannot leak). Empty groups skip
the pipeline and store zeros.

Constraints: operands bfloat16 or float16 (Hopper wgmma; float32 would run as tf32, and
``rhs [G, K, N]`` is not K-major, which tf32 wgmma requires), lhs and rhs of the same dtype; tile
sizes multiples of 64 (wgmma M granularity and 128-byte swizzled SMEM tiles), ``tn <= 256`` in gmm
(wgmma N). The wrappers zero-pad K and N to tile multiples and M to a multiple of 8 (TMA descriptors
of 8-row tiled SMEM), copying only operands that are not already aligned; partial row tiles rely on
TMA's zero fill for out-of-bounds loads and are never stored past M. ``tiling`` applies to gmm and
tgmm alike; the defaults differ (``DEFAULT_TILES`` / ``DEFAULT_TGMM_TILES``).

Verified here (no GPU): values and gradients in Mosaic GPU interpret mode
(``plgpu.InterpretGPUParams()``) on the CPU, and lowering through ``jax.export(platforms=["cuda"])``
(Pallas -> Mosaic GPU layout inference, dialect lowering and the shared-memory budget check, 227 KiB,
run in Python at lowering time; with no GPU to ask, Mosaic GPU targets sm_90). Not run on a real GPU:
the final PTX compilation, register pressure and performance are unverified.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from qwax.pallas_kernels.moe.common import cdiv, check_pallas_dtypes, round_up

# gmm (tm, tk, tn): 128x128 output tiles with 64-wide K steps (128-byte rows in bf16). SMEM per stage
# (128*64 + 64*128) * 2 B = 32 KiB, 4 stages + a 32 KiB output tile = 160 KiB of the H100's 227 KiB.
DEFAULT_TILES = (128, 64, 128)
# tgmm (tm, tk, tn): tm = 64 contracted rows per step, 128x128 output tiles: again 32 KiB per stage.
DEFAULT_TGMM_TILES = (64, 128, 128)
MAX_CONCURRENT_STEPS = 4
GRID_BLOCK_N = 4  # planar_snake width: neighbouring programs share lhs tiles (L2 reuse)
H100_NUM_SMS = 132  # H100 / H200 SXM; used when there is no GPU to ask (interpret mode, jax.export)


def _num_sms() -> int:
    """SMs of the local GPU, or an H100's 132 when tracing without one."""
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", None) or H100_NUM_SMS) if dev.platform == "gpu" else H100_NUM_SMS


def _interpret(interpret: Any) -> Any:
    """``True`` -> default Mosaic GPU interpret params; a TPU ``InterpretParams`` is a mistake here."""
    if interpret is True:
        return plgpu.InterpretGPUParams()
    if interpret and not isinstance(interpret, plgpu.InterpretGPUParams):
        raise ValueError(
            f"the GPU kernels take interpret=True or plgpu.InterpretGPUParams(), got interpret={interpret!r}"
        )
    return interpret or None


def _check_operands(a: jax.Array, b: jax.Array, names: tuple[str, str]) -> None:
    check_pallas_dtypes("gpu", **{names[0]: a, names[1]: b})
    if a.dtype != b.dtype:
        raise ValueError(
            f"the gpu Pallas kernels need {names[0]} and {names[1]} of one dtype, "
            f"got {names[0]}.dtype={a.dtype}, {names[1]}.dtype={b.dtype}"
        )


def _check_tiles(tiling: tuple[int, int, int], max_tn: int | None) -> tuple[int, int, int]:
    tiling = tuple(int(t) for t in tiling)
    if len(tiling) != 3 or any(t <= 0 or t % 64 for t in tiling) or (max_tn is not None and tiling[2] > max_tn):
        limit = f" and tn <= {max_tn}" if max_tn is not None else ""
        raise ValueError(f"GPU tiling (tm, tk, tn) must be positive multiples of 64{limit}, got tiling={tiling}")
    return tiling  # type: ignore[return-value]


def _local_bounds(
    group_sizes: jax.Array, group_offset: jax.Array, num_local: int, m: int
) -> tuple[jax.Array, jax.Array]:
    """[G_local] first and one-past-last row of each local group, clipped to the ``m`` rows."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return (jax.lax.dynamic_slice_in_dim(starts, group_offset, num_local),
            jax.lax.dynamic_slice_in_dim(ends, group_offset, num_local))


def _pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    if x.shape == shape:
        return x
    return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


# ----------------------------------------------------------------------------------------------------
# gmm
# ----------------------------------------------------------------------------------------------------


def make_gmm_items(
    group_sizes: jax.Array, group_offset: jax.Array, num_local: int, m: int, tm: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Work items of the gmm kernel (see module docstring), all [W] int32, W = cdiv(m, tm) + num_local + 1.

    Returns (group, tile, start, size): the item's local group (-1: a zero segment, or no item), its
    row tile, its first row within the tile and its number of rows (0 for the padding items past the
    last real one).
    """
    starts, ends = _local_bounds(group_sizes, group_offset, num_local, m)
    lo, hi = starts[:1], ends[-1:]
    seg_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), starts, hi])  # [L + 2]
    seg_end = jnp.concatenate([lo, ends, jnp.full((1,), m, jnp.int32)])
    seg_group = jnp.concatenate([jnp.full((1,), -1, jnp.int32), jnp.arange(num_local, dtype=jnp.int32),
                                 jnp.full((1,), -1, jnp.int32)])
    first = seg_start // tm
    count = jnp.where(seg_end > seg_start, (seg_end - 1) // tm - first + 1, 0)
    cum = jnp.cumsum(count)
    w_max = cdiv(m, tm) + num_local + 1  # segments partition [0, m): sum(count) <= tiles + segments - 1
    w = jnp.arange(w_max, dtype=jnp.int32)
    seg = jnp.minimum(jnp.searchsorted(cum, w, side="right"), num_local + 1).astype(jnp.int32)
    tile = first[seg] + w - (cum - count)[seg]
    valid = w < cum[-1]
    row0 = tile * tm
    a = jnp.maximum(seg_start[seg], row0)
    b = jnp.minimum(seg_end[seg], row0 + tm)
    size = jnp.where(valid, b - a, 0).astype(jnp.int32)
    group = jnp.where(valid, seg_group[seg], -1).astype(jnp.int32)
    return group, jnp.where(valid, tile, 0).astype(jnp.int32), jnp.where(valid, a - row0, 0).astype(jnp.int32), size


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset: jax.Array | int = 0,
    transpose_rhs: bool = False,
    tiling: tuple[int, int, int] = DEFAULT_TILES,
    interpret: Any = False,
) -> jax.Array:
    """Grouped matmul on Hopper: ``out[r] = lhs[r] @ rhs[g(r) - group_offset]`` (``.T`` with ``transpose_rhs``).

    Args:
      lhs: [M, K] rows sorted by group (all G groups of ``group_sizes``).
      rhs: [G_local, K, N] (or [G_local, N, K] with ``transpose_rhs``): groups
        ``[group_offset, group_offset + G_local)``.
      group_sizes: [G] int32 with ``sum <= M``.
      group_offset: int32 scalar, first group held by ``rhs`` (clamped to ``[0, G - G_local]``).
      tiling: (tm, tk, tn), multiples of 64, tn <= 256.
      interpret: False, or True / ``plgpu.InterpretGPUParams()`` for Mosaic GPU interpret mode on the CPU.
    Returns:
      [M, N] in ``lhs.dtype``; rows outside the local groups are zero.
    """
    _check_operands(lhs, rhs, ("lhs", "rhs"))
    tm, tk, tn = _check_tiles(tiling, max_tn=256)
    m, k = lhs.shape
    g_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if m == 0 or n == 0:
        return jnp.zeros((m, n), lhs.dtype)
    # TMA descriptors of tiled (8-row) SMEM need GMEM row counts that are multiples of 8.
    m_pad, k_pad, n_pad = round_up(m, 8), round_up(k, tk), round_up(n, tn)
    lhs_p = _pad_to(lhs, (m_pad, k_pad))
    rhs_p = _pad_to(rhs, (g_local, n_pad, k_pad) if transpose_rhs else (g_local, k_pad, n_pad))
    offset = jnp.clip(jnp.asarray(group_offset, jnp.int32), 0, group_sizes.shape[0] - g_local)
    items = make_gmm_items(group_sizes, offset, g_local, m, tm)
    w_max = items[0].shape[0]
    grid_n = n_pad // tn
    # TMA cannot mask rows, so an item's rows are stored by power-of-two pieces: 2**j rows for each set
    # bit j of its row count (static descriptor shapes, at most log2(tm) + 1 stores).
    piece_sizes = [1 << j for j in reversed(range(int(math.log2(min(tm, m))) + 1))]

    def body(group_gmem, tile_gmem, start_gmem, size_gmem, lhs_gmem, rhs_gmem, out_gmem):
        @plgpu.nd_loop((w_max * grid_n,), collective_axes="sm")
        def _item(loop_info: plgpu.NDLoopInfo):
            wi, ni = plgpu.planar_snake(loop_info.index[0], (w_max, grid_n), 1, min(GRID_BLOCK_N, grid_n))
            group = group_gmem[wi]
            tile = tile_gmem[wi]
            size = size_gmem[wi]

            @pl.when(size > 0)
            def _work():
                def acc_scope(acc_ref):
                    @pl.when(group >= 0)  # zero segments: no matmul, the accumulator stays zero
                    def _matmul():
                        plgpu.emit_pipeline(
                            lambda _, lhs_smem, rhs_smem: plgpu.wgmma(
                                acc_ref, lhs_smem, rhs_smem.T if transpose_rhs else rhs_smem
                            ),
                            grid=(k_pad // tk,),
                            in_specs=[
                                plgpu.BlockSpec((tm, tk), lambda kk: (tile, kk), delay_release=1),
                                plgpu.BlockSpec(
                                    (tn, tk) if transpose_rhs else (tk, tn),
                                    (lambda kk: (ni, kk)) if transpose_rhs else (lambda kk: (kk, ni)),
                                    delay_release=1,
                                ),
                            ],
                            max_concurrent_steps=MAX_CONCURRENT_STEPS,
                        )(lhs_gmem, rhs_gmem.at[jnp.maximum(group, 0)])

                    return acc_ref[...]

                acc = pl.run_scoped(acc_scope, plgpu.ACC((tm, tn)))

                @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM((tm, tn), out_gmem.dtype))
                def _store(out_smem):
                    out_smem[...] = acc.astype(out_smem.dtype)
                    plgpu.commit_smem()
                    row = start_gmem[wi]
                    for piece in piece_sizes:

                        @pl.when((size & piece) != 0)
                        def _piece(row=row, piece=piece):
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[pl.ds(row, piece)],
                                out_gmem.at[pl.ds(tile * tm + row, piece), pl.ds(ni * tn, tn)],
                            )

                        row = row + (size & piece)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m_pad, n_pad), lhs.dtype),
        grid=(_num_sms(),),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret(interpret),
    )
    out = kernel(*items, lhs_p, rhs_p)
    return out if (m_pad, n_pad) == (m, n) else out[:m, :n]


# ----------------------------------------------------------------------------------------------------
# tgmm
# ----------------------------------------------------------------------------------------------------


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset: jax.Array | int = 0,
    num_groups: int | None = None,
    tiling: tuple[int, int, int] = DEFAULT_TGMM_TILES,
    interpret: Any = False,
) -> jax.Array:
    """Per-group ``lhs_g^T @ grad_g`` on Hopper for the local groups.

    Args:
      lhs: [M, K], grad: [M, N], rows sorted by group; group_sizes: [G] int32 (``sum <= M``).
      group_offset: int32 scalar, first group computed (clamped to ``[0, G - G_local]``).
      num_groups: G_local, the number of groups computed (default G).
      tiling: (tm, tk, tn), multiples of 64; tm is the contracted row block, (tk, tn) the output tile.
      interpret: as in :func:`gmm`.
    Returns:
      [G_local, K, N] in ``lhs.dtype``: ``out[i] = lhs_g^T @ grad_g`` for ``g = group_offset + i``;
      empty groups give zeros.
    """
    _check_operands(lhs, grad, ("lhs", "grad"))
    tm, tk, tn = _check_tiles(tiling, max_tn=None)
    m, k = lhs.shape
    n = grad.shape[1]
    g_local = group_sizes.shape[0] if num_groups is None else int(num_groups)
    if m == 0 or k == 0 or n == 0 or g_local == 0:
        return jnp.zeros((g_local, k, n), lhs.dtype)
    m_pad, k_pad, n_pad = round_up(m, 8), round_up(k, tk), round_up(n, tn)  # rows: see gmm
    lhs_p = _pad_to(lhs, (m_pad, k_pad))
    grad_p = _pad_to(grad, (m_pad, n_pad))
    offset = jnp.clip(jnp.asarray(group_offset, jnp.int32), 0, group_sizes.shape[0] - g_local)
    starts, ends = _local_bounds(group_sizes, offset, g_local, m)
    first_block = starts // tm
    num_blocks = jnp.where(ends > starts, (ends - 1) // tm - first_block + 1, 0).astype(jnp.int32)
    grid_k, grid_n = k_pad // tk, n_pad // tn
    swizzle = plgpu.find_swizzle(min(tk, tn) * jnp.finfo(lhs.dtype).bits)
    transforms = (plgpu.TilingTransform((8, swizzle * 8 // jnp.finfo(lhs.dtype).bits)), plgpu.SwizzleTransform(swizzle))

    def body(start_gmem, end_gmem, first_gmem, nblocks_gmem, lhs_gmem, grad_gmem, out_gmem):
        @plgpu.nd_loop((g_local, grid_k * grid_n), collective_axes="sm")
        def _tile(loop_info: plgpu.NDLoopInfo):
            gi = loop_info.index[0]
            ki, ni = plgpu.planar_snake(loop_info.index[1], (grid_k, grid_n), 1, min(GRID_BLOCK_N, grid_n))
            start = start_gmem[gi]
            end = end_gmem[gi]
            first = first_gmem[gi]
            nblocks = nblocks_gmem[gi]

            def acc_scope(acc_ref):
                def step(idx, lhs_smem, grad_smem):
                    b = idx[0]

                    # Only the first and last blocks can hold rows of other groups: zero them in SMEM.
                    @pl.when((b == 0) | (b == nblocks - 1))
                    def _mask():
                        for ref in (lhs_smem, grad_smem):
                            rows = (first + b) * tm + plgpu.layout_cast(
                                jax.lax.broadcasted_iota(jnp.int32, ref.shape, 0), plgpu.Layout.WGMMA
                            )
                            ref[...] = jnp.where((rows >= start) & (rows < end), ref[...], 0).astype(ref.dtype)
                        plgpu.commit_smem()

                    plgpu.wgmma(acc_ref, lhs_smem.T, grad_smem)
                    if MAX_CONCURRENT_STEPS == 1:  # no delayed release: wait before the slot is refilled
                        plgpu.wgmma_wait(0)

                @pl.when(nblocks > 0)
                def _matmul():
                    plgpu.emit_pipeline(
                        step,
                        grid=(nblocks,),
                        in_specs=[
                            plgpu.BlockSpec((tm, tk), lambda b: (first + b, ki), delay_release=1,
                                            transforms=transforms),
                            plgpu.BlockSpec((tm, tn), lambda b: (first + b, ni), delay_release=1,
                                            transforms=transforms),
                        ],
                        max_concurrent_steps=MAX_CONCURRENT_STEPS,
                    )(lhs_gmem, grad_gmem)

                return acc_ref[...]

            acc = pl.run_scoped(acc_scope, plgpu.ACC((tk, tn)))

            @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM((tk, tn), out_gmem.dtype, transforms=transforms))
            def _store(out_smem):
                out_smem[...] = acc.astype(out_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[gi, pl.ds(ki * tk, tk), pl.ds(ni * tn, tn)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((g_local, k_pad, n_pad), lhs.dtype),
        grid=(_num_sms(),),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret(interpret),
    )
    out = kernel(starts, ends, first_block, num_blocks, lhs_p, grad_p)
    return out if (k_pad, n_pad) == (k, n) else out[:, :k, :n]
