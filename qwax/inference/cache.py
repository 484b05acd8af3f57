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
from qwax.options import RunOptions


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

    def rollback(self, processed: int, keep: int) -> "Cache":
        """Keep the first `keep` of the last `processed` tokens (a keep_step_states forward): every layer's
        cache rolls back, and the slots of the dropped tokens become invalid and free."""
        start = self.index - processed + keep
        valid = self.valid
        if processed > keep:
            valid = jax.lax.dynamic_update_slice(valid, jnp.zeros((valid.shape[0], processed - keep), bool),
                                                 (0, start))
        return Cache(layers=tuple(c.rollback(processed, keep) for c in self.layers), valid=valid, index=start,
                     position=self.position - (processed - keep))


# The cache type each token mixer keeps (see the mixers' modules for their layouts).
MIXER_CACHES = {"full_attention": KVCache, "linear_attention": GDNState}


def empty_cache(cfg: QwaxConfig, opts: RunOptions, batch: int, max_len: int,
                mixers: tuple[str, ...], lead: tuple[int, ...] = ()) -> Cache:
    """An empty cache for layers with these token mixers, `batch` rows of up to `max_len` tokens."""
    layers = tuple(MIXER_CACHES[m].empty(cfg, opts, batch, max_len, lead) for m in mixers)
    return Cache(layers=layers, valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
                 position=jnp.zeros((batch,), jnp.int32))


def init_cache(cfg: QwaxConfig, opts: RunOptions, batch: int, max_len: int) -> Cache:
    """An empty cache of the decoder stack for `batch` rows of up to `max_len` tokens (prompt + generated),
    mirroring its layout: one entry per layer of the repeating group, stacked over groups, when it scans."""
    mixers = tuple(mixer for mixer, _ in cfg.layer_kinds)
    if opts.uses_scan(cfg):
        period = cfg.scan_period
        return empty_cache(cfg, opts, batch, max_len, mixers[:period], (cfg.num_hidden_layers // period,))
    return empty_cache(cfg, opts, batch, max_len, mixers)


def init_mtp_cache(cfg: QwaxConfig, opts: RunOptions, batch: int, max_len: int) -> Cache:
    """An empty cache for the MTP head's (full-attention) layers."""
    return empty_cache(cfg, opts, batch, max_len, ("full_attention",) * cfg.mtp_num_hidden_layers)


def cache_logical_axes(cache: Cache) -> Cache:
    """The cache's pytree with a tuple of logical axis names at every leaf (for qwax.sharding rules)."""
    return Cache(layers=tuple(c.logical_axes() for c in cache.layers), valid=("cache_batch", "cache_len"),
                 index=(), position=("cache_batch",))


def cache_bytes(cache: Cache) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
