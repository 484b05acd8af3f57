"""The GDN short convolution (`causal_depthwise_conv`) and its hand-written VJP against a direct numpy loop.

The model parity tests exercise it inside whole models; this checks the corners directly: a conv history
(prefill continuation), packed documents (no tap reaches into an earlier document), and gradients for the
input, the kernel and the history.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from qwax.layers.gated_deltanet import causal_depthwise_conv

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


@pytest.mark.parametrize("with_history", [False, True])
@pytest.mark.parametrize("segment_ids", [None, SEGMENTS])
def test_conv_values_and_gradients(with_history, segment_ids):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 5)).astype(np.float32)
    kernel = rng.standard_normal((5, 4)).astype(np.float32)
    history = rng.standard_normal((2, 3, 5)).astype(np.float32) if with_history else None
    seg = None if segment_ids is None else jnp.asarray(segment_ids)

    got = causal_depthwise_conv(jnp.asarray(x), jnp.asarray(kernel), history, seg)
    np.testing.assert_allclose(np.asarray(got), numpy_conv(x, kernel, history, segment_ids), atol=1e-5)

    def fn(x, kernel, *history):
        return causal_depthwise_conv(x, kernel, history[0] if history else None, segment_ids=seg)

    args = (jnp.asarray(x), jnp.asarray(kernel)) + ((jnp.asarray(history),) if with_history else ())
    check_grads(fn, args, order=1, modes=["rev"], atol=2e-2, rtol=2e-2)
    # The kernel gradient against the numpy loop's: d sum(out * w) / d kernel[c, j] = sum_t padded[t + j, c] w[t, c].
    w = rng.standard_normal(got.shape).astype(np.float32)
    grad = jax.grad(lambda kern: jnp.sum(fn(*args[:1], kern, *args[2:]) * w))(jnp.asarray(kernel))
    eye = np.eye(4)
    want = np.stack([np.stack([np.sum(numpy_conv(x, np.outer(np.eye(5)[c], eye[j]), history, segment_ids) * w)
                               for j in range(4)]) for c in range(5)])
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-4)
