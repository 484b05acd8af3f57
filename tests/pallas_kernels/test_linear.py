"""The linear op: every impl against numpy in values, gradients and forward-mode derivatives, for narrow outputs
and for the wide ones (>= WIDE_OUTPUT) whose CPU kernel gradient reads a materialised x^T."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwax.pallas_kernels import linear
from qwax.pallas_kernels.linear import IMPLS, xla
from qwax.pallas_kernels.platform import current_platform

IMPL_NAMES = [i for i in IMPLS if i != "auto"]


def case(out_features: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    w = rng.standard_normal((16, out_features)).astype(np.float32)
    cot = rng.standard_normal((2, 5, out_features)).astype(np.float32)  # loss = sum(cot * linear(x, w))
    return x, w, cot


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("out_features", [24, xla.WIDE_OUTPUT])
def test_values_and_gradients_match_numpy(impl, out_features):
    x, w, cot = case(out_features)
    y = jax.jit(lambda x, w: linear(x, w, impl=impl))(x, w)
    np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-5, atol=1e-4)

    loss = lambda x, w: jnp.sum(cot * linear(x, w, impl=impl))
    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(np.asarray(dx), cot @ w.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), np.einsum("bti,bto->io", x, cot), rtol=1e-5, atol=1e-4)
    # One argument at a time (the other's tangent is a symbolic zero in the JVP rule).
    np.testing.assert_allclose(np.asarray(jax.grad(loss, argnums=1)(x, w)), np.asarray(dw), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.grad(loss, argnums=0)(x, w)), np.asarray(dx), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("out_features", [24, xla.WIDE_OUTPUT])
def test_forward_mode_matches_the_product_rule(impl, out_features):
    x, w, _ = case(out_features)
    tx, tw, _ = case(out_features, seed=1)
    y, ty = jax.jit(lambda *a: jax.jvp(lambda x, w: linear(x, w, impl=impl), a[:2], a[2:]))(x, w, tx, tw)
    np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ty), tx @ w + x @ tw, rtol=1e-5, atol=1e-4)
    jac = jax.jacfwd(lambda w: linear(x[:1, :2], w, impl=impl))(w[:, :3])  # [1, 2, 3, in, 3]
    want = np.einsum("bti,oO->btoiO", x[:1, :2], np.eye(3))
    np.testing.assert_allclose(np.asarray(jac), want, rtol=1e-6, atol=1e-6)


def test_cpu_kernel_gradient_reads_a_materialised_transpose_only_when_wide():
    if current_platform() != "cpu":
        pytest.skip("the transposed-operand layout is a CPU path")
    for out_features, barrier in ((24, False), (xla.WIDE_OUTPUT, True)):
        x, w, cot = case(out_features)
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(cot * linear(x, w)), argnums=0))(w))
        assert ("optimization_barrier" in jaxpr) == barrier, out_features


def test_low_precision_keeps_the_input_dtypes():
    x = jnp.ones((3, 8), jnp.bfloat16)
    w = jnp.ones((8, 4), jnp.bfloat16)
    assert linear(x, w).dtype == jnp.bfloat16
    dx, dw = jax.grad(lambda x, w: jnp.sum(linear(x, w).astype(jnp.float32)), argnums=(0, 1))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dw, np.float32), np.full((8, 4), 3.0))


def test_bad_arguments_raise_naming_them():
    x, w = jnp.ones((2, 3, 8)), jnp.ones((8, 4))
    with pytest.raises(ValueError, match=r"w must be a matrix"):
        linear(x, w[None])
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., in\] with in = w.shape\[0\] = 8"):
        linear(x[..., :5], w)
    with pytest.raises(ValueError, match=r"impl='pallas' for the linear op: expected one of \('auto', 'xla', "
                                         r"'reference'\)"):
        linear(x, w, impl="pallas")
