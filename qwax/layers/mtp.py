"""Multi-token prediction head of Qwen3.5 / Qwen3-Next (docs/model.md, Multi-token prediction).

Predicts token t+2 at position t from h_t (the main model's final-normed hidden state) and the embedding of token
t+1: x = fc([norm_e(embed(t+1)) ; norm_h(h_t)]) -> one full-attention decoder layer (the model's FFN type) ->
norm -> the shared LM head. transformers drops these weights; qwax keeps, trains and decodes with them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwax.config import QwaxConfig
from qwax.layers.common import Linear
from qwax.layers.decoder import LayerContext, LayerGroup
from qwax.layers.norms import RMSNorm
from qwax.options import RunOptions


class MTP(nnx.Module):
    """Weights: pre_fc_norm_embedding, pre_fc_norm_hidden [H]; fc [2H, H]; block.layers[i]; norm [H]."""

    def __init__(self, cfg: QwaxConfig, opts: RunOptions, *, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.pre_fc_norm_embedding = RMSNorm(h, cfg=cfg, opts=opts, rngs=rngs)
        self.pre_fc_norm_hidden = RMSNorm(h, cfg=cfg, opts=opts, rngs=rngs)
        self.fc = Linear(2 * h, h, ("mtp_concat", "embed"), cfg=cfg, opts=opts, rngs=rngs)
        self.block = LayerGroup(cfg, opts, (("full_attention", cfg.mtp_ffn),) * cfg.mtp_num_hidden_layers, rngs=rngs)
        self.norm = RMSNorm(h, cfg=cfg, opts=opts, rngs=rngs)

    def __call__(self, hidden: jax.Array, next_embeds: jax.Array, ctx: LayerContext, caches: tuple | None = None
                 ) -> tuple[jax.Array, jax.Array | None, tuple | None]:
        """hidden, next_embeds [B, L, H] -> (normed hidden [B, L, H] for the LM head, router logits
        [n_moe, B*L, E] or None, updated per-layer KV caches or None)."""
        x = self.fc(jnp.concatenate([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], -1))
        x, router_logits, caches = self.block(x, ctx, caches)
        return self.norm(x), router_logits, caches
