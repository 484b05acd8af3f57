"""`dense` (every Linear and the tied LM head) and its hand-written VJP against numpy, for narrow outputs and for
the wide ones (>= 2048) whose kernel gradient takes the transposed-buffer path on the CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwax.layers.common import dense


@pytest.mark.parametrize("out_features", [24, 2048])
def test_values_and_gradients_match_numpy(out_features):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 16))
    w = rng.standard_normal((16, out_features))
    cot = rng.standard_normal((2, 5, out_features))  # a non-uniform cotangent: loss = sum(cot * dense(x, w))

    y = dense(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-5, atol=1e-4)

    loss = lambda x, w: jnp.sum(jnp.asarray(cot, jnp.float32) * dense(x, w))
    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(np.asarray(dx), cot @ w.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), np.einsum("bti,bto->io", x, cot), rtol=1e-5, atol=1e-4)


def test_low_precision_gradients_keep_the_input_dtypes():
    x = jnp.ones((3, 8), jnp.bfloat16)
    w = jnp.ones((8, 4), jnp.bfloat16)
    dx, dw = jax.grad(lambda x, w: jnp.sum(dense(x, w).astype(jnp.float32)), argnums=(0, 1))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dw, np.float32), np.full((8, 4), 3.0))
