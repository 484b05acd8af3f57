"""Forward-mode autodiff through whole models: jax.jvp of the logits w.r.t. the parameters equals a central
finite difference, for a tiny model of each text type.

The Linear, attention, conv and gated delta rule ops run their default ("auto") implementations (the gated delta
rule's chunked path defines its derivative as a custom JVP, so forward mode runs through it). The routed experts
run "reference": their fused CPU path carries a hand-written VJP (jax.custom_vjp), which has no forward mode.

Float32 throughout, so eps sits between truncation error (~eps^2, 1e-4 relative at eps = 1e-4 with a unit-normal
tangent) and rounding (~1e-7 / eps, 2e-4 at 1e-5); 3e-5 gives ~6e-5. eps must also stay below the MoE routers'
top-k margins: a routing flip between f(p + eps t) and f(p - eps t) shows up as an O(1) error (seen at 1e-4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwax

EPS = 3e-5
RTOL = 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe", "tiny-next"])
def test_jvp_of_logits_matches_central_differences(preset):
    cfg = qwax.get_preset(preset)
    opts = qwax.RunOptions(dtype="float32", moe_impl="reference")
    graphdef, params = nnx.split(qwax.QwaxForCausalLM(cfg, opts, rngs=nnx.Rngs(0)))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
    mask = np.ones((2, 16), np.int32)
    mask[1, :3] = 0  # left padding on row 1: its padding logits mean nothing and are not compared

    def logits(p):
        return qwax.forward(graphdef, p, ids, attention_mask=mask).logits

    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    tangent = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    _, jvp = jax.jit(lambda p, t: jax.jvp(logits, (p,), (t,)))(params, tangent)

    shifted = jax.jit(lambda p, t, s: logits(jax.tree.map(lambda a, b: a + s * b, p, t)))
    fd = (shifted(params, tangent, EPS) - shifted(params, tangent, -EPS)) / (2 * EPS)
    keep = mask.astype(bool)
    rel = np.linalg.norm(np.asarray(fd - jvp)[keep]) / np.linalg.norm(np.asarray(jvp)[keep])
    assert rel <= RTOL, f"{preset}: |jvp - finite difference| / |jvp| = {rel:.2e}"
