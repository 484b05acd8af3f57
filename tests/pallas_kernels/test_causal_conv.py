"""The causal depthwise conv op: every impl against a direct numpy loop, in values, gradients (reverse and
forward mode) for the input, the kernel and the history, with a conv history (prefill continuation) and
packed documents (no tap reaches into an earlier document)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from qwax.pallas_kernels import causal_depthwise_conv
from qwax.pallas_kernels.causal_conv import IMPLS

IMPL_NAMES = [i for i in IMPLS if i != "auto"]
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3], [1] * 9])


def numpy_conv(x, kernel, history, segment_ids):
    """out[b, t] = sum_j kernel[:, j] * padded[b, t + j], skipping taps outside t's document (history counts as
    before every document, so with segment_ids it is never read)."""
    b, l, c = x.shape
    k = kernel.shape[1]
    padded = np.concatenate([np.zeros((b, k - 1, c)) if history is None else history, x], axis=1)
    out = np.zeros((b, l, c))
    for bi in range(b):
        for t in range(l):
            for j in range(k):
                src = t - (k - 1) + j
                if segment_ids is not None and (src < 0 or segment_ids[bi, src] != segment_ids[bi, t]):
                    continue
                out[bi, t] += kernel[:, j] * padded[bi, t + j]
    return out


def case(with_history: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 9, 5)).astype(np.float32)
    kernel = rng.standard_normal((5, 4)).astype(np.float32)
    history = rng.standard_normal((2, 3, 5)).astype(np.float32) if with_history else None
    return x, kernel, history


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("with_history", [False, True])
@pytest.mark.parametrize("segment_ids", [None, SEGMENTS])
def test_values_and_gradients_match_numpy(impl, with_history, segment_ids):
    x, kernel, history = case(with_history)
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    got = causal_depthwise_conv(jnp.asarray(x), jnp.asarray(kernel), history, seg, impl=impl)
    np.testing.assert_allclose(np.asarray(got), numpy_conv(x, kernel, history, segment_ids), atol=1e-5)

    def fn(x, kernel, *history):
        return causal_depthwise_conv(x, kernel, history[0] if history else None, seg, impl=impl)

    args = (jnp.asarray(x), jnp.asarray(kernel)) + ((jnp.asarray(history),) if with_history else ())
    check_grads(fn, args, order=1, modes=["fwd", "rev"], atol=2e-2, rtol=2e-2)
    # The kernel gradient against the numpy loop's: d sum(out * w) / d kernel[c, j] = sum_t padded[t + j, c] w[t, c].
    w = np.random.default_rng(1).standard_normal(got.shape).astype(np.float32)
    grad = jax.jit(jax.grad(lambda kern: jnp.sum(fn(args[0], kern, *args[2:]) * w)))(jnp.asarray(kernel))
    eye = np.eye(4)
    want = np.stack([np.stack([np.sum(numpy_conv(x, np.outer(np.eye(5)[c], eye[j]), history, segment_ids) * w)
                               for j in range(4)]) for c in range(5)])
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-4)


def test_impls_agree_in_value_and_derivatives():
    x, kernel, history = case(True, seed=2)
    tangents = case(True, seed=3)
    seg = jnp.asarray(SEGMENTS)
    results = {}
    for impl in IMPL_NAMES:
        fn = lambda *a: causal_depthwise_conv(*a, seg, impl=impl)
        primal, tangent = jax.jvp(fn, (x, kernel, history), tangents)
        grads = jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))(x, kernel, history)
        results[impl] = (primal, tangent, *grads)
    for got, want in zip(results["xla"], results["reference"]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_computes_in_the_kernel_dtype():
    x, kernel, history = case(True)
    out = causal_depthwise_conv(jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel), jnp.asarray(history))
    assert out.dtype == jnp.float32
    out = causal_depthwise_conv(jnp.asarray(x), jnp.asarray(kernel, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("name, change", [
    ("x", lambda a: {**a, "x": a["x"][0]}),
    ("kernel", lambda a: {**a, "kernel": a["kernel"][:-1]}),
    ("history", lambda a: {**a, "history": a["history"][:, :2]}),
    ("segment_ids", lambda a: {**a, "segment_ids": SEGMENTS[:, :4]}),
    ("segment_ids", lambda a: {**a, "segment_ids": SEGMENTS.astype(np.float32)}),
    ("impl", lambda a: {**a, "impl": "pallas"}),
])
def test_bad_arguments_raise_naming_them(name, change):
    x, kernel, history = case(True)
    args = change(dict(x=x, kernel=kernel, history=history, segment_ids=SEGMENTS, impl="auto"))
    with pytest.raises(ValueError, match=name):
        causal_depthwise_conv(**args)
