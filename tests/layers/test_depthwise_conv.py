"""The GDN short convolution inside the layer: the causal_conv op (tests/pallas_kernels/test_causal_conv.py) with
the impl the run options name, over packed documents and across a prefill continuation (conv history)."""

from __future__ import annotations

import pytest
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import qwax
from qwax.layers.gated_deltanet import GatedDeltaNet, GDNState, causal_depthwise_conv
from qwax.pallas_kernels import causal_depthwise_conv as conv_op

CFG = qwax.get_preset("tiny-dense")


def layer(conv_impl: str) -> GatedDeltaNet:
    opts = qwax.RunOptions(conv_impl=conv_impl, gdn_impl="reference")
    return GatedDeltaNet(CFG, opts, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_conv_impls_agree_inside_the_layer_with_packed_documents():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 12, CFG.hidden_size)), jnp.float32)
    seg = jnp.asarray([[0] * 5 + [1] * 7, [3] * 12], jnp.int32)
    outs = []
    for impl in ("xla", "reference"):
        graphdef, params = nnx.split(layer(impl))
        f = lambda p: nnx.merge(graphdef, p)(x, segment_ids=seg)[0]
        outs.append((f(params), jax.grad(lambda p: jnp.sum(jnp.sin(f(p))))(params)["conv1d"][...]))
    for got, want in zip(*outs):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_prefill_continuation_reads_the_conv_history():
    gdn = layer("auto")
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 10, CFG.hidden_size)), jnp.float32)
    whole, _ = gdn(x, state=GDNState.empty(CFG, qwax.RunOptions(), 1, 10))
    first, state = gdn(x[:, :6], state=GDNState.empty(CFG, qwax.RunOptions(), 1, 10))
    second, _ = gdn(x[:, 6:], state=state)
    np.testing.assert_allclose(np.asarray(jnp.concatenate([first, second], 1)), np.asarray(whole), atol=1e-5)


def test_the_layer_modules_conv_is_the_op_outside_a_context_mesh():
    # The layer calls qwax.sharding.context_parallel's entry, which is the op itself without a context axis.
    rng = np.random.default_rng(3)
    x, kernel, history = rng.normal(size=(2, 9, 6)), rng.normal(size=(6, 4)), rng.normal(size=(2, 3, 6))
    seg = np.repeat(np.array([[0] * 5 + [1] * 4]), 2, axis=0)
    for s in (None, seg):
        np.testing.assert_array_equal(causal_depthwise_conv(x, kernel, history, s), conv_op(x, kernel, history, s))
