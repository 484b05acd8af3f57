"""Per-token gated delta rule: the oracle every faster implementation is tested against.

Notation (docs/model.md, Gated DeltaNet). For one (batch, value head) the state is S in R^{dk x dv} and for each token t:

    S   <- exp(g_t) * S                        decay first
    u_t  = beta_t * (v_t - S^T k_t)            delta against the already-decayed state
    S   <- S + k_t u_t^T                       rank-1 write
    o_t  = scale * S^T q_t                     the read includes the current token

This file favours being obviously correct over being fast: keys are repeated to the value heads and the state
is stepped one token at a time with `lax.scan` (so autodiff stores one state per token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def recurrent_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
    *,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One token of the recurrence (no shape checks; `gated_delta_rule_step` is the public, checked form).

    Args:
      q, k: [B, Hk, dk], already L2-normalised.
      v: [B, Hv, dv], with Hv a multiple of Hk; value head j reads key head j // (Hv // Hk).
      g: [B, Hv] log decay (<= 0). beta: [B, Hv] write strength.
      state: [B, Hv, dk, dv].
      scale: multiplies the read; defaults to dk ** -0.5.

    Returns:
      (o [B, Hv, dv] in v.dtype, new_state [B, Hv, dk, dv] float32).
    """
    hk, dk = q.shape[-2], q.shape[-1]
    hv = v.shape[-2]
    scale = dk**-0.5 if scale is None else scale
    r = hv // hk
    f32 = jnp.float32
    q = jnp.repeat(q.astype(f32), r, axis=1)
    k = jnp.repeat(k.astype(f32), r, axis=1)
    s = state.astype(f32) * jnp.exp(g.astype(f32))[..., None, None]
    u = beta.astype(f32)[..., None] * (v.astype(f32) - jnp.einsum("bhkv,bhk->bhv", s, k))
    s = s + k[..., :, None] * u[..., None, :]
    o = scale * jnp.einsum("bhkv,bhk->bhv", s, q)
    return o.astype(v.dtype), s


def gated_delta_rule_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Gated delta rule over a sequence, one token at a time.

    Args:
      q, k: [B, L, Hk, dk]; v: [B, L, Hv, dv]; g, beta: [B, L, Hv].
      initial_state: [B, Hv, dk, dv] or None (zeros).
      segment_ids: [B, L] ints or None. The state is zeroed before every token whose id differs from the
        previous token's id, so packed documents do not see each other.

    Returns:
      (o [B, L, Hv, dv] in v.dtype, final_state [B, Hv, dk, dv] float32).
    """
    b, _, hv, dv = v.shape
    dk = q.shape[-1]
    if initial_state is None:
        initial_state = jnp.zeros((b, hv, dk, dv), jnp.float32)
    if segment_ids is None:
        resets = jnp.zeros(v.shape[:2], bool)
    else:
        resets = jnp.concatenate(
            [jnp.zeros((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
        )

    def body(state, xs):
        q_t, k_t, v_t, g_t, beta_t, reset_t = xs
        state = jnp.where(reset_t[:, None, None, None], 0.0, state)
        o_t, state = recurrent_step(q_t, k_t, v_t, g_t, beta_t, state, scale=scale)
        return state, o_t

    # Scan over time: move L to the front.
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta, resets))
    final_state, o = jax.lax.scan(body, initial_state.astype(jnp.float32), xs)
    return jnp.moveaxis(o, 0, 1), final_state
