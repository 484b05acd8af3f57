"""Argument checking and kernel-family selection shared by the MoE ops.

Kept separate from ``__init__`` so that the backend modules (``xla``, ``tpu``, ``gpu``) can use the
same helpers without importing the public module (which imports them).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from qwax.pallas_kernels.dispatch import op_impls

Impl = Literal["auto", "pallas", "xla", "reference"]
IMPLS: tuple[str, ...] = op_impls("moe")
Backend = Literal["tpu", "gpu"]
BACKENDS: tuple[str, ...] = ("tpu", "gpu")


def cdiv(a: int, b: int) -> int:
    """Ceiling division for Python ints (static shapes)."""
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    """Smallest multiple of ``b`` that is >= ``a`` (static shapes)."""
    return cdiv(a, b) * b


# Operand dtypes each Pallas kernel family takes: megablox computes in bf16 / f32; Hopper wgmma takes
# bf16 / f16 (f32 would run as tf32, and only for K-major operands).
PALLAS_DTYPES: dict[str, tuple[jnp.dtype, ...]] = {
    "tpu": (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)),
    "gpu": (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)),
}


def pallas_takes(backend: str, dtypes: tuple[jnp.dtype, ...]) -> bool:
    """Whether the ``backend`` Pallas kernels take operands of these dtypes (the GPU ones: one dtype)."""
    dts = {jnp.dtype(d) for d in dtypes}
    return dts <= set(PALLAS_DTYPES[backend]) and (backend != "gpu" or len(dts) <= 1)


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


def resolve_interpret(interpret: object) -> object:
    """``None`` -> interpret mode (``True``) on the CPU, where Pallas cannot compile, else compiled (``False``).

    ``False`` always compiles (e.g. to ``jax.export`` for TPU/GPU from a CPU host); ``True`` is the
    backend's interpret mode with default parameters; ``pltpu.InterpretParams()`` /
    ``plgpu.InterpretGPUParams()`` choose them.
    """
    if interpret is None:
        return jax.default_backend() not in ("tpu", "gpu")
    return interpret


def check_pallas_dtypes(backend: str, **operands: jax.Array) -> None:
    """Raise a ValueError naming the operands whose dtypes the ``backend`` Pallas kernels do not take."""
    if pallas_takes(backend, tuple(a.dtype for a in operands.values())):
        return
    got = ", ".join(f"{name}.dtype={a.dtype}" for name, a in operands.items())
    one = " (all of one dtype)" if backend == "gpu" else ""
    raise ValueError(
        f"the {backend} Pallas kernels take {'/'.join(str(d) for d in PALLAS_DTYPES[backend])} operands{one}, "
        f"got {got}; cast them or use impl='xla'"
    )


def _is_int(a: jax.Array) -> bool:
    return jnp.issubdtype(a.dtype, jnp.integer)


def check_gmm_args(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> None:
    """Validate ``grouped_matmul`` shapes: lhs [M, K], rhs [G_local, K, N], group_sizes [G >= G_local] int."""
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be 2-D [M, K], got lhs.shape={lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"rhs must be 3-D [G, K, N], got rhs.shape={rhs.shape}")
    if rhs.shape[1] != lhs.shape[1]:
        raise ValueError(
            f"rhs.shape[1] (K) must equal lhs.shape[1]; got lhs.shape={lhs.shape}, rhs.shape={rhs.shape}"
        )
    _check_group_sizes(group_sizes)
    if group_sizes.shape[0] < rhs.shape[0]:
        raise ValueError(
            f"group_sizes must have an entry per group, at least rhs.shape[0]={rhs.shape[0]}, "
            f"got group_sizes.shape={group_sizes.shape}"
        )


def check_tgmm_args(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, num_groups: int | None) -> int:
    """Validate ``tgmm`` shapes: lhs [M, K], grad [M, N], group_sizes [G] integer; return G_local."""
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be 2-D [M, K], got lhs.shape={lhs.shape}")
    if grad.ndim != 2:
        raise ValueError(f"grad must be 2-D [M, N], got grad.shape={grad.shape}")
    if grad.shape[0] != lhs.shape[0]:
        raise ValueError(
            f"grad.shape[0] (M) must equal lhs.shape[0]; got lhs.shape={lhs.shape}, grad.shape={grad.shape}"
        )
    _check_group_sizes(group_sizes)
    g = group_sizes.shape[0]
    if num_groups is None:
        return g
    if not isinstance(num_groups, (int, np.integer)) or not 0 <= num_groups <= g:
        raise ValueError(f"num_groups must be a static int in [0, {g}] (group_sizes.shape[0]), got {num_groups!r}")
    return int(num_groups)


def _check_group_sizes(group_sizes: jax.Array) -> None:
    if group_sizes.ndim != 1 or not _is_int(group_sizes):
        raise ValueError(
            f"group_sizes must be a 1-D integer array, got shape={group_sizes.shape} dtype={group_sizes.dtype}"
        )


def resolve_group_offset(group_offset: jax.Array | int | None, num_groups: int, num_local: int) -> jax.Array:
    """``group_offset`` as an int32 scalar array in ``[0, num_groups - num_local]``.

    A concrete value outside that range is an error; a traced one (e.g. from ``lax.axis_index``) is
    clamped into it, so that no kernel ever indexes past the groups.
    """
    if group_offset is None:
        return jnp.zeros((), jnp.int32)
    off = jnp.asarray(group_offset)
    if off.shape != () or not _is_int(off):
        raise ValueError(f"group_offset must be an integer scalar, got shape={off.shape} dtype={off.dtype}")
    hi = num_groups - num_local
    try:
        value = int(off)
    except jax.errors.ConcretizationTypeError:  # traced
        return jnp.clip(off.astype(jnp.int32), 0, hi)
    if not 0 <= value <= hi:
        raise ValueError(
            f"group_offset must be in [0, {hi}] (groups {num_groups}, local groups {num_local}), got {value}"
        )
    return jnp.asarray(value, jnp.int32)


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
