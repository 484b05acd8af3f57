"""Gated DeltaNet token mixer (docs/model.md, Gated DeltaNet; Yang, Kautz, Hatamizadeh, ICLR 2025).

x -> projections (q|k|v, z, b, a) -> causal depthwise conv1d + SiLU over q|k|v -> L2-normalised q, k;
beta = sigmoid(b); g = -exp(A_log) * softplus(a + dt_bias) -> gated delta rule -> gated RMSNorm(o, z) -> out_proj.

Projection layouts: Qwen3.5 ("flat") has in_proj_qkv [H, 2*Hk*dk + Hv*dv], in_proj_z [H, Hv*dv], in_proj_b and
in_proj_a [H, Hv]. Qwen3-Next ("grouped") fuses them into in_proj_qkvz [H, Hk * (2dk + 2r*dv)] and
in_proj_ba [H, Hk * 2r] whose columns are grouped per key head (r = Hv / Hk); both are supported here, so the
checkpoint's tensors load unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwax.config import QwaxConfig
from qwax.layers.common import Linear, param
from qwax.layers.norms import GatedRMSNorm
from qwax.options import RunOptions
from qwax.pallas_kernels.gated_delta_rule import gated_delta_rule_step
from qwax.sharding.context_parallel import causal_depthwise_conv, gated_delta_rule


class GDNState(NamedTuple):
    """Per-layer recurrent cache: conv [*lead, B, K, conv_dim] raw pre-conv inputs of the last K positions;
    recurrent [*lead, B, Hv, dk, dv] float32 (`lead`: stacked-layer dims).

    After a call with keep_step_states, both hold the state after each of the L new tokens instead: conv
    [*lead, B, K + L, conv_dim] (the history the last K of which is the state after token L) and recurrent
    [*lead, B, L, Hv, dk, dv]; `rollback` picks one of them.
    """

    conv: jax.Array
    recurrent: jax.Array

    @classmethod
    def empty(cls, cfg: QwaxConfig, opts: RunOptions, batch: int, max_len: int, lead: tuple[int, ...] = ()
              ) -> "GDNState":
        """The zero state (its size does not depend on `max_len`)."""
        del max_len
        return cls(conv=jnp.zeros((*lead, batch, cfg.linear_conv_kernel_dim, cfg.linear_conv_dim), opts.dtype),
                   recurrent=jnp.zeros((*lead, batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                        cfg.linear_value_head_dim), jnp.float32))

    def logical_axes(self) -> "GDNState":
        """The same structure with a tuple of logical axis names per array (for qwax.sharding rules)."""
        lead = ("layers",) * (self.conv.ndim - 3)
        return GDNState(conv=(*lead, "cache_batch", None, "cache_heads"),
                        recurrent=(*lead, "cache_batch", "cache_heads", None, None))

    def rollback(self, processed: int, keep: int) -> "GDNState":
        """From the per-token states of a keep_step_states call over `processed` tokens, the state after the
        first `keep` of them (1 <= keep <= processed)."""
        k = self.conv.shape[-2] - processed
        conv = jax.lax.slice_in_dim(self.conv, keep, keep + k, axis=self.conv.ndim - 2)
        return GDNState(conv=conv, recurrent=jnp.take(self.recurrent, keep - 1, axis=self.recurrent.ndim - 4))


def l2_normalise(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x * rsqrt(sum(x^2) + eps) over the last dim, float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class GatedDeltaNet(nnx.Module):
    """The linear-attention mixer. See the module docstring for the math and the two projection layouts."""

    def __init__(self, cfg: QwaxConfig, opts: RunOptions, *, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.num_k_heads, self.num_v_heads = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = cfg.linear_key_dim, cfg.linear_value_dim
        self.layout = cfg.gdn_projection_layout
        self.impl, self.chunk_size, self.conv_impl = opts.gdn_impl, opts.gdn_chunk_size, opts.conv_impl
        if self.layout == "flat":
            self.in_proj_qkv = Linear(h, cfg.linear_conv_dim, ("embed", "gdn_qkv"), cfg=cfg, opts=opts, rngs=rngs)
            self.in_proj_z = Linear(h, self.value_dim, ("embed", "gdn_heads"), cfg=cfg, opts=opts, rngs=rngs)
            self.in_proj_b = Linear(h, self.num_v_heads, ("embed", "gdn_heads"), cfg=cfg, opts=opts, rngs=rngs)
            self.in_proj_a = Linear(h, self.num_v_heads, ("embed", "gdn_heads"), cfg=cfg, opts=opts, rngs=rngs)
        else:
            qkvz = 2 * self.key_dim + 2 * self.value_dim
            self.in_proj_qkvz = Linear(h, qkvz, ("embed", "gdn_heads"), cfg=cfg, opts=opts, rngs=rngs)
            self.in_proj_ba = Linear(h, 2 * self.num_v_heads, ("embed", "gdn_heads"), cfg=cfg, opts=opts, rngs=rngs)
        self.conv1d = param(rngs, (cfg.linear_conv_dim, cfg.linear_conv_kernel_dim), ("gdn_qkv", "conv"), cfg=cfg, opts=opts)
        # Initialisation as in the reference: A ~ U(0.01, 16) (log-space), dt_bias = 1. A_log stays float32.
        a = jax.random.uniform(rngs.params(), (self.num_v_heads,), jnp.float32, 0.01, 16.0)
        self.A_log = nnx.Param(jnp.log(a), logical_axes=("gdn_heads",))
        self.dt_bias = param(rngs, (self.num_v_heads,), ("gdn_heads",), init=1.0, cfg=cfg, opts=opts)
        self.norm = GatedRMSNorm(self.head_v_dim, cfg=cfg, opts=opts, rngs=rngs)
        self.out_proj = Linear(self.value_dim, h, ("gdn_heads", "embed"), cfg=cfg, opts=opts, rngs=rngs)

    def project(self, x: jax.Array):
        """x [B, L, H] -> (qkv [B, L, conv_dim] in flat q|k|v order, z [B, L, Hv, dv], b, a [B, L, Hv])."""
        bsz, l, _ = x.shape
        if self.layout == "flat":
            qkv = self.in_proj_qkv(x)
            z = self.in_proj_z(x)
            b, a = self.in_proj_b(x), self.in_proj_a(x)
        else:
            r, dk, dv, hk = self.num_v_heads // self.num_k_heads, self.head_k_dim, self.head_v_dim, self.num_k_heads
            qkvz = self.in_proj_qkvz(x).reshape(bsz, l, hk, 2 * dk + 2 * r * dv)
            q, k = qkvz[..., :dk], qkvz[..., dk: 2 * dk]
            v, z = qkvz[..., 2 * dk: 2 * dk + r * dv], qkvz[..., 2 * dk + r * dv:]
            qkv = jnp.concatenate([q.reshape(bsz, l, -1), k.reshape(bsz, l, -1), v.reshape(bsz, l, -1)], axis=-1)
            ba = self.in_proj_ba(x).reshape(bsz, l, hk, 2 * r)
            b, a = ba[..., :r].reshape(bsz, l, -1), ba[..., r:].reshape(bsz, l, -1)
        return qkv, z.reshape(bsz, l, self.num_v_heads, self.head_v_dim), b, a

    def __call__(self, x: jax.Array, valid: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 state: GDNState | None = None, keep_step_states: bool = False) -> tuple[jax.Array, GDNState]:
        """x [B, L, H] -> (y [B, L, H], new state).

        valid [B, L] bool marks real tokens: padding is zeroed before the projections (as the reference does)
        and also gets beta = 0, g = 0, so it neither writes to nor decays the recurrent state.
        segment_ids [B, L] int resets the state where the id changes (packed documents); the conv window is
        not allowed to reach across a document boundary either.
        state: a cache from a previous call (prefill continuation or decode); None starts from zeros.
        keep_step_states (with a state): run the recurrence token by token and return the state after every
        token: recurrent [B, L, Hv, dk, dv] and the conv history [B, K + L, C], for speculative rollback.
        """
        bsz, l, _ = x.shape
        if valid is not None:
            x = x * valid[..., None].astype(x.dtype)
        qkv, z, b, a = self.project(x)
        kernel = self.conv1d[...]
        k_size = kernel.shape[-1]
        history = None if state is None else state.conv[:, 1:]
        mixed = causal_depthwise_conv(qkv, kernel, history, segment_ids, impl=self.conv_impl)
        mixed = jax.nn.silu(mixed).astype(x.dtype)
        q, k, v = jnp.split(mixed, [self.key_dim, 2 * self.key_dim], axis=-1)
        q = l2_normalise(q.reshape(bsz, l, self.num_k_heads, self.head_k_dim))
        k = l2_normalise(k.reshape(bsz, l, self.num_k_heads, self.head_k_dim))
        v = v.reshape(bsz, l, self.num_v_heads, self.head_v_dim)
        beta = jax.nn.sigmoid(b)
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
            a.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        if valid is not None:
            beta = jnp.where(valid[..., None], beta, 0)
            g = jnp.where(valid[..., None], g, 0.0)
        if state is not None and (l == 1 or keep_step_states):  # decode: steps of the recurrence
            recurrent, outs, states = state.recurrent, [], []
            for t in range(l):
                o_t, recurrent = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t],
                                                       beta[:, t].astype(jnp.float32), recurrent, impl=self.impl)
                outs.append(o_t)
                states.append(recurrent)
            o = jnp.stack(outs, axis=1)
            if keep_step_states:
                recurrent = jnp.stack(states, axis=1)
        else:
            o, recurrent = gated_delta_rule(
                q, k, v, g, beta.astype(jnp.float32), initial_state=None if state is None else state.recurrent,
                segment_ids=segment_ids, chunk_size=self.chunk_size, impl=self.impl)
        y = self.norm(o.astype(x.dtype), z)
        y = self.out_proj(y.reshape(bsz, l, self.value_dim))
        # The conv cache keeps the raw inputs of the last K positions (zero-left-padded for short inputs).
        prev = jnp.zeros((bsz, k_size, qkv.shape[-1]), qkv.dtype) if state is None else state.conv.astype(qkv.dtype)
        conv = jnp.concatenate([prev, qkv], axis=1)
        return y, GDNState(conv=conv if keep_step_states else conv[:, -k_size:], recurrent=recurrent)
