"""Attention over a KV cache (the attention op's attend_cache, and the layer's KVCache) against softmax attention
in numpy.

The model-level tests use caches of one block; these cover many blocks, a last block that overlaps the one
before it (capacity not a multiple of the block), padding slots, rows with no visible key, stacked caches, and
the one-pass (dense) read of a cache at least half full next to the blocked read of one that is not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwax
from qwax.layers.attention import KVCache, attend_cache, write_kv
from qwax.pallas_kernels.attention import xla
from qwax.pallas_kernels.attention.xla import KV_BLOCK, KV_BLOCK_SCORES, kv_block_size

B, NQ, NKV, D, T = 2, 4, 2, 8, 200


def numpy_attention(q, k, v, valid, index):
    """q [B, L, Nq, D] at slots index..index+L-1; k, v [B, T, Nkv, D]; valid [B, T] -> [B, L, Nq*D] in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, l, nq, d = q.shape
    out = np.zeros((b, l, nq, d))
    for bi in range(b):
        for t in range(l):
            visible = valid[bi, : index + t + 1].copy()
            if not visible.any():
                continue  # a padding query with nothing to see: zeros
            for h in range(nq):
                kv = h // (nq // k.shape[2])
                s = k[bi, : index + t + 1, kv] @ q[bi, t, h] / np.sqrt(d)
                s = np.where(visible, s, -np.inf)
                p = np.exp(s - s.max())
                out[bi, t, h] = (p / p.sum()) @ v[bi, : index + t + 1, kv]
    return out.reshape(b, l, nq * d)


def empty_cache(lead=()):
    cfg = qwax.get_preset("tiny-next", num_key_value_heads=NKV, head_dim=D)
    return KVCache.empty(cfg, qwax.RunOptions(dtype="float32"), B, T, lead)


def case(seed, l, index):
    rng = np.random.default_rng(seed)
    k, v = rng.standard_normal((2, B, T, NKV, D)).astype(np.float32)
    q = rng.standard_normal((B, l, NQ, D)).astype(np.float32)
    valid = rng.random((B, T)) > 0.2
    valid[1, : index + l] = False  # row 1 sees nothing before its last query...
    valid[1, index + l - 1] = True  # ...except its own last token
    return q, k, v, valid


@pytest.mark.parametrize("l, index, block", [(1, 150, 64), (1, 199, 48), (37, 120, 32), (5, 0, 256)])
def test_blocked_cache_attention_matches_softmax(l, index, block):
    q, k, v, valid = case(l + index, l, index)
    cache = write_kv(empty_cache(), jnp.asarray(k), jnp.asarray(v), 0, None)
    got = jax.jit(attend_cache, static_argnames="block")(jnp.asarray(q), cache, jnp.asarray(valid),
                                                         jnp.int32(index), block=block)
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, valid, index), atol=1e-5)


@pytest.mark.parametrize("l, index", [(1, 150), (1, 199), (3, 97), (1, 20), (4, 0)])
def test_default_read_matches_softmax(l, index, monkeypatch):
    """block=None: one pass over the cache when it is at least half full (index + L >= T / 2), else blocks."""
    calls = []
    step = xla._online_softmax_step
    monkeypatch.setattr(xla, "_online_softmax_step", lambda *a: calls.append(a[1].shape[-1]) or step(*a))
    monkeypatch.setattr(xla, "KV_BLOCK", 64)  # several blocks when the blocked form runs
    q, k, v, valid = case(l + index, l, index)
    cache = write_kv(empty_cache(), jnp.asarray(k), jnp.asarray(v), 0, None)
    got = jax.jit(lambda *a: attend_cache(*a))(jnp.asarray(q), cache, jnp.asarray(valid), jnp.int32(index))
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, valid, index), atol=1e-5)
    assert sorted(calls) == [64, T]  # both forms are traced: lax.cond picks one at run time


def test_stacked_cache_reads_its_own_group():
    q, k, v, valid = case(3, 4, 90)
    stacked = empty_cache(lead=(3,))
    for g in range(3):  # group g holds (k, v) scaled by g + 1
        stacked = write_kv(stacked, jnp.asarray(k) * (g + 1), jnp.asarray(v) * (g + 1), 0, jnp.int32(g))
    fn = jax.jit(attend_cache, static_argnames="block")
    for g in range(3):
        got = fn(jnp.asarray(q), stacked, jnp.asarray(valid), jnp.int32(90), jnp.int32(g), block=64)
        want = numpy_attention(q, k * (g + 1), v * (g + 1), valid, 90)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, err_msg=f"group {g}")


def test_block_size_bounds_the_scores_of_long_chunks():
    assert kv_block_size(1, 2, 1 << 20) == KV_BLOCK  # decoding: the largest block
    assert kv_block_size(1, 2, 300) == 300  # never more than the cache
    assert kv_block_size(1 << 16, 8, 1 << 20) == 256  # the smallest block for huge chunks
    for queries, groups in ((64, 4), (256, 2), (1024, 2)):
        block = kv_block_size(queries, groups, 1 << 20)
        assert block * queries * groups <= KV_BLOCK_SCORES < 2 * block * queries * groups, (queries, groups)


def test_kv_cache_holds_the_op_layout_and_names_its_axes():
    cache = empty_cache()
    assert cache.k.shape == (B, NKV, D, T) and cache.v.shape == (B, NKV, T, D)
    assert cache.logical_axes() == KVCache(k=("cache_batch", "cache_kv_heads", None, "cache_len"),
                                           v=("cache_batch", "cache_kv_heads", "cache_len", None))
    stacked = empty_cache(lead=(3,))
    assert stacked.k.shape == (3, B, NKV, D, T)
    assert stacked.logical_axes().v == ("layers", "cache_batch", "cache_kv_heads", "cache_len", None)
    assert stacked.rollback(4, 2) is stacked
