"""Parameter helpers shared by the layers: every weight carries logical axis names for the sharding rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwax.config import QwaxConfig


def dtypes(cfg: QwaxConfig) -> tuple[jnp.dtype, jnp.dtype]:
    """(compute dtype, parameter dtype) of a config."""
    return jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], *, init: str | float = "normal",
          cfg: QwaxConfig, dtype: jnp.dtype | None = None) -> nnx.Param:
    """A parameter of `shape` annotated with `logical_axes=axes` (one name per dim, used by qwax.sharding).

    `init`: "normal" draws N(0, cfg.initializer_range); a float fills the constant (norm offsets, gates).
    """
    if len(shape) != len(axes):
        raise ValueError(f"param shape {shape} and logical axes {axes} differ in rank")
    dtype = dtype or jnp.dtype(cfg.param_dtype)
    if init == "normal":
        value = cfg.initializer_range * jax.random.normal(rngs.params(), shape, jnp.float32)
    else:
        value = jnp.full(shape, float(init), jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out] -> [..., out], as one [tokens, in] matrix: the kernel gradient then contracts a
    single tokens axis. Contracting [B, L] jointly made XLA's CPU backend transpose the incoming gradient into a
    fresh buffer first, fused into its producer as a strided loop (~15 ms per [2048, 1024] matrix)."""
    y = _matmul(x.reshape(-1, x.shape[-1]), w)
    return y.reshape(*x.shape[:-1], y.shape[-1])


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [T, in] @ w [in, out]; the VJP below picks the kernel gradient's operand layout."""
    return jnp.dot(x, w)


def _matmul_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return jnp.dot(x, w), (x, w)


def _matmul_bwd(res: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    xt = x.T
    if jax.default_backend() == "cpu" and dy.shape[1] >= 2048:
        # XLA's CPU backend runs x^T dy (both operands contracted on their major axis) at half the speed of the
        # same product with x^T in a buffer of its own once dy is wide: [2048, 512] x [2048, N] took 190 vs
        # 98 ms at N = 8192 (the bench's LM head), 95 vs 49 at 4096, 33 vs 25 at 2048, 14.4 vs 13.0 at 1024,
        # where the transpose (~4 ms inside a train step) no longer pays. The barrier keeps XLA from folding
        # the transpose back into the dot.
        xt = jax.lax.optimization_barrier(xt)
    return jnp.dot(dy, w.T).astype(x.dtype), jnp.dot(xt, dy).astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nnx.Module):
    """Bias-free linear map y = x @ kernel, kernel [in, out] (the transpose of torch's [out, in] weight)."""

    def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
                 cfg: QwaxConfig, rngs: nnx.Rngs):
        self.kernel = param(rngs, (in_features, out_features), axes, cfg=cfg)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out] in the compute dtype."""
        return dense(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
