"""Public ``grouped_matmul`` / ``tgmm`` with a custom VJP, and routed experts built from them.

For ``out = gmm(lhs, rhs)`` with ``out[r] = lhs[r] @ rhs[g(r)]``:
  d lhs = gmm(d out, rhs^T)            (same grouping, rhs transposed: no transposed copy is made)
  d rhs = tgmm(lhs, d out)             (``d rhs[g] = lhs_g^T @ d out_g``)
and for ``w = tgmm(lhs, grad)`` with ``w[g] = lhs_g^T @ grad_g``:
  d lhs  = gmm(grad, (d w)^T)          (``d lhs[r] = grad[r] @ d w[g(r)]^T``)
  d grad = gmm(lhs, d w)               (``d grad[r] = lhs[r] @ d w[g(r)]``)
so gradients of any order run on the same kernels, never on a dense or scatter-based fallback.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qwax.pallas_kernels.moe import gpu as gpu_lib
from qwax.pallas_kernels.moe import reference as reference_lib
from qwax.pallas_kernels.moe import routing as routing_lib
from qwax.pallas_kernels.moe import tpu as tpu_lib
from qwax.pallas_kernels.moe import xla as xla_lib
from qwax.pallas_kernels.moe.common import (
    check_gmm_args,
    check_pallas_runnable,
    check_tgmm_args,
    resolve_backend,
    resolve_impl,
)


class KernelConfig(NamedTuple):
    """Static (hashable) choice of kernel: impl in {"pallas", "xla"}, pallas backend, tiling, interpret."""

    impl: str
    backend: str | None = None
    tiling: tuple[int, int, int] | None = None
    interpret: Any = False


def _gmm_raw(cfg: KernelConfig, lhs, rhs, group_sizes, transpose_rhs: bool) -> jax.Array:
    if cfg.impl == "xla":
        if jax.default_backend() == "cpu":
            return xla_lib.gmm_cpu(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs)
        return xla_lib.gmm_ragged(lhs, jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs, group_sizes)
    lib = tpu_lib if cfg.backend == "tpu" else gpu_lib
    kw = {} if cfg.tiling is None else {"tiling": cfg.tiling}
    return lib.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, interpret=cfg.interpret, **kw)


def _tgmm_raw(cfg: KernelConfig, lhs, grad, group_sizes) -> jax.Array:
    if cfg.impl == "xla":
        if jax.default_backend() == "cpu":
            return xla_lib.tgmm_cpu(lhs, grad, group_sizes)
        return xla_lib.tgmm_ragged(lhs, grad, group_sizes)
    lib = tpu_lib if cfg.backend == "tpu" else gpu_lib
    kw = {} if cfg.tiling is None else {"tiling": cfg.tiling}
    return lib.tgmm(lhs, grad, group_sizes, interpret=cfg.interpret, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(cfg: KernelConfig, lhs, rhs, group_sizes):
    return _gmm_raw(cfg, lhs, rhs, group_sizes, False)


def _gmm_fwd(cfg, lhs, rhs, group_sizes):
    return _gmm_raw(cfg, lhs, rhs, group_sizes, False), (lhs, rhs, group_sizes)


def _gmm_bwd(cfg, res, dout):
    lhs, rhs, group_sizes = res
    dlhs = _gmm_t(cfg, dout.astype(lhs.dtype), rhs, group_sizes)  # dout @ rhs[g]^T
    drhs = _tgmm(cfg, lhs, dout.astype(lhs.dtype), group_sizes)
    return dlhs.astype(lhs.dtype), drhs.astype(rhs.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _gmm_t_raw(cfg, lhs, rhs_t, group_sizes):
    return _gmm_raw(cfg, lhs, rhs_t, group_sizes, True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm_t(cfg: KernelConfig, lhs, rhs_t, group_sizes):
    """``out[r] = lhs[r] @ rhs_t[g(r)]^T`` with rhs_t [G, N, K]."""
    return _gmm_t_raw(cfg, lhs, rhs_t, group_sizes)


def _gmm_t_fwd(cfg, lhs, rhs_t, group_sizes):
    return _gmm_t_raw(cfg, lhs, rhs_t, group_sizes), (lhs, rhs_t, group_sizes)


def _gmm_t_bwd(cfg, res, dout):
    lhs, rhs_t, group_sizes = res
    # d lhs[r] = dout[r] @ rhs_t[g]; d rhs_t[g] = dout_g^T @ lhs_g.
    dlhs = _gmm(cfg, dout.astype(lhs.dtype), rhs_t, group_sizes)
    drhs_t = _tgmm(cfg, dout.astype(lhs.dtype), lhs, group_sizes)
    return dlhs.astype(lhs.dtype), drhs_t.astype(rhs_t.dtype), None


_gmm_t.defvjp(_gmm_t_fwd, _gmm_t_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tgmm(cfg: KernelConfig, lhs, grad, group_sizes):
    return _tgmm_raw(cfg, lhs, grad, group_sizes)


def _tgmm_fwd(cfg, lhs, grad, group_sizes):
    return _tgmm_raw(cfg, lhs, grad, group_sizes), (lhs, grad, group_sizes)


def _tgmm_bwd(cfg, res, dw):
    lhs, grad, group_sizes = res
    dlhs = _gmm_t(cfg, grad, dw.astype(grad.dtype), group_sizes)
    dgrad = _gmm(cfg, lhs, dw.astype(lhs.dtype), group_sizes)
    return dlhs.astype(lhs.dtype), dgrad.astype(grad.dtype), None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


def make_config(impl: str, interpret: Any = False, backend: str | None = None, tiling=None) -> KernelConfig:
    """Validate the kernel-selection arguments and bundle them into a static :class:`KernelConfig`."""
    impl = resolve_impl(impl)
    if impl == "pallas":
        check_pallas_runnable(interpret)
        return KernelConfig("pallas", resolve_backend(backend), None if tiling is None else tuple(tiling), interpret)
    return KernelConfig(impl)


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    impl: str = "auto",
    interpret: Any = False,
    backend: str | None = None,
    tiling: tuple[int, int, int] | None = None,
) -> jax.Array:
    """Grouped matmul: rows of ``lhs`` sorted by group, each multiplied by its group's ``rhs``.

    Args:
      lhs: [M, K]; rows ``[offset_g, offset_g + group_sizes[g])`` belong to group g.
      rhs: [G, K, N].
      group_sizes: [G] int32, ``sum(group_sizes) <= M``.
      impl: "auto" | "pallas" | "xla" | "reference".
      interpret: Pallas interpret mode (``True``, or ``pltpu.InterpretParams()`` for the TPU kernels).
      backend: force the Pallas kernel family ("tpu" | "gpu"); default from ``jax.default_backend()``.
      tiling: Pallas (tm, tk, tn) tile sizes; default per backend.
    Returns:
      [M, N] in ``lhs.dtype``; rows past ``sum(group_sizes)`` are zero. Differentiable in lhs and rhs.
    """
    check_gmm_args(lhs, rhs, group_sizes)
    cfg = make_config(impl, interpret, backend, tiling)
    if cfg.impl == "reference":
        return reference_lib.grouped_matmul(lhs, rhs, group_sizes)
    return _gmm(cfg, lhs, rhs, group_sizes.astype(jnp.int32))


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    impl: str = "auto",
    interpret: Any = False,
    backend: str | None = None,
    tiling: tuple[int, int, int] | None = None,
) -> jax.Array:
    """Transposed grouped matmul (the weight gradient of ``grouped_matmul``).

    Args:
      lhs: [M, K]; grad: [M, N]; rows sorted by group as in ``grouped_matmul``.
      group_sizes: [G] int32, ``sum(group_sizes) <= M``; rows past the sum are ignored.
      impl, interpret, backend, tiling: as in ``grouped_matmul``.
    Returns:
      [G, K, N] in ``lhs.dtype``: ``out[g] = lhs_g^T @ grad_g``; empty groups are zero.
    """
    check_tgmm_args(lhs, grad, group_sizes)
    cfg = make_config(impl, interpret, backend, tiling)
    if cfg.impl == "reference":
        return reference_lib.tgmm(lhs, grad, group_sizes)
    return _tgmm(cfg, lhs, grad, group_sizes.astype(jnp.int32))


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
    h = _gmm(cfg, xs, w_gate_up, r.group_sizes)  # [S, 2I]
    act = (jax.nn.silu(h[:, :i]) * h[:, i:]).astype(w_down.dtype)
    o = _gmm(cfg, act, w_down, r.group_sizes)  # [S, H]
    return routing_lib.combine(o, expert_weights, r).astype(x.dtype)
