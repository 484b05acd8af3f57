"""Causal depthwise conv as the direct sum over taps of gathered windows: the oracle for xla.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_depthwise_conv_reference(x: jax.Array, kernel: jax.Array, history: jax.Array | None,
                                    segment_ids: jax.Array | None) -> jax.Array:
    """x [B, L, C], kernel [C, K], history [B, K-1, C] or None, segment_ids [B, L] or None -> [B, L, C]."""
    b, l, c = x.shape
    k = kernel.shape[1]
    if history is None:
        history = jnp.zeros((b, k - 1, c), kernel.dtype)
    padded = jnp.concatenate([history.astype(kernel.dtype), x.astype(kernel.dtype)], axis=1)  # [B, K-1+L, C]
    src = jnp.arange(l)[:, None] + jnp.arange(k)[None, :]  # [L, K]: tap j of t reads position t - (K-1) + j
    windows = padded[:, src]  # [B, L, K, C]
    if segment_ids is not None:
        pos = src - (k - 1)
        same_doc = jnp.take(segment_ids, jnp.maximum(pos, 0), axis=1) == segment_ids[:, :, None]  # [B, L, K]
        windows = jnp.where(((pos >= 0) & same_doc)[..., None], windows, 0)
    return jnp.einsum("blkc,ck->blc", windows, kernel)
