"""Obviously-correct (and slow) plain-JAX versions of the MoE ops: the oracles for tests.

Everything here is dense over the experts/groups: every token is multiplied by every expert and the
results are masked, so cost and memory grow with ``E``. Gradients come from ordinary autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _row_groups(m: int, group_sizes: jax.Array) -> jax.Array:
    """[M] int32 group id of each row; rows beyond ``sum(group_sizes)`` get ``G`` (no group)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)


def _local_onehot(m: int, group_sizes: jax.Array, group_offset: jax.Array | int, num_local: int) -> jax.Array:
    """[M, G_local] f32: row r -> its group's index among ``[group_offset, group_offset + G_local)``, or none."""
    local = _row_groups(m, group_sizes) - jnp.asarray(group_offset, jnp.int32)
    return jax.nn.one_hot(local, num_local, dtype=jnp.float32)  # out-of-range ids give zero rows


def grouped_matmul(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset: jax.Array | int = 0
) -> jax.Array:
    """[M, K] x [G_local, K, N] -> [M, N]: row r of group g uses ``rhs[g - group_offset]``.

    Rows outside groups ``[group_offset, group_offset + G_local)`` (and past ``sum(group_sizes)``) are 0.
    """
    onehot = _local_onehot(lhs.shape[0], group_sizes, group_offset, rhs.shape[0])  # [M, G_local]
    all_groups = jnp.einsum("mk,gkn->gmn", lhs.astype(jnp.float32), rhs.astype(jnp.float32))
    return jnp.einsum("gmn,mg->mn", all_groups, onehot).astype(lhs.dtype)


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    group_offset: jax.Array | int = 0,
    num_groups: int | None = None,
) -> jax.Array:
    """[M, K], [M, N] -> [G_local, K, N]: ``out[i] = lhs_g^T @ grad_g`` for ``g = group_offset + i``.

    G_local is ``num_groups`` (default: all ``group_sizes.shape[0]`` groups).
    """
    num_local = group_sizes.shape[0] if num_groups is None else num_groups
    onehot = _local_onehot(lhs.shape[0], group_sizes, group_offset, num_local)  # [M, G_local]
    return jnp.einsum("mk,mg,mn->gkn", lhs.astype(jnp.float32), onehot, grad.astype(jnp.float32)).astype(lhs.dtype)


def routed_experts(
    x: jax.Array,
    expert_idx: jax.Array,
    expert_weights: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
) -> jax.Array:
    """Dense reference: run every token through every expert, weight by the routing matrix.

    Args:
      x: [T, H]; expert_idx: [T, k] int; expert_weights: [T, k];
      w_gate_up: [E, H, 2I] (gate columns first, then up); w_down: [E, I, H].
    Returns:
      [T, H] in ``x.dtype``. Expert ids outside [0, E) contribute nothing (their one-hot row is zero).
    """
    e, _, i2 = w_gate_up.shape
    i = i2 // 2
    f32 = jnp.float32
    # combine[t, e] = sum_j expert_weights[t, j] * [expert_idx[t, j] == e]  (duplicates add up).
    combine = jnp.einsum("tk,tke->te", expert_weights.astype(f32), jax.nn.one_hot(expert_idx, e, dtype=f32))
    h = jnp.einsum("th,ehf->etf", x.astype(f32), w_gate_up.astype(f32))
    act = jax.nn.silu(h[..., :i]) * h[..., i:]
    out = jnp.einsum("eti,eih->eth", act, w_down.astype(f32))
    return jnp.einsum("eth,te->th", out, combine).astype(x.dtype)
