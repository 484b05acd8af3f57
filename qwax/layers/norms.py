"""RMSNorm variants of Qwen3-Next / Qwen3.5 (docs/model.md, The decoder stack)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwax.config import QwaxConfig
from qwax.layers.common import param
from qwax.options import RunOptions


def _rms_normalise(x: jax.Array, eps: float) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """Zero-centred RMSNorm: y = normalise(x) * (1 + w), in float32, cast back after the multiply.

    The weight is stored as an offset from 1 (initialised to 0), as in the checkpoints.
    """

    def __init__(self, dim: int, *, cfg: QwaxConfig, opts: RunOptions, rngs: nnx.Rngs, axis_name: str = "norm"):
        self.weight = param(rngs, (dim,), (axis_name,), init=0.0, cfg=cfg, opts=opts)
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., dim] -> [..., dim] in x.dtype."""
        y = _rms_normalise(x, self.eps) * (1.0 + self.weight[...].astype(jnp.float32))
        return y.astype(x.dtype)


class GatedRMSNorm(nnx.Module):
    """Gated DeltaNet output norm: y = w * normalise(o) * silu(z), a plain weight initialised to 1.

    Precision follows the reference: normalise in float32, cast to the input dtype, scale by w, gate in float32.
    """

    def __init__(self, dim: int, *, cfg: QwaxConfig, opts: RunOptions, rngs: nnx.Rngs):
        # Published checkpoints keep this weight in float32 whatever the model dtype.
        self.weight = param(rngs, (dim,), ("norm",), init=1.0, cfg=cfg, opts=opts, dtype=jnp.float32)
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        """x, gate [..., dim] -> [..., dim] in x.dtype."""
        dtype = x.dtype
        y = self.weight[...].astype(dtype) * _rms_normalise(x, self.eps).astype(dtype)
        y = y.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))
        return y.astype(dtype)
