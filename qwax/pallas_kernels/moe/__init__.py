"""MoE expert compute: routed SwiGLU experts and the grouped matmuls they are built from.

Public API:

* :func:`routed_experts` -- ``y_t = sum_j w[t, j] * SwiGLU_{e=idx[t, j]}(x_t)`` for top-k routing.
* :func:`grouped_matmul` -- ``[M, K] x [G_local, K, N] -> [M, N]`` with rows sorted by group.
* :func:`tgmm` -- per-group ``lhs_g^T @ grad_g`` (the weight gradient of ``grouped_matmul``).

Both grouped matmuls take megablox's ``group_offset``: ``group_sizes`` covers all G groups and only
groups ``[group_offset, group_offset + G_local)`` are computed (see ``grouped_matmul.py``).

Implementations (``impl=``):

* ``"reference"`` -- dense plain JAX over all experts (``reference.py``): the test oracle.
* ``"xla"`` -- on the CPU, a fused sorted loop over experts and row tiles whose cost grows with
  ``T * k`` and not with ``E`` (``xla.py``, with a hand-written VJP); on TPU/GPU, sort + ``ragged_dot``.
* ``"pallas"`` -- sort + Pallas grouped-matmul kernels with a custom VJP running the same kernels
  (``grouped_matmul.py``): on TPU jax's megablox ``gmm`` / ``tgmm`` (``tpu.py``; bf16 / f32), on GPU
  qwax's Hopper Mosaic GPU kernels (``gpu.py``; bf16 / f16, one dtype). On the CPU they run in interpret
  mode (slow: tests only).
* ``"auto"`` -- "pallas" on TPU and on Hopper GPUs when the kernels take the operand dtypes (else
  "xla": e.g. float32 on a GPU, or a non-Hopper GPU), "xla" on the CPU (``dispatch.resolve_impl``).

The MoE layer calls ``sharded.sharded_routed_experts``, which adds expert parallelism when the active mesh
shards the experts.

What was verified, and where (no TPU or GPU was available): both Pallas families were run in interpret
mode on the CPU (TPU: ``pltpu.InterpretParams()``; GPU: ``plgpu.InterpretGPUParams()``) against the
reference, values and gradients, with ragged and empty groups, transposed rhs and group offsets; and
both lower through ``jax.export`` (TPU: a Mosaic ``tpu_custom_call``; CUDA: a ``mosaic_gpu_v2`` custom
call), forward and gradient. Neither ran on real hardware: final compilation and speed are unverified.
"""

from __future__ import annotations

from typing import Any

import jax

from qwax.pallas_kernels.moe import reference as _reference
from qwax.pallas_kernels.moe import xla as _xla
from qwax.pallas_kernels.moe.common import IMPLS, check_routed_args
from qwax.pallas_kernels.moe.grouped_matmul import (
    grouped_matmul,
    make_config,
    routed_experts_grouped,
    tgmm,
)
from qwax.pallas_kernels.moe.routing import Routing, sort_by_expert

__all__ = ["IMPLS", "Routing", "grouped_matmul", "routed_experts", "sort_by_expert", "tgmm"]


def routed_experts(
    x: jax.Array,
    expert_idx: jax.Array,
    expert_weights: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    *,
    impl: str = "auto",
    interpret: Any = None,
    backend: str | None = None,
    tiling: tuple[int, int, int] | None = None,
) -> jax.Array:
    """SwiGLU experts applied to routed tokens and combined.

    Args:
      x: [T, H] tokens.
      expert_idx: [T, k] int, top-k expert ids per token. Ids outside ``[0, E)`` are dropped (the slot
        contributes zero), so a caller can drop tokens by writing ``E``.
      expert_weights: [T, k] combine weights (already normalised).
      w_gate_up: [E, H, 2I]; columns ``0..I-1`` are the gate projection, ``I..2I-1`` the up projection.
      w_down: [E, I, H].
      impl: "auto" | "pallas" | "xla" | "reference" (see module docstring).
      interpret: Pallas interpret mode, as in :func:`grouped_matmul` (default: interpret on the CPU only).
      backend: force the Pallas kernel family ("tpu" | "gpu"), default from ``jax.default_backend()``.
      tiling: Pallas (tm, tk, tn) tile sizes, default per backend.
    Returns:
      [T, H] in ``x.dtype``:
      ``y_t = sum_j expert_weights[t, j] * (silu(x_t @ Wg_e) * (x_t @ Wu_e)) @ Wd_e``, ``e = expert_idx[t, j]``.
      Differentiable w.r.t. x, expert_weights, w_gate_up and w_down.
    """
    check_routed_args(x, expert_idx, expert_weights, w_gate_up, w_down)
    cfg = make_config(impl, interpret, backend, tiling, {"x": x, "w_gate_up": w_gate_up, "w_down": w_down})
    if cfg.impl == "reference":
        return _reference.routed_experts(x, expert_idx, expert_weights, w_gate_up, w_down)
    if cfg.impl == "xla" and jax.default_backend() == "cpu":
        return _xla.routed_experts_cpu(x, expert_idx, expert_weights, w_gate_up, w_down)
    # Pallas kernels, or ragged_dot for "xla" on TPU/GPU.
    return routed_experts_grouped(x, expert_idx, expert_weights, w_gate_up, w_down, cfg)
