"""Token routing for the MoE ops: sort token-slots by expert, group sizes, inverse permutation, combine.

Terminology: a *slot* is one (token, choice) pair, ``s = t * k + j`` for ``expert_idx[t, j]``; there are
``S = T * k`` slots. Sorting slots by expert id (stably, so slots of one expert stay in token order)
lays each expert's rows out contiguously, which is the input layout of a grouped matmul.

Expert ids outside ``[0, E)`` are treated as *dropped*: they are sorted after all real groups (beyond
``sum(group_sizes)``), so grouped matmuls ignore them and they contribute zero to the output. This also
gives callers a way to drop tokens (e.g. for a capacity limit) by writing ``E`` into ``expert_idx``.

The permutations here are gathers with custom VJPs whose backward passes are gathers by the inverse
permutation; plain autodiff of a gather would produce a scatter-add, which is slow on every backend.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    """Sorted layout of the token-slots.

    Attributes:
      order: [S] int32, sorted position -> slot id ``s = t * k + j``.
      inverse: [S] int32, slot id -> sorted position (``order[inverse] == arange(S)``).
      token: [S] int32, sorted position -> token id (``order // k``).
      group_sizes: [E] int32, number of slots routed to each expert.
      group_offsets: [E + 1] int32, exclusive prefix sum of ``group_sizes`` (``group_offsets[E]`` is the
        number of valid slots; dropped slots sit in ``[group_offsets[E], S)``).
    """

    order: jax.Array
    inverse: jax.Array
    token: jax.Array
    group_sizes: jax.Array
    group_offsets: jax.Array


def sort_by_expert(expert_idx: jax.Array, num_experts: int) -> Routing:
    """Sort the slots of ``expert_idx`` [T, k] by expert id. See :class:`Routing`."""
    t, k = expert_idx.shape
    s = t * k
    flat = expert_idx.reshape(s).astype(jnp.int32)
    # Out-of-range ids become the sentinel E so they sort last and are counted in no group.
    flat = jnp.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    # The inverse of a permutation is a scatter of iota; cheaper than a second sort.
    inverse = jnp.zeros((s,), jnp.int32).at[order].set(jnp.arange(s, dtype=jnp.int32), unique_indices=True)
    group_sizes = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    group_offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes, dtype=jnp.int32)])
    return Routing(order=order, inverse=inverse, token=order // k, group_sizes=group_sizes,
                   group_offsets=group_offsets)


@jax.custom_vjp
def _take_rows(v: jax.Array, idx: jax.Array, inv: jax.Array) -> jax.Array:
    """``v[idx]`` for a permutation ``idx`` with inverse ``inv``; backward is ``g[inv]``."""
    return jnp.take(v, idx, axis=0, mode="clip")


def _take_rows_fwd(v, idx, inv):
    return _take_rows(v, idx, inv), (idx, inv)


def _take_rows_bwd(res, g):
    idx, inv = res
    return jnp.take(g, inv, axis=0, mode="clip"), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def gather_tokens(x: jax.Array, routing: Routing) -> jax.Array:
    """Rows of ``x`` [T, H] in sorted slot order: [S, H], row p = ``x[routing.token[p]]``.

    Implemented as a permutation of ``x`` repeated k times so that the backward pass is a gather by
    the inverse permutation plus a sum over the k copies (no scatter-add).
    """
    t, h = x.shape
    k = routing.order.shape[0] // t
    x_rep = jnp.broadcast_to(x[:, None, :], (t, k, h)).reshape(t * k, h)
    return _take_rows(x_rep, routing.order, routing.inverse)


def combine(rows: jax.Array, expert_weights: jax.Array, routing: Routing) -> jax.Array:
    """Weighted sum of the expert outputs of each token.

    Args:
      rows: [S, H] expert outputs in sorted slot order (dropped slots may hold anything finite).
      expert_weights: [T, k] combine weights.
      routing: the layout ``rows`` is in.
    Returns:
      [T, H] float32, ``y[t] = sum_j expert_weights[t, j] * rows[inverse[t * k + j]]`` (dropped slots
      contribute zero).
    """
    t, k = expert_weights.shape
    per_slot = _take_rows(rows, routing.inverse, routing.order).reshape(t, k, -1)
    valid = (routing.inverse < routing.group_offsets[-1]).reshape(t, k)
    w = jnp.where(valid, expert_weights, 0).astype(jnp.float32)
    per_slot = jnp.where(valid[..., None], per_slot.astype(jnp.float32), 0.0)
    return jnp.einsum("tkh,tk->th", per_slot, w)
