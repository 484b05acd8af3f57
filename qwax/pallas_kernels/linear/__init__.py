"""Linear map y = x @ w (every `Linear` of the model, and the tied LM head): public op, checks and dispatch.

Implementations (`dispatch.resolve_impl("linear", ...)`):
  "reference": one einsum (reference.py), the oracle.
  "xla":       one [tokens, in] x [in, out] dot (xla.py); on the CPU with a custom JVP that lays out the kernel
               gradient's operand for XLA:CPU. Forward and reverse mode both work.
  "auto":      "xla" on every platform.
"""

from __future__ import annotations

import jax

from qwax.pallas_kernels.dispatch import op_impls, resolve_impl
from qwax.pallas_kernels.linear.reference import linear_reference
from qwax.pallas_kernels.linear.xla import linear_xla

__all__ = ["IMPLS", "linear"]

IMPLS = op_impls("linear")


def linear(x: jax.Array, w: jax.Array, *, impl: str = "auto") -> jax.Array:
    """x [..., in] @ w [in, out] -> [..., out] (the dtype jnp.dot gives, x.dtype when both match).

    impl: one of IMPLS.
    """
    if w.ndim != 2:
        raise ValueError(f"w must be a matrix [in, out], found w.shape={tuple(w.shape)}")
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x must have shape [..., in] with in = w.shape[0] = {w.shape[0]}, "
                         f"found x.shape={tuple(x.shape)}")
    if resolve_impl("linear", impl) == "reference":
        return linear_reference(x, w)
    return linear_xla(x, w)
