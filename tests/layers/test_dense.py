"""The Linear layer: the linear op (tests/pallas_kernels/test_linear.py) in the compute dtype, with the impl the
run options name; forward and reverse mode through the layer's parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import qwax
from qwax.layers.common import Linear

CFG = qwax.get_preset("tiny-dense")


def make(opts: qwax.RunOptions, out_features: int = 24) -> Linear:
    return Linear(16, out_features, ("embed", "mlp"), cfg=CFG, opts=opts, rngs=nnx.Rngs(0))


def test_computes_in_the_compute_dtype_from_stored_params():
    layer = make(qwax.RunOptions(dtype="bfloat16", param_dtype="float32"))
    x = jnp.ones((2, 3, 16), jnp.float32)
    y = layer(x)
    assert layer.kernel[...].dtype == jnp.float32 and y.dtype == jnp.bfloat16
    want = x.astype(jnp.bfloat16) @ layer.kernel[...].astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))


def test_impls_from_run_options_agree_in_both_autodiff_modes():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 16)), jnp.float32)
    results = []
    for impl in ("xla", "reference"):
        graphdef, params = nnx.split(make(qwax.RunOptions(linear_impl=impl), out_features=2048))
        f = lambda p: jnp.sin(nnx.merge(graphdef, p)(x))
        _, tangent = jax.jvp(f, (params,), (jax.tree.map(jnp.ones_like, params),))
        grad = jax.grad(lambda p: jnp.sum(f(p)))(params)
        results.append((f(params), tangent, grad["kernel"][...]))
    for got, want in zip(*results):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
