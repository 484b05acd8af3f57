"""Causal depthwise convolution (Gated DeltaNet's short conv over q|k|v): public op, checks and dispatch.

out[b, t, c] = sum_j kernel[c, j] * x[b, t - (K-1) + j, c], with `history` (or zeros) before position 0 and, with
segment_ids, no tap reaching into an earlier document.

Implementations (`dispatch.resolve_impl("causal_conv", ...)`):
  "reference": the sum over gathered windows of K taps (reference.py), the oracle.
  "xla":       K shifted multiply-adds (xla.py).
  "auto":      "xla" on every platform.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwax.pallas_kernels.causal_conv.reference import causal_depthwise_conv_reference
from qwax.pallas_kernels.causal_conv.xla import causal_depthwise_conv_xla
from qwax.pallas_kernels.dispatch import op_impls, resolve_impl

__all__ = ["IMPLS", "causal_depthwise_conv"]

IMPLS = op_impls("causal_conv")


def causal_depthwise_conv(x: jax.Array, kernel: jax.Array, history: jax.Array | None = None,
                          segment_ids: jax.Array | None = None, *, impl: str = "auto") -> jax.Array:
    """Causal depthwise conv1d of x along its length axis.

    x [B, L, C]; kernel [C, K]; history [B, K-1, C], the K-1 inputs before position 0 (None: zeros);
    segment_ids [B, L] int (None: one document per row): tap j of position t is used only when position
    t - (K-1) + j lies in t's document, so with segment_ids the history is never read. impl: one of IMPLS.
    Returns [B, L, C] in kernel.dtype (x and history are cast to it).
    """
    if x.ndim != 3:
        raise ValueError(f"x must have shape [B, L, C], found x.shape={tuple(x.shape)}")
    b, l, c = x.shape
    if kernel.ndim != 2 or kernel.shape[0] != c:
        raise ValueError(f"kernel must have shape [C, K] with C = {c} from x, found kernel.shape={tuple(kernel.shape)}")
    k = kernel.shape[1]
    if history is not None and tuple(history.shape) != (b, k - 1, c):
        raise ValueError(f"history must have shape [B, K-1, C] = {(b, k - 1, c)}, found {tuple(history.shape)}")
    if segment_ids is not None and (tuple(segment_ids.shape) != (b, l)
                                    or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise ValueError(f"segment_ids must be an int array of shape [B, L] = {(b, l)}, found shape "
                         f"{tuple(segment_ids.shape)} dtype {segment_ids.dtype}")
    if resolve_impl("causal_conv", impl) == "reference":
        return causal_depthwise_conv_reference(x, kernel, history, segment_ids)
    return causal_depthwise_conv_xla(x, kernel, history, segment_ids)
