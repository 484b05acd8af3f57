"""jit_with_graph: one compilation per distinct graph definition, donation and static arguments as in jax.jit."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwax.graph_jit import jit_with_graph


class Scale(nnx.Module):
    def __init__(self, n: int, factor: float):
        self.w = nnx.Param(jnp.full((n,), factor))

    def __call__(self, x):
        return x * self.w


def test_traces_once_per_graph_and_matches_eager():
    traces = []

    @jit_with_graph(static_argnums=(2,))
    def apply(graphdef, params, x, power):
        traces.append(power)
        return nnx.merge(graphdef, params)(x) ** power

    x = jnp.arange(3.0)
    g1, p1 = nnx.split(Scale(3, 2.0))
    g2, p2 = nnx.split(Scale(3, 5.0))  # an equal graph definition, another object: no new trace
    np.testing.assert_allclose(apply(g1, p1, x, 2), (2.0 * x) ** 2)
    np.testing.assert_allclose(apply(g2, p2, x, 2), (5.0 * x) ** 2)
    np.testing.assert_allclose(apply(g1, p1, x, 2), (2.0 * x) ** 2)
    assert traces == [2]
    apply(g1, p1, x, 3)  # a new static argument retraces
    g3, p3 = nnx.split(Scale(4, 1.0))  # another graph (shapes differ) traces anew
    apply(g3, p3, jnp.ones(4), 2)
    assert traces == [2, 3, 2]
    assert "mul" in apply.lower(g1, p1, x, 2).as_text()


def test_donation_applies_to_the_arguments_after_graphdef():
    @jit_with_graph(donate_argnums=(1,))
    def add(graphdef, params, buf):
        return buf + nnx.merge(graphdef, params).w

    g, p = nnx.split(Scale(3, 1.0))
    buf = jnp.zeros(3)
    out = add(g, p, buf)
    np.testing.assert_allclose(out, np.ones(3))
    assert buf.is_deleted()  # the CPU honours donation: the donated buffer was reused
