"""The Qwen3-Next / Qwen3.5 causal language model: embed -> decoder stack -> norm -> LM head (+ MTP head).

Use it eagerly (`model(input_ids)`) or purely functionally: `graphdef, params = nnx.split(model)` once, then
`forward(graphdef, params, input_ids, ...)` inside jit / grad / scan.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwax.config import QwaxConfig
from qwax.layers.attention import attention_mask as build_attention_mask
from qwax.layers.common import Linear, param
from qwax.layers.decoder import Decoder, LayerContext
from qwax.layers.moe import load_balancing_loss
from qwax.layers.mtp import MTP
from qwax.layers.norms import RMSNorm
from qwax.layers.rotary import rotary_cos_sin
from qwax.options import RunOptions
from qwax.pallas_kernels.linear import linear
from qwax.sharding.rules import constrain


def check_token_ids(input_ids: Any, vocab_size: int) -> None:
    """Raise ValueError naming an id outside [0, vocab_size) (concrete arrays only)."""
    ids = np.asarray(input_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise ValueError(f"input_ids contain {bad.size} id(s) outside the vocabulary [0, {vocab_size}), "
                         f"e.g. {int(bad.flat[0])}")


class ModelOutput(NamedTuple):
    """logits [B, L, vocab] (compute dtype); hidden [B, L, H] final-normed hidden states;
    aux_loss: the MoE load-balancing loss (0.0 for dense models, unweighted by router_aux_loss_coef);
    cache: the updated decoding cache when one was passed in, else None;
    router_logits: [n_moe_layers, B*L, E] router logits of every MoE layer (None for dense models), e.g. for a
    router z-loss."""

    logits: jax.Array
    hidden: jax.Array
    aux_loss: jax.Array
    cache: Any = None
    router_logits: jax.Array | None = None


class QwaxForCausalLM(nnx.Module):
    """Weights: embed_tokens [vocab, H]; decoder; norm [H]; lm_head [H, vocab] unless tied; mtp (optional)."""

    def __init__(self, cfg: QwaxConfig, options: RunOptions | None = None, *, rngs: nnx.Rngs):
        opts = RunOptions() if options is None else options
        self.config, self.options = cfg, opts
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg=cfg, opts=opts)
        self.decoder = Decoder(cfg, opts, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg=cfg, opts=opts, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), cfg=cfg, opts=opts, rngs=rngs)
        if cfg.mtp_num_hidden_layers:
            self.mtp = MTP(cfg, opts, rngs=rngs)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """[B, L] int -> [B, L, H]. Ids outside [0, vocab) raise eagerly; under jit they give NaN rows."""
        if not isinstance(input_ids, jax.core.Tracer):
            check_token_ids(input_ids, self.config.vocab_size)
        table = self.embed_tokens[...]
        x = jnp.take(table, input_ids, axis=0, mode="fill", fill_value=jnp.nan)
        # Look rows up where the table's columns live (hidden dim split as the table's "embed"), then let the
        # layers' constraint move tokens to their shards: a direct gather into sequence-split hidden states is
        # one GSPMD cannot partition (it would replicate [B, L, H]) once "length" is sharded over context.
        x = constrain(x, ("batch", None, "embed"))
        return x.astype(self.options.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, L, H] -> [B, L, vocab] with the LM head (or the tied embedding)."""
        if self.config.tie_word_embeddings:
            logits = linear(hidden, self.embed_tokens[...].astype(hidden.dtype).T, impl=self.options.linear_impl)
        else:
            logits = self.lm_head(hidden)
        return constrain(logits, ("batch", "length", "act_vocab"))

    def context(self, batch: int, length: int, attention_mask: jax.Array | None, position_ids: jax.Array | None,
                segment_ids: jax.Array | None) -> LayerContext:
        cfg = self.config
        seq = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        positions = seq if position_ids is None else jnp.asarray(position_ids)
        valid = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        kv_valid = jnp.ones((batch, length), bool) if valid is None else valid
        mask = build_attention_mask(kv_valid, seq, seq, segment_ids, segment_ids)
        cos, sin = rotary_cos_sin(positions, cfg, self.options.dtype)
        return LayerContext(cos=cos, sin=sin, attn_mask=mask, valid=valid, segment_ids=segment_ids)

    def cached_context(self, cache: Any, length: int, attention_mask: jax.Array | None,
                       position_ids: jax.Array | None) -> tuple[LayerContext, Any]:
        """Context for L new tokens written at cache slots [cache.index, cache.index + L), and the cache's
        bookkeeping after them (valid slots, index, per-row positions)."""
        cfg = self.config
        batch = cache.valid.shape[0]
        new_valid = jnp.ones((batch, length), bool) if attention_mask is None else jnp.asarray(attention_mask) > 0
        valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, cache.index))
        if position_ids is None:  # as transformers' generate: each row counts only its real tokens
            position_ids = jnp.maximum(cache.position[:, None] + jnp.cumsum(new_valid, axis=1) - 1, 0)
        cos, sin = rotary_cos_sin(jnp.asarray(position_ids), cfg, self.options.dtype)
        ctx = LayerContext(cos=cos, sin=sin, attn_mask=None, valid=None if attention_mask is None else new_valid,
                           segment_ids=None, cache_index=cache.index, kv_valid=valid)
        bookkeeping = dict(valid=valid, index=cache.index + length,
                           position=cache.position + jnp.sum(new_valid, axis=1, dtype=jnp.int32))
        return ctx, bookkeeping

    def prepare(self, batch: int, length: int, attention_mask: jax.Array | None, position_ids: jax.Array | None,
                segment_ids: jax.Array | None, cache: Any, keep_step_states: bool = False
                ) -> tuple[LayerContext, dict[str, Any] | None]:
        """Validate the per-token inputs and build the layer context (and the cache bookkeeping, with a cache)."""
        for name, arr in (("attention_mask", attention_mask), ("segment_ids", segment_ids)):
            if arr is not None and tuple(jnp.shape(arr)) != (batch, length):
                raise ValueError(f"{name} must have the shape of the input tokens {(batch, length)}, "
                                 f"got {tuple(jnp.shape(arr))}")
        if cache is None:
            return self.context(batch, length, attention_mask, position_ids, segment_ids), None
        if segment_ids is not None:
            raise ValueError("segment_ids (packed documents) cannot be combined with a decoding cache")
        ctx, bookkeeping = self.cached_context(cache, length, attention_mask, position_ids)
        return ctx._replace(keep_step_states=keep_step_states), bookkeeping

    def _output(self, hidden: jax.Array, router_logits: jax.Array | None, ctx: LayerContext, cache: Any,
                layer_caches: Any, bookkeeping: dict[str, Any] | None) -> ModelOutput:
        aux = jnp.zeros((), jnp.float32)
        if router_logits is not None:
            aux = load_balancing_loss(router_logits, self.config.num_experts_per_tok,
                                      None if ctx.valid is None else ctx.valid.reshape(-1))
        if cache is not None:
            cache = cache._replace(layers=layer_caches, **bookkeeping)
        return ModelOutput(logits=self.logits(hidden), hidden=hidden, aux_loss=aux, cache=cache,
                           router_logits=router_logits)

    def __call__(self, input_ids: jax.Array | None, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 cache: Any = None, inputs_embeds: jax.Array | None = None,
                 keep_step_states: bool = False) -> ModelOutput:
        """input_ids [B, L] int; attention_mask [B, L] (1 = token, 0 = padding); position_ids [B, L] or
        [3, B, L] (multimodal T/H/W rows), default 0..L-1 as in transformers; segment_ids [B, L] int for packed
        documents (attention and the GDN state never cross a change of id).

        cache: a qwax.inference.Cache; the tokens continue it (prefill chunk or decode step). The mask then
        covers the new tokens only, positions default to each row's count of real tokens, and the output
        carries the updated cache. Logits at padding positions are not meaningful (they are finite).
        inputs_embeds [B, L, H]: embeddings to use instead of embedding input_ids (early-fusion multimodal input);
        pass input_ids=None with it.
        keep_step_states (with a cache): GDN layers return their state after every new token (recurrent
        [B, L, Hv, dk, dv], conv history [B, K + L, C]) so a caller can roll back to any of them
        (speculative decoding, see qwax.inference.speculative).
        """
        if inputs_embeds is None:
            input_ids = jnp.asarray(input_ids)
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.embed(input_ids)
        elif input_ids is not None:
            raise ValueError("pass either input_ids or inputs_embeds, not both")
        b, l = inputs_embeds.shape[:2]
        ctx, bookkeeping = self.prepare(b, l, attention_mask, position_ids, segment_ids, cache, keep_step_states)
        x, router_logits, layer_caches = self.decoder(inputs_embeds.astype(self.options.dtype), ctx,
                                                      None if cache is None else cache.layers)
        return self._output(self.norm(x), router_logits, ctx, cache, layer_caches, bookkeeping)

    def mtp_forward(self, hidden: jax.Array, next_ids: jax.Array, attention_mask: jax.Array | None = None,
                    position_ids: jax.Array | None = None, segment_ids: jax.Array | None = None,
                    cache: Any = None) -> ModelOutput:
        """The MTP head: at position t, from hidden[t] (the main model's final-normed state) and the token
        next_ids[t] = token t+1, predict token t+2. hidden [B, L, H], next_ids [B, L] -> logits [B, L, vocab].

        Positions, masks and the cache (a qwax.inference.Cache over the MTP layers, from init_mtp_cache)
        work as in __call__.
        """
        if not self.config.mtp_num_hidden_layers:
            raise ValueError("this model has no MTP head (config.mtp_num_hidden_layers == 0)")
        b, l = next_ids.shape
        ctx, bookkeeping = self.prepare(b, l, attention_mask, position_ids, segment_ids, cache)
        normed, router_logits, layer_caches = self.mtp(hidden, self.embed(next_ids), ctx,
                                                       None if cache is None else cache.layers)
        return self._output(normed, router_logits, ctx, cache, layer_caches, bookkeeping)


def forward(graphdef: nnx.GraphDef, params: nnx.State, input_ids: jax.Array, **kwargs) -> ModelOutput:
    """Pure forward: merge (graphdef, params) into a model inside the caller's transform and run it."""
    return nnx.merge(graphdef, params)(input_ids, **kwargs)
