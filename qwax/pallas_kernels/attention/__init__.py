"""Softmax attention with grouped-query heads: the training op, the KV cache layout and the cached read.

Public API:
  attention(q, k, v, mask)            causal self-attention over one sequence (training, prefill without cache).
  kv_cache_shapes, K_DIMS, V_DIMS     the cache layout (cache.py): keys [*lead, B, Nkv, D, T], values
                                      [*lead, B, Nkv, T, D].
  write_kv(k_cache, v_cache, k, v, index, group)   store new keys and values at slots [index, index + L).
  attend_cache(q, k_cache, v_cache, kv_valid, index, group)   the new queries over the filled slots.
  kv_block_size                       slots per step of the blocked cache read.

Implementations (`dispatch.resolve_impl("attention", ...)`):
  "reference": masked softmax over all keys in float32 (reference.py), the oracle.
  "xla":       blocked forms (xla.py): causal query blocks for training; an online softmax over the filled
               blocks of a cache, or one pass over a small, at least half full cache.
  "auto":      "xla" on every platform.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwax.pallas_kernels.attention import cache as _cache
from qwax.pallas_kernels.attention.cache import K_DIMS, V_DIMS, kv_cache_shapes
from qwax.pallas_kernels.attention.reference import attend_cache_reference, attention_reference
from qwax.pallas_kernels.attention.xla import attend_cache_xla, attention_xla, kv_block_size
from qwax.pallas_kernels.dispatch import op_impls, resolve_impl

__all__ = ["IMPLS", "K_DIMS", "V_DIMS", "attend_cache", "attention", "kv_block_size", "kv_cache_shapes",
           "write_kv"]

IMPLS = op_impls("attention")


def _check_heads(q: jax.Array, kv_heads: int, head_dim: int, what: str) -> None:
    if q.ndim != 4 or q.shape[-1] != head_dim or q.shape[2] % kv_heads:
        raise ValueError(f"q must have shape [B, L, Nq, D] with D = {head_dim} and Nq a multiple of Nkv = "
                         f"{kv_heads} (from {what}), found q.shape={tuple(q.shape)}")


def _check_mask(name: str, mask: jax.Array, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(mask.shape) != expected or mask.dtype != jnp.bool_:
        raise ValueError(f"{name} must be a bool array of shape {meaning} = {expected}, found shape "
                         f"{tuple(mask.shape)} dtype {mask.dtype}")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, impl: str = "auto") -> jax.Array:
    """softmax(q k^T / sqrt(D), where mask) v per query head, query head h reading KV head h // (Nq / Nkv).

    q [B, L, Nq, D]; k, v [B, L, Nkv, D]; mask [B, L, L] bool, which must be causal in sequence index
    (mask[b, i, j] only for j <= i; padding and document boundaries may clear more). impl: one of IMPLS.
    Returns [B, L, Nq, D] in v.dtype. Rows with no visible key (padding queries) give finite values that mean
    nothing ("reference": zeros).
    """
    if k.ndim != 4:
        raise ValueError(f"k must have shape [B, L, Nkv, D], found k.shape={tuple(k.shape)}")
    b, l, nkv, d = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k [B, L, Nkv, D] = {tuple(k.shape)}, found {tuple(v.shape)}")
    _check_heads(q, nkv, d, "k")
    if q.shape[:2] != (b, l):
        raise ValueError(f"q must have shape [B, L, Nq, D] with B, L = {(b, l)} from k, found {tuple(q.shape)}")
    _check_mask("mask", mask, (b, l, l), "[B, L, L]")
    if resolve_impl("attention", impl) == "reference":
        return attention_reference(q, k, v, mask)
    return attention_xla(q, k, v, mask)


def _check_cache(k_cache: jax.Array, v_cache: jax.Array, group: jax.Array | None) -> tuple[int, ...]:
    """Checks the (k, v) cache layout and `group` against its lead dims; returns (B, Nkv, D, T)."""
    lead = k_cache.ndim - len(K_DIMS)
    if lead not in (0, 1) or v_cache.ndim != k_cache.ndim:
        raise ValueError(f"k_cache, v_cache must have shapes [*lead, B, Nkv, D, T], [*lead, B, Nkv, T, D] with at "
                         f"most one lead dim, found {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    b, nkv, d, t = k_cache.shape[lead:]
    want = kv_cache_shapes(b, nkv, d, t, tuple(k_cache.shape[:lead]))[1]
    if tuple(v_cache.shape) != want:
        raise ValueError(f"v_cache must have shape [*lead, B, Nkv, T, D] = {want} to match k_cache "
                         f"{tuple(k_cache.shape)}, found {tuple(v_cache.shape)}")
    if (group is None) != (lead == 0):
        raise ValueError(f"group must be given exactly when the cache is stacked (k_cache.shape="
                         f"{tuple(k_cache.shape)} has {lead} lead dim(s)), found group={group!r}")
    return b, nkv, d, t


def write_kv(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array,
             group: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The caches with k, v [B, L, Nkv, D] written at slots [index, index + L) (of entry `group` when the
    caches are stacked over layer groups). index, group: int scalars, may be traced."""
    b, nkv, d, _ = _check_cache(k_cache, v_cache, group)
    for name, new in (("k", k), ("v", v)):
        if new.ndim != 4 or (new.shape[0], *new.shape[2:]) != (b, nkv, d):
            raise ValueError(f"{name} must have shape [B, L, Nkv, D] with B, Nkv, D = {(b, nkv, d)} from the "
                             f"cache, found {name}.shape={tuple(new.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, found {tuple(v.shape)}")
    return _cache.write_kv(k_cache, v_cache, k, v, index, group)


def attend_cache(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, kv_valid: jax.Array, index: jax.Array,
                 group: jax.Array | None = None, *, block: int | None = None, impl: str = "auto") -> jax.Array:
    """Causal attention of L new queries over a cache that already holds their keys and values.

    q [B, L, Nq, D] for the tokens at slots [index, index + L); k_cache, v_cache as from `kv_cache_shapes`
    (entry `group` of stacked caches); kv_valid [B, T] bool marks slots holding real tokens. block: "xla"
    only, forces the blocked read with that many slots per step (tests). impl: one of IMPLS.
    Returns [B, L, Nq, D] in q.dtype; queries with no visible key give zeros.
    """
    b, nkv, d, t = _check_cache(k_cache, v_cache, group)
    _check_heads(q, nkv, d, "the cache")
    if q.shape[0] != b:
        raise ValueError(f"q must have shape [B, L, Nq, D] with B = {b} from the cache, found {tuple(q.shape)}")
    _check_mask("kv_valid", kv_valid, (b, t), "[B, T]")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block must be a positive int or None, found block={block!r}")
    if resolve_impl("attention", impl) == "reference":
        return attend_cache_reference(q, k_cache, v_cache, kv_valid, index, group)
    return attend_cache_xla(q, k_cache, v_cache, kv_valid, index, group, block)
