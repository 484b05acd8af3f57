"""The hybrid decoding cache: a KV cache per attention layer, conv + recurrent state per Gated DeltaNet layer.

Attention layers (one in four) keep keys and values preallocated to `max_len` slots; GDN layers keep a
constant-size state ([B, K, conv_dim] raw conv inputs and a float32 [B, Hv, dk, dv] recurrent state), so
the cache of a long context is dominated by the few attention layers. The cache is a pytree that mirrors the
decoder stack: for the scanned layout each layer of the repeating group holds its caches stacked over groups.

All rows share one slot counter (`index`); left-padded prompts mark their padding slots invalid in `valid`, and
`position` counts each row's real tokens, which gives the rotary position of its next token.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qwax.config import QwaxConfig
from qwax.layers.attention import KVCache
from qwax.layers.gated_deltanet import GDNState


CACHE_BUCKET = 256  # cache lengths are rounded up to a multiple of this, so similar requests share compilations


class Cache(NamedTuple):
    """layers: the decoder stack's per-layer caches; valid [B, T] bool: slots holding real tokens;
    index: int32 scalar, the next free slot; position [B] int32: rotary position of each row's next token."""

    layers: Any
    valid: jax.Array
    index: jax.Array
    position: jax.Array

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


def _layer_cache(cfg: QwaxConfig, mixer: str, batch: int, max_len: int, lead: tuple[int, ...]) -> Any:
    dtype = jnp.dtype(cfg.dtype)
    if mixer == "full_attention":
        return KVCache.empty(batch, max_len, cfg.num_key_value_heads, cfg.head_dim, dtype, lead)
    return GDNState(
        conv=jnp.zeros((*lead, batch, cfg.linear_conv_kernel_dim, cfg.linear_conv_dim), dtype),
        recurrent=jnp.zeros((*lead, batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                             cfg.linear_value_head_dim), jnp.float32))


def init_cache(cfg: QwaxConfig, batch: int, max_len: int) -> Cache:
    """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generated)."""
    if cfg.uses_scan:
        period = cfg.scan_period
        groups = cfg.num_hidden_layers // period
        layers = tuple(_layer_cache(cfg, mixer, batch, max_len, (groups,)) for mixer, _ in cfg.layer_kinds[:period])
    else:
        layers = tuple(_layer_cache(cfg, mixer, batch, max_len, ()) for mixer, _ in cfg.layer_kinds)
    return Cache(layers=layers, valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
                 position=jnp.zeros((batch,), jnp.int32))


def cache_logical_axes(cache: Cache) -> Cache:
    """The cache's pytree with a tuple of logical axis names at every leaf (for qwax.sharding rules)."""
    def layer_axes(c: Any) -> Any:
        if isinstance(c, KVCache):
            lead = ("layers",) * (c.k.ndim - 4)
            return KVCache(k=(*lead, "cache_batch", "cache_kv_heads", None, "cache_len"),
                           v=(*lead, "cache_batch", "cache_kv_heads", "cache_len", None))
        lead = ("layers",) * (c.conv.ndim - 3)
        return GDNState(conv=(*lead, "cache_batch", None, "cache_heads"),
                        recurrent=(*lead, "cache_batch", "cache_heads", None, None))

    return Cache(layers=tuple(layer_axes(c) for c in cache.layers), valid=("cache_batch", "cache_len"),
                 index=(), position=("cache_batch",))


def cache_bytes(cache: Cache) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
