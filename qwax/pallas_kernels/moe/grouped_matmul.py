"""Public ``grouped_matmul`` / ``tgmm`` with a custom VJP, and routed experts built from them.

For ``out = gmm(lhs, rhs)`` with ``out[r] = lhs[r] @ rhs[g(r)]``:
  d lhs = gmm(d out, rhs^T)            (same grouping, rhs transposed: no transposed copy is made)
  d rhs = tgmm(lhs, d out)             (``d rhs[g] = lhs_g^T @ d out_g``)
and for ``w = tgmm(lhs, grad)`` with ``w[g] = lhs_g^T @ grad_g``:
  d lhs  = gmm(grad, (d w)^T)          (``d lhs[r] = grad[r] @ d w[g(r)]^T``)
  d grad = gmm(lhs, d w)               (``d grad[r] = lhs[r] @ d w[g(r)]``)
so gradients of any order run on the same kernels, never on a dense or scatter-based fallback. All of
them take the same ``group_offset``: rows outside the local groups get zero gradient, as they do not
reach the output.

Group offset (megablox semantics): ``group_sizes`` [G] describes all the groups of the sorted rows of
``lhs``, but only the G_local groups ``[group_offset, group_offset + G_local)`` are computed, with
``rhs[g - group_offset]``: an expert-parallel shard holding experts ``[offset, offset + E_local)``
passes its weights [E_local, ...] and the global group sizes. gmm's rows of other groups (and rows past
``sum(group_sizes)``) come out as zeros; tgmm returns [G_local, K, N].
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qwax.pallas_kernels.dispatch import resolve_impl
from qwax.pallas_kernels.moe import gpu as gpu_lib
from qwax.pallas_kernels.moe import reference as reference_lib
from qwax.pallas_kernels.moe import routing as routing_lib
from qwax.pallas_kernels.moe import tpu as tpu_lib
from qwax.pallas_kernels.moe import xla as xla_lib
from qwax.pallas_kernels.moe.common import (
    check_gmm_args,
    check_pallas_dtypes,
    check_tgmm_args,
    pallas_takes,
    resolve_backend,
    resolve_group_offset,
    resolve_interpret,
)


class KernelConfig(NamedTuple):
    """Static (hashable) choice of kernel: impl in {"pallas", "xla"}, pallas backend, tiling, interpret."""

    impl: str
    backend: str | None = None
    tiling: tuple[int, int, int] | None = None
    interpret: Any = False


def _pallas_kwargs(cfg: KernelConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"interpret": cfg.interpret}
    if cfg.tiling is not None:
        kw["tiling"] = cfg.tiling
    return kw


def _gmm_raw(cfg: KernelConfig, lhs, rhs, group_sizes, group_offset, transpose_rhs: bool) -> jax.Array:
    if cfg.impl == "xla":
        if jax.default_backend() == "cpu":
            return xla_lib.gmm_cpu(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, group_offset=group_offset)
        # All groups local: the offset is 0 and ragged_dot needs no row roll.
        off = None if rhs.shape[0] == group_sizes.shape[0] else group_offset
        return xla_lib.gmm_ragged(lhs, jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs, group_sizes, off)
    lib = tpu_lib if cfg.backend == "tpu" else gpu_lib
    return lib.gmm(lhs, rhs, group_sizes, group_offset=group_offset, transpose_rhs=transpose_rhs,
                   **_pallas_kwargs(cfg))


def _tgmm_raw(cfg: KernelConfig, num_groups: int, lhs, grad, group_sizes, group_offset) -> jax.Array:
    if cfg.impl == "xla":
        if jax.default_backend() == "cpu":
            return xla_lib.tgmm_cpu(lhs, grad, group_sizes, group_offset=group_offset, num_groups=num_groups)
        off = None if num_groups == group_sizes.shape[0] else group_offset
        return xla_lib.tgmm_ragged(lhs, grad, group_sizes, off, num_groups)
    lib = tpu_lib if cfg.backend == "tpu" else gpu_lib
    return lib.tgmm(lhs, grad, group_sizes, group_offset=group_offset, num_groups=num_groups, **_pallas_kwargs(cfg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(cfg: KernelConfig, lhs, rhs, group_sizes, group_offset):
    """``out[r] = lhs[r] @ rhs[g(r) - group_offset]`` with rhs [G_local, K, N]."""
    return _gmm_raw(cfg, lhs, rhs, group_sizes, group_offset, False)


def _gmm_fwd(cfg, lhs, rhs, group_sizes, group_offset):
    return _gmm_raw(cfg, lhs, rhs, group_sizes, group_offset, False), (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(cfg, res, dout):
    lhs, rhs, group_sizes, group_offset = res
    dout = dout.astype(lhs.dtype)
    dlhs = _gmm_t(cfg, dout, rhs, group_sizes, group_offset)  # dout @ rhs[g]^T
    drhs = _tgmm(cfg, rhs.shape[0], lhs, dout, group_sizes, group_offset)
    return dlhs.astype(lhs.dtype), drhs.astype(rhs.dtype), None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm_t(cfg: KernelConfig, lhs, rhs_t, group_sizes, group_offset):
    """``out[r] = lhs[r] @ rhs_t[g(r) - group_offset]^T`` with rhs_t [G_local, N, K]."""
    return _gmm_raw(cfg, lhs, rhs_t, group_sizes, group_offset, True)


def _gmm_t_fwd(cfg, lhs, rhs_t, group_sizes, group_offset):
    return _gmm_raw(cfg, lhs, rhs_t, group_sizes, group_offset, True), (lhs, rhs_t, group_sizes, group_offset)


def _gmm_t_bwd(cfg, res, dout):
    lhs, rhs_t, group_sizes, group_offset = res
    dout = dout.astype(lhs.dtype)
    # d lhs[r] = dout[r] @ rhs_t[g]; d rhs_t[g] = dout_g^T @ lhs_g.
    dlhs = _gmm(cfg, dout, rhs_t, group_sizes, group_offset)
    drhs_t = _tgmm(cfg, rhs_t.shape[0], dout, lhs, group_sizes, group_offset)
    return dlhs.astype(lhs.dtype), drhs_t.astype(rhs_t.dtype), None, None


_gmm_t.defvjp(_gmm_t_fwd, _gmm_t_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _tgmm(cfg: KernelConfig, num_groups: int, lhs, grad, group_sizes, group_offset):
    """``out[i] = lhs_g^T @ grad_g`` for ``g = group_offset + i``, i < num_groups."""
    return _tgmm_raw(cfg, num_groups, lhs, grad, group_sizes, group_offset)


def _tgmm_fwd(cfg, num_groups, lhs, grad, group_sizes, group_offset):
    return _tgmm_raw(cfg, num_groups, lhs, grad, group_sizes, group_offset), (lhs, grad, group_sizes, group_offset)


def _tgmm_bwd(cfg, num_groups, res, dw):
    lhs, grad, group_sizes, group_offset = res
    dlhs = _gmm_t(cfg, grad, dw.astype(grad.dtype), group_sizes, group_offset)
    dgrad = _gmm(cfg, lhs, dw.astype(lhs.dtype), group_sizes, group_offset)
    return dlhs.astype(lhs.dtype), dgrad.astype(grad.dtype), None, None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


def make_config(
    impl: str,
    interpret: Any = None,
    backend: str | None = None,
    tiling: tuple[int, int, int] | None = None,
    operands: dict[str, jax.Array] | None = None,
) -> KernelConfig:
    """Validate the kernel-selection arguments and bundle them into a static :class:`KernelConfig`.

    ``operands`` (name -> array) are the matmul operands: "auto" uses Pallas only for dtypes its kernels
    take, and an explicit "pallas" with other dtypes is an error naming them.
    """
    operands = operands or {}
    dtypes = tuple(a.dtype for a in operands.values())
    impl = resolve_impl("moe", impl, pallas_takes=lambda family: pallas_takes(family, dtypes))
    if impl == "pallas":
        backend = resolve_backend(backend)
        check_pallas_dtypes(backend, **operands)
        return KernelConfig("pallas", backend, None if tiling is None else tuple(tiling), resolve_interpret(interpret))
    return KernelConfig(impl)


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset: jax.Array | int | None = None,
    impl: str = "auto",
    interpret: Any = None,
    backend: str | None = None,
    tiling: tuple[int, int, int] | None = None,
) -> jax.Array:
    """Grouped matmul: rows of ``lhs`` sorted by group, each multiplied by its group's ``rhs``.

    Args:
      lhs: [M, K]; rows ``[offset_g, offset_g + group_sizes[g])`` belong to group g.
      rhs: [G_local, K, N], the weights of groups ``[group_offset, group_offset + G_local)``.
      group_sizes: [G] int (G >= G_local), ``sum(group_sizes) <= M``.
      group_offset: int scalar (may be traced, e.g. ``lax.axis_index * E_local``), first group held by
        ``rhs``; default 0. Must lie in ``[0, G - G_local]``; a traced value is clamped into it.
      impl: "auto" | "pallas" | "xla" | "reference".
      interpret: Pallas interpret mode: ``None`` (default) interprets on the CPU and compiles on TPU/GPU;
        ``False`` always compiles (``jax.export`` from a CPU host); ``True`` interprets with default
        parameters; or ``pltpu.InterpretParams()`` (TPU kernels) / ``plgpu.InterpretGPUParams()`` (GPU).
      backend: force the Pallas kernel family ("tpu" | "gpu"); default from ``jax.default_backend()``.
      tiling: Pallas (tm, tk, tn) tile sizes; default per backend.
    Returns:
      [M, N] in ``lhs.dtype``: ``out[r] = lhs[r] @ rhs[g(r) - group_offset]`` for rows of the local
      groups, zero elsewhere (other groups, rows past ``sum(group_sizes)``). Differentiable in lhs, rhs.
    """
    check_gmm_args(lhs, rhs, group_sizes)
    offset = resolve_group_offset(group_offset, group_sizes.shape[0], rhs.shape[0])
    cfg = make_config(impl, interpret, backend, tiling, {"lhs": lhs, "rhs": rhs})
    if cfg.impl == "reference":
        return reference_lib.grouped_matmul(lhs, rhs, group_sizes, offset)
    return _gmm(cfg, lhs, rhs, group_sizes.astype(jnp.int32), offset)


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset: jax.Array | int | None = None,
    num_groups: int | None = None,
    impl: str = "auto",
    interpret: Any = None,
    backend: str | None = None,
    tiling: tuple[int, int, int] | None = None,
) -> jax.Array:
    """Transposed grouped matmul (the weight gradient of ``grouped_matmul``).

    Args:
      lhs: [M, K]; grad: [M, N]; rows sorted by group as in ``grouped_matmul``.
      group_sizes: [G] int, ``sum(group_sizes) <= M``; rows past the sum are ignored.
      group_offset: first group computed, as in ``grouped_matmul``; default 0.
      num_groups: static G_local, the number of groups computed; default G.
      impl, interpret, backend, tiling: as in ``grouped_matmul``.
    Returns:
      [G_local, K, N] in ``lhs.dtype``: ``out[i] = lhs_g^T @ grad_g`` over the rows of group
      ``g = group_offset + i``; empty groups are zero.
    """
    num_local = check_tgmm_args(lhs, grad, group_sizes, num_groups)
    offset = resolve_group_offset(group_offset, group_sizes.shape[0], num_local)
    cfg = make_config(impl, interpret, backend, tiling, {"lhs": lhs, "grad": grad})
    if cfg.impl == "reference":
        return reference_lib.tgmm(lhs, grad, group_sizes, offset, num_local)
    return _tgmm(cfg, num_local, lhs, grad, group_sizes.astype(jnp.int32), offset)


def routed_experts_grouped(
    x: jax.Array,
    expert_idx: jax.Array,
    expert_weights: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    cfg: KernelConfig,
) -> jax.Array:
    """Routed SwiGLU experts as sort -> gmm -> SwiGLU -> gmm -> combine (shapes as ``routed_experts``).

    Used by the Pallas implementation and by the XLA implementation off the CPU (ragged_dot).
    Memory: materialises the sorted tokens [T*k, H] and the activations [T*k, 2I].
    """
    e, _, i2 = w_gate_up.shape
    i = i2 // 2
    r = routing_lib.sort_by_expert(expert_idx, e)
    xs = routing_lib.gather_tokens(x, r)  # [S, H]
    zero = jnp.zeros((), jnp.int32)
    h = _gmm(cfg, xs, w_gate_up, r.group_sizes, zero)  # [S, 2I]
    act = (jax.nn.silu(h[:, :i]) * h[:, i:]).astype(w_down.dtype)
    o = _gmm(cfg, act, w_down, r.group_sizes, zero)  # [S, H]
    return routing_lib.combine(o, expert_weights, r).astype(x.dtype)
