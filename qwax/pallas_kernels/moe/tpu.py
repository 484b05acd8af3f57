"""Grouped matmul (gmm) and transposed grouped matmul (tgmm) on TPU: jax's megablox Pallas kernels.

``jax.experimental.pallas.ops.tpu.megablox.gmm`` (``gmm`` / ``tgmm``) walks precomputed (group, row
tile) work items held in SMEM by scalar prefetch, accumulates over K in a float32 VMEM scratch and
merges the rows of each group into the output tile with a row mask; ``group_offset`` restricts the
work to the groups ``[group_offset, group_offset + G_local)`` held by ``rhs`` (expert parallelism).
qwax used to carry its own TPU kernel of the same design; megablox does everything it did (ragged and
empty groups, transposed rhs, irregular K/N tiles) plus ``group_offset``, and is maintained with jax,
so qwax's was removed. This module only adapts shapes and semantics:

* megablox needs ``M % tm == 0``: lhs (and grad) rows are zero-padded to a multiple of ``tm``; the
  padding lies past ``sum(group_sizes)``, so it belongs to no group;
* megablox leaves rows past ``sum(group_sizes)`` uninitialised when ``rhs`` holds all the groups (it
  zeroes everything outside the local groups otherwise): the wrapper zeroes them in that case, so
  every row outside the local groups comes out as zero;
* ``tk`` / ``tn`` larger than K / N are shrunk to the whole dimension (always a legal TPU block, and a
  wider block would only waste work); smaller tiles that do not divide K / N are left to megablox,
  which masks the K remainder;
* operands bfloat16 or float32 (megablox's own restriction), any mix (megablox then computes in f32).

Verified here (no TPU): values and gradients in TPU interpret mode (``pltpu.InterpretParams()``, which
megablox passes on to ``pallas_call``; it also accepts plain ``True``) on the CPU, and lowering to a
Mosaic ``tpu_custom_call`` through ``jax.export(platforms=["tpu"])``. Not run on a real TPU: Mosaic's
compilation of the kernel body, VMEM use at the default tiles and performance are unverified.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.megablox.gmm import gmm as megablox_gmm
from jax.experimental.pallas.ops.tpu.megablox.gmm import tgmm as megablox_tgmm

from qwax.pallas_kernels.moe.common import round_up

# (tm, tk, tn). tm = 128 keeps the work wasted on row tiles shared by two groups small (such a tile is
# computed once per group); 512-wide K/N tiles keep the MXU busy in ~2 MB of double-buffered VMEM (bf16).
# Not tuned on hardware.
DEFAULT_TILES = (128, 512, 512)


def _check_interpret(interpret: Any) -> Any:
    """megablox passes ``interpret`` to ``pallas_call``; ``True`` means ``pltpu.InterpretParams()``.

    (megablox also runs under ``pallas_call(interpret=True)``, the generic interpreter, but the TPU
    interpreter is the faithful one: it fills uninitialised memory with NaNs, so unwritten rows show.)
    """
    if not interpret:
        return False
    if interpret is True:
        return pltpu.InterpretParams()
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    raise ValueError(f"the TPU kernels take interpret=True or pltpu.InterpretParams(), got interpret={interpret!r}")


def _tiles(tiling: tuple[int, int, int], m: int, k: int, n: int, dtype: jnp.dtype) -> tuple[int, int, int]:
    """Validate (tm, tk, tn) and fit them to the problem: tm <= M (rounded up to the sublane tile), tk <= K, tn <= N."""
    tm, tk, tn = (int(t) for t in tiling)
    if tm <= 0 or tm % 8 or tk <= 0 or tk % 128 or tn <= 0 or tn % 128:
        raise ValueError(
            f"TPU tiling (tm, tk, tn) needs tm a positive multiple of 8 and tk, tn positive multiples of 128, "
            f"got tiling={tiling}"
        )
    sublanes = 8 * max(1, 4 // jnp.dtype(dtype).itemsize)  # 16 rows per native tile for bf16
    return min(tm, round_up(max(m, 1), sublanes)), min(tk, k), min(tn, n)


def _zero_rows_past_groups(out: jax.Array, group_sizes: jax.Array) -> jax.Array:
    end = jnp.sum(group_sizes.astype(jnp.int32))
    return jnp.where((jnp.arange(out.shape[0]) < end)[:, None], out, 0).astype(out.dtype)


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
    """Grouped matmul on TPU: ``out[r] = lhs[r] @ rhs[g(r) - group_offset]`` (``.T`` with ``transpose_rhs``).

    Args:
      lhs: [M, K] rows sorted by group (all G groups of ``group_sizes``).
      rhs: [G_local, K, N] (or [G_local, N, K] with ``transpose_rhs``): groups
        ``[group_offset, group_offset + G_local)``.
      group_sizes: [G] int32, ``sum <= M``.
      group_offset: int32 scalar in ``[0, G - G_local]``.
      tiling: (tm, tk, tn); tm a multiple of 8, tk and tn multiples of 128.
      interpret: False, or True / ``pltpu.InterpretParams()`` for TPU interpret mode on the CPU.
    Returns:
      [M, N] in ``lhs.dtype``; rows outside the local groups are zero.
    """
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = _tiles(tiling, m, k, n, lhs.dtype)
    m_pad = round_up(m, tm)
    lhs_p = lhs if m_pad == m else jnp.pad(lhs, ((0, m_pad - m), (0, 0)))
    out = megablox_gmm(
        lhs_p,
        rhs,
        group_sizes.astype(jnp.int32),
        preferred_element_type=lhs.dtype,
        tiling=(tm, tk, tn),
        group_offset=jnp.asarray(group_offset, jnp.int32),
        transpose_rhs=transpose_rhs,
        interpret=_check_interpret(interpret),
    )
    if rhs.shape[0] == group_sizes.shape[0]:  # megablox zeroes the non-local rows only when G_local < G
        out = _zero_rows_past_groups(out, group_sizes)
    return out if m_pad == m else out[:m]


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset: jax.Array | int = 0,
    num_groups: int | None = None,
    tiling: tuple[int, int, int] = DEFAULT_TILES,
    interpret: Any = False,
) -> jax.Array:
    """Per-group ``lhs_g^T @ grad_g`` on TPU for the local groups.

    Args:
      lhs: [M, K], grad: [M, N], rows sorted by group; group_sizes: [G] int32 (``sum <= M``; rows past
        the sum are ignored).
      group_offset: int32 scalar, first group computed; num_groups: G_local (default G).
      tiling: (tm, tk, tn); tm is the contracted row tile here.
      interpret: as in :func:`gmm`.
    Returns:
      [G_local, K, N] in ``lhs.dtype``: ``out[i] = lhs_g^T @ grad_g`` for ``g = group_offset + i``; empty
      groups give zeros.
    """
    m, k = lhs.shape
    n = grad.shape[1]
    tm, tk, tn = _tiles(tiling, m, k, n, lhs.dtype)
    m_pad = round_up(m, tm)
    if m_pad != m:
        lhs = jnp.pad(lhs, ((0, m_pad - m), (0, 0)))
        grad = jnp.pad(grad, ((0, m_pad - m), (0, 0)))
    return megablox_tgmm(
        lhs.T,  # megablox takes lhs as [K, M] and transposes it back: XLA cancels the two transposes
        grad,
        group_sizes.astype(jnp.int32),
        preferred_element_type=lhs.dtype,
        tiling=(tm, tk, tn),
        group_offset=jnp.asarray(group_offset, jnp.int32),
        num_actual_groups=num_groups,
        interpret=_check_interpret(interpret),
    )
