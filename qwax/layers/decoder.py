"""Decoder layers and the layer stack (scanned over repeating layer groups, or unrolled).

One layer: h = x + Mixer(RMSNorm(x)); y = h + FFN(RMSNorm(h)), Mixer = GatedDeltaNet or gated Attention,
FFN = SparseMoE or dense MLP. Qwen3.5 repeats the pattern (3 x GDN, 1 x attention); the stack holds each
repeating group's parameters stacked along a leading axis and runs the groups with `lax.scan`, so compile time
does not grow with depth.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwax.config import QwaxConfig
from qwax.layers.attention import Attention, KVCache
from qwax.layers.gated_deltanet import GatedDeltaNet
from qwax.layers.mlp import MLP
from qwax.layers.moe import SparseMoE
from qwax.layers.norms import RMSNorm
from qwax.options import RunOptions
from qwax.sharding.rules import constrain

# Logical axes of the hidden states between layers (a sharding constraint under qwax.sharding.use_sharding).
HIDDEN_AXES = ("batch", "length", "act_embed")

# Names accepted by RunOptions.remat -> jax.checkpoint policies (None: no rematerialisation).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LayerContext(NamedTuple):
    """Per-forward inputs shared by every layer.

    cos, sin [B, L, rotary_dim]; attn_mask [B, L, L] bool (None with a cache); valid [B, L] bool (None: no
    padding); segment_ids [B, L] int (None: one document per row). With a cache: cache_index, an int32 scalar,
    the cache slot of the first new token; kv_valid [B, T] bool, the slots holding real tokens after this step;
    cache_group, the index of the current layer group when attention caches are stacked over groups (scan).
    keep_step_states: GDN layers return their state after every new token (for speculative rollback).
    """

    cos: jax.Array
    sin: jax.Array
    attn_mask: jax.Array | None
    valid: jax.Array | None
    segment_ids: jax.Array | None
    cache_index: jax.Array | None = None
    kv_valid: jax.Array | None = None
    cache_group: jax.Array | None = None
    keep_step_states: bool = False


# A layer's cache: KVCache for attention layers, GDNState for Gated DeltaNet layers.
LayerCache = Any


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: QwaxConfig, opts: RunOptions, mixer: str, ffn: str, *, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.mixer, self.ffn = mixer, ffn
        self.input_layernorm = RMSNorm(h, cfg=cfg, opts=opts, rngs=rngs)
        if mixer == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg, opts, rngs=rngs)
        else:
            self.self_attn = Attention(cfg, opts, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(h, cfg=cfg, opts=opts, rngs=rngs)
        self.mlp = SparseMoE(cfg, opts, rngs=rngs) if ffn == "moe" else MLP(h, cfg.intermediate_size, cfg=cfg, opts=opts, rngs=rngs)

    def __call__(self, x: jax.Array, ctx: LayerContext, cache: LayerCache = None
                 ) -> tuple[jax.Array, jax.Array | None, LayerCache]:
        """x [B, L, H] -> (x [B, L, H], router_logits [B*L, E] or None for a dense FFN, updated cache or None)."""
        x = constrain(x, HIDDEN_AXES)
        h = self.input_layernorm(x)
        if self.mixer == "linear_attention":
            h, state = self.linear_attn(h, ctx.valid, ctx.segment_ids, cache, ctx.keep_step_states)
            cache = None if cache is None else state
        else:
            h, cache = self.self_attn(h, ctx.cos, ctx.sin, ctx.attn_mask, cache, ctx.cache_index,
                                      ctx.valid, ctx.kv_valid, ctx.cache_group, ctx.segment_ids)
        x = x + h
        h = self.post_attention_layernorm(x)
        if self.ffn == "moe":
            h, router_logits = self.mlp(h)
        else:
            h, router_logits = self.mlp(h), None
        return constrain(x + h, HIDDEN_AXES), router_logits, cache


class LayerGroup(nnx.Module):
    """One period of the layer pattern, e.g. (GDN, GDN, GDN, attention)."""

    def __init__(self, cfg: QwaxConfig, opts: RunOptions, kinds: tuple[tuple[str, str], ...], *, rngs: nnx.Rngs):
        self.layers = nnx.List([DecoderLayer(cfg, opts, mixer, ffn, rngs=rngs) for mixer, ffn in kinds])

    def __call__(self, x: jax.Array, ctx: LayerContext, caches: tuple[LayerCache, ...] | None = None):
        """Returns x, the group's router logits stacked [n_moe_layers_in_group, B*L, E] (or None), and the
        updated caches (one per layer, or None)."""
        logits, new_caches = [], []
        for i, layer in enumerate(self.layers):
            x, lg, c = layer(x, ctx, None if caches is None else caches[i])
            new_caches.append(c)
            if lg is not None:
                logits.append(lg)
        return x, (jnp.stack(logits) if logits else None), (None if caches is None else tuple(new_caches))


def _remat(fn, policy_name: str):
    if policy_name not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy_name!r}: expected one of {sorted(REMAT_POLICIES)}")
    policy = REMAT_POLICIES[policy_name]
    return fn if policy is None else jax.checkpoint(fn, policy=policy)


class Decoder(nnx.Module):
    """The stack of `num_hidden_layers` decoder layers.

    Scanned layout (opts.scan_layers and the pattern repeats): `groups` is one LayerGroup whose parameters carry a
    leading [num_groups] axis. Unrolled layout: `layers` is a list of DecoderLayer.
    """

    def __init__(self, cfg: QwaxConfig, opts: RunOptions, *, rngs: nnx.Rngs):
        self.remat = opts.remat
        period = cfg.scan_period
        self.num_groups = cfg.num_hidden_layers // period
        self.scanned = opts.uses_scan(cfg)
        if self.scanned:
            kinds = cfg.layer_kinds[:period]

            @nnx.split_rngs(splits=self.num_groups)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_groups(rngs: nnx.Rngs) -> LayerGroup:
                return LayerGroup(cfg, opts, kinds, rngs=rngs)

            self.groups = make_groups(rngs)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, opts, m, f, rngs=rngs) for m, f in cfg.layer_kinds])

    def _scan_with_cache(self, graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, ctx: LayerContext,
                         cache: tuple) -> tuple[jax.Array, jax.Array | None, tuple]:
        """Scan the groups with their caches. Attention caches ride in the carry, whole and stacked, and each
        group writes and reads its own entry in place (cache_group); slicing them as scan inputs and restacking
        them as outputs would copy every KV cache on every step. GDN states are small and go through xs/ys."""
        is_kv = tuple(isinstance(c, KVCache) for c in cache)

        def split(caches: tuple) -> tuple[tuple, tuple]:
            return (tuple(c for c, k in zip(caches, is_kv) if k), tuple(c for c, k in zip(caches, is_kv) if not k))

        def join(kv: tuple, gdn: tuple) -> tuple:
            kv_it, gdn_it = iter(kv), iter(gdn)
            return tuple(next(kv_it) if k else next(gdn_it) for k in is_kv)

        def body(carry, xs):
            h, kv = carry
            group_params, gdn, group = xs
            h, logits, new = nnx.merge(graphdef, group_params)(h, ctx._replace(cache_group=group), join(kv, gdn))
            kv, gdn = split(new)
            return (h, kv), (logits, gdn)

        kv, gdn = split(cache)
        (x, kv), (logits, gdn) = jax.lax.scan(body, (x, kv), (params, gdn, jnp.arange(self.num_groups)))
        return x, logits, join(kv, gdn)

    def __call__(self, x: jax.Array, ctx: LayerContext, cache: Any = None):
        """x [B, L, H] -> (x [B, L, H], router logits of all MoE layers [n_moe, B*L, E] or None, new cache).

        cache: None, or the stack's cache as built by qwax.inference.cache.init_cache (scanned: a tuple with one
        entry per layer of the group, each stacked over groups; unrolled: a tuple with one entry per layer).
        """
        if self.scanned:
            graphdef, params = nnx.split(self.groups)
            if cache is None:
                def body(h, group_params):
                    h, logits, _ = nnx.merge(graphdef, group_params)(h, ctx)
                    return h, logits

                x, logits = jax.lax.scan(_remat(body, self.remat), x, params)
            else:
                x, logits, cache = self._scan_with_cache(graphdef, params, x, ctx, cache)
            if logits is not None:
                logits = logits.reshape(-1, *logits.shape[2:])
            return x, logits, cache
        all_logits, new_cache = [], []
        for i, layer in enumerate(self.layers):
            graphdef, params = nnx.split(layer)

            def body(h, layer_params, layer_cache, graphdef=graphdef):
                return nnx.merge(graphdef, layer_params)(h, ctx, layer_cache)

            x, lg, c = _remat(body, self.remat)(x, params, None if cache is None else cache[i])
            new_cache.append(c)
            if lg is not None:
                all_logits.append(lg)
        return x, (jnp.stack(all_logits) if all_logits else None), (None if cache is None else tuple(new_cache))
