"""Sparse Mixture-of-Experts feed-forward with a shared expert (docs/model.md, Sparse MoE).

router logits = x @ W_r (activation dtype) -> softmax in float32 over all experts -> top-k -> renormalise
(always for Qwen3.5-MoE, iff `norm_topk_prob` for Qwen3-Next) -> routed SwiGLU experts, combined with those
weights, plus sigmoid(x @ w_shared_gate) * shared_expert(x).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwax.config import QwaxConfig
from qwax.layers.common import Linear, param
from qwax.layers.mlp import MLP
from qwax.options import RunOptions
from qwax.pallas_kernels.moe.sharded import sharded_routed_experts


def route(router_logits: jax.Array, top_k: int, normalise: bool) -> tuple[jax.Array, jax.Array]:
    """router_logits [T, E] -> (expert_idx [T, k] int32, weights [T, k] in the logits dtype)."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, idx = jax.lax.top_k(probs, top_k)
    if normalise:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return idx.astype(jnp.int32), weights.astype(router_logits.dtype)


def load_balancing_loss(router_logits: jax.Array, top_k: int, valid: jax.Array | None = None) -> jax.Array:
    """Switch-style auxiliary loss pooled over all MoE layers, as transformers computes it.

    router_logits [n_layers, T, E]; valid [T] bool excludes padding. With f_e the fraction of (layer, token)
    rows routed to e (counting all k choices) and P_e the mean router probability of e:
    aux = E * sum_e f_e * P_e.
    """
    n_layers, t, e = router_logits.shape
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, idx = jax.lax.top_k(probs, top_k)
    w = jnp.ones((t,), jnp.float32) if valid is None else valid.astype(jnp.float32)
    counts = jnp.einsum("ltke,t->e", jax.nn.one_hot(idx, e, dtype=jnp.float32), w)
    prob_sum = jnp.einsum("lte,t->e", probs, w)
    rows = n_layers * jnp.sum(w)
    return e * jnp.sum((counts / rows) * (prob_sum / rows))


class SparseMoE(nnx.Module):
    """Router [H, E], experts gate_up [E, H, 2I] (gate columns first) and down [E, I, H], shared SwiGLU expert."""

    def __init__(self, cfg: QwaxConfig, opts: RunOptions, *, rngs: nnx.Rngs):
        h, e, i = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.top_k = cfg.num_experts_per_tok
        self.normalise = cfg.normalise_topk
        self.impl = opts.moe_impl
        self.dtype = opts.dtype
        self.gate = Linear(h, e, ("embed", "experts_router"), cfg=cfg, opts=opts, rngs=rngs)
        self.experts_gate_up = param(rngs, (e, h, 2 * i), ("experts", "embed", "expert_mlp"), cfg=cfg, opts=opts)
        self.experts_down = param(rngs, (e, i, h), ("experts", "expert_mlp", "embed"), cfg=cfg, opts=opts)
        self.shared_expert = MLP(h, cfg.shared_expert_intermediate_size, cfg=cfg, opts=opts, rngs=rngs)
        self.shared_expert_gate = Linear(h, 1, ("embed", None), cfg=cfg, opts=opts, rngs=rngs)
        # None, or a qwax.layers.lora.ExpertsLoRA (qwax.lora.apply_lora): the experts then run with W + s * A B.
        self.experts_lora = nnx.data(None)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, L, H] -> (y [B, L, H], router_logits [B*L, E] for the auxiliary loss)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1]).astype(self.dtype)
        logits = self.gate(x)
        idx, weights = route(logits, self.top_k, self.normalise)
        w_gate_up, w_down = self.experts_gate_up[...].astype(self.dtype), self.experts_down[...].astype(self.dtype)
        if self.experts_lora is not None:
            w_gate_up, w_down = self.experts_lora(w_gate_up, w_down)
        routed = sharded_routed_experts(x, idx, weights, w_gate_up, w_down, impl=self.impl)
        shared = jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return (routed + shared).reshape(shape), logits
