"""Parameter helpers shared by the layers (every weight carries logical axis names for the sharding rules), and
the bias-free Linear layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwax.config import QwaxConfig
from qwax.options import RunOptions
from qwax.pallas_kernels.linear import linear


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], *, init: str | float = "normal",
          cfg: QwaxConfig, opts: RunOptions, dtype: jnp.dtype | None = None) -> nnx.Param:
    """A parameter of `shape` annotated with `logical_axes=axes` (one name per dim, used by qwax.sharding).

    `init`: "normal" draws N(0, cfg.initializer_range); a float fills the constant (norm offsets, gates).
    dtype: the storage dtype, default opts.param_dtype.
    """
    if len(shape) != len(axes):
        raise ValueError(f"param shape {shape} and logical axes {axes} differ in rank")
    dtype = dtype or opts.param_dtype
    if init == "normal":
        value = cfg.initializer_range * jax.random.normal(rngs.params(), shape, jnp.float32)
    else:
        value = jnp.full(shape, float(init), jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))


class Linear(nnx.Module):
    """Bias-free linear map y = x @ kernel, kernel [in, out] (the transpose of torch's [out, in] weight).

    `lora`: None, or a low-rank adapter (qwax.layers.lora.LoRA, attached by qwax.lora.apply_lora) whose output is
    added: y = x @ kernel + lora(x).
    """

    def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
                 cfg: QwaxConfig, opts: RunOptions, rngs: nnx.Rngs):
        self.kernel = param(rngs, (in_features, out_features), axes, cfg=cfg, opts=opts)
        self.dtype = opts.dtype
        self.impl = opts.linear_impl
        self.lora = nnx.data(None)  # data, so an adapter module can be attached later

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out] in the compute dtype."""
        y = linear(x.astype(self.dtype), self.kernel[...].astype(self.dtype), impl=self.impl)
        return y if self.lora is None else y + self.lora(x)
