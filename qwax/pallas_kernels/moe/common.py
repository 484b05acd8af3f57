"""Argument checking and implementation selection shared by the MoE ops.

Kept separate from ``__init__`` so that the backend modules (``xla``, ``tpu``, ``gpu``) can use the
same helpers without importing the public module (which imports them).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Impl = Literal["auto", "pallas", "xla", "reference"]
IMPLS: tuple[str, ...] = ("auto", "pallas", "xla", "reference")
Backend = Literal["tpu", "gpu"]
BACKENDS: tuple[str, ...] = ("tpu", "gpu")


def cdiv(a: int, b: int) -> int:
    """Ceiling division for Python ints (static shapes)."""
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    """Smallest multiple of ``b`` that is >= ``a`` (static shapes)."""
    return cdiv(a, b) * b


def resolve_impl(impl: str) -> str:
    """Map ``impl`` to one of "pallas", "xla", "reference".

    "auto" picks Pallas kernels on TPU/GPU and the fast XLA path on the CPU (Pallas does not compile
    for the CPU: it only runs there in interpret mode, which is orders of magnitude slower).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"
    return impl


def resolve_backend(backend: str | None) -> str:
    """Which Pallas kernel family to use: the argument if given, else from ``jax.default_backend()``.

    On the CPU (no Pallas compiler) we default to the TPU kernels, which only make sense with
    ``interpret=...``; callers forcing a variant in tests pass ``backend`` explicitly.
    """
    if backend is None:
        return "gpu" if jax.default_backend() == "gpu" else "tpu"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got backend={backend!r}")
    return backend


def check_pallas_runnable(interpret: object) -> None:
    """Pallas only compiles for TPU/GPU; on the CPU it must run in interpret mode. Fail early and clearly."""
    if jax.default_backend() not in ("tpu", "gpu") and not interpret:
        raise ValueError(
            f"impl='pallas' on backend {jax.default_backend()!r} needs interpret=True (GPU kernels) or "
            "interpret=pltpu.InterpretParams() (TPU kernels); use impl='xla' for the fast CPU path"
        )


def _is_int(a: jax.Array) -> bool:
    return jnp.issubdtype(a.dtype, jnp.integer)


def check_gmm_args(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> None:
    """Validate ``grouped_matmul`` shapes: lhs [M, K], rhs [G, K, N], group_sizes [G] integer."""
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be 2-D [M, K], got lhs.shape={lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"rhs must be 3-D [G, K, N], got rhs.shape={rhs.shape}")
    if rhs.shape[1] != lhs.shape[1]:
        raise ValueError(
            f"rhs.shape[1] (K) must equal lhs.shape[1]; got lhs.shape={lhs.shape}, rhs.shape={rhs.shape}"
        )
    _check_group_sizes(group_sizes, rhs.shape[0])


def check_tgmm_args(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array) -> None:
    """Validate ``tgmm`` shapes: lhs [M, K], grad [M, N], group_sizes [G] integer."""
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be 2-D [M, K], got lhs.shape={lhs.shape}")
    if grad.ndim != 2:
        raise ValueError(f"grad must be 2-D [M, N], got grad.shape={grad.shape}")
    if grad.shape[0] != lhs.shape[0]:
        raise ValueError(
            f"grad.shape[0] (M) must equal lhs.shape[0]; got lhs.shape={lhs.shape}, grad.shape={grad.shape}"
        )
    _check_group_sizes(group_sizes, None)


def _check_group_sizes(group_sizes: jax.Array, num_groups: int | None) -> None:
    if group_sizes.ndim != 1 or not _is_int(group_sizes):
        raise ValueError(
            f"group_sizes must be a 1-D integer array, got shape={group_sizes.shape} dtype={group_sizes.dtype}"
        )
    if num_groups is not None and group_sizes.shape[0] != num_groups:
        raise ValueError(
            f"group_sizes must have one entry per group (rhs.shape[0]={num_groups}), got shape={group_sizes.shape}"
        )


def check_routed_args(
    x: jax.Array,
    expert_idx: jax.Array,
    expert_weights: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
) -> tuple[int, int, int, int, int]:
    """Validate ``routed_experts`` arguments; return (T, H, k, E, I)."""
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [T, H], got x.shape={x.shape}")
    t, h = x.shape
    if expert_idx.ndim != 2 or expert_idx.shape[0] != t:
        raise ValueError(f"expert_idx must be [T, k] with T={t}, got expert_idx.shape={expert_idx.shape}")
    if not _is_int(expert_idx):
        raise ValueError(f"expert_idx must be an integer array, got dtype={expert_idx.dtype}")
    k = expert_idx.shape[1]
    if expert_weights.shape != expert_idx.shape:
        raise ValueError(
            f"expert_weights must have the shape of expert_idx {expert_idx.shape}, "
            f"got expert_weights.shape={expert_weights.shape}"
        )
    if w_gate_up.ndim != 3 or w_gate_up.shape[1] != h or w_gate_up.shape[2] % 2:
        raise ValueError(f"w_gate_up must be [E, H={h}, 2*I], got w_gate_up.shape={w_gate_up.shape}")
    e, _, i2 = w_gate_up.shape
    i = i2 // 2
    if w_down.shape != (e, i, h):
        raise ValueError(f"w_down must be [E, I, H] = {(e, i, h)}, got w_down.shape={w_down.shape}")
    return t, h, k, e, i
