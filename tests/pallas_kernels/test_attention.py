"""The attention op: training attention and the cached read, every impl against softmax attention in numpy
(values and gradients, padding and packed-document masks, grouped-query heads, several query blocks), the KV
cache layout, and argument checks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwax.pallas_kernels import attend_cache, attention, kv_cache_shapes, write_kv
from qwax.pallas_kernels.attention import IMPLS, K_DIMS, V_DIMS, xla

IMPL_NAMES = [i for i in IMPLS if i != "auto"]


def numpy_attention(q, k, v, mask):
    """q [B, Lq, Nq, D], k, v [B, Lk, Nkv, D], mask [B, Lq, Lk] -> [B, Lq, Nq, D] float64; rows that see no key
    give zeros."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, lq, nq, d = q.shape
    group = nq // k.shape[2]
    out = np.zeros((b, lq, nq, d))
    for bi in range(b):
        for t in range(lq):
            if not mask[bi, t].any():
                continue
            for h in range(nq):
                s = np.where(mask[bi, t], k[bi, :, h // group] @ q[bi, t, h] / np.sqrt(d), -np.inf)
                p = np.exp(s - s.max())
                out[bi, t, h] = (p / p.sum()) @ v[bi, :, h // group]
    return out


def training_case(seed: int, l: int, nq: int, nkv: int, d: int = 8):
    """q, k, v and a causal mask with left padding on row 1 and two packed documents on row 0."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, l, nq, d)).astype(np.float32)
    k, v = rng.standard_normal((2, 2, l, nkv, d)).astype(np.float32)
    pos = np.arange(l)
    valid = np.ones((2, l), bool)
    valid[1, : l // 3] = False
    segment = np.where(pos < l // 2, 0, 1)[None].repeat(2, 0)
    segment[1] = 0
    mask = (pos[None, None, :] <= pos[None, :, None]) & valid[:, None, :] & (segment[:, :, None] == segment[:, None, :])
    return q, k, v, mask


# (L, Nq, Nkv): one block; several blocks with a partial last one (ATTN_Q_BLOCK = 128); one KV head.
SHAPES = [(9, 4, 2), (2 * xla.ATTN_Q_BLOCK + 40, 4, 2), (20, 3, 1)]


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("l, nq, nkv", SHAPES)
def test_attention_values_and_gradients_match_numpy(impl, l, nq, nkv):
    q, k, v, mask = training_case(l, l, nq, nkv)
    fn = jax.jit(functools.partial(attention, impl=impl))
    seen = mask.any(-1)  # rows with no visible key (padding queries) mean nothing
    np.testing.assert_allclose(np.asarray(fn(q, k, v, mask))[seen], numpy_attention(q, k, v, mask)[seen],
                               atol=2e-5)

    cot = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32) * seen[..., None, None]
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a, mask) * cot), argnums=(0, 1, 2)))(q, k, v)
    for name, g, (idx, want) in zip("qkv", grads, _numpy_grads(q, k, v, mask, cot)):
        np.testing.assert_allclose(np.asarray(g)[idx], want, rtol=2e-3, atol=2e-4, err_msg=name)


def _numpy_grads(q, k, v, mask, cot, n: int = 6, eps: float = 1e-4):
    """Central differences of sum(numpy_attention * cot) at n random entries of each of q, k, v."""
    rng = np.random.default_rng(2)
    out = []
    for i, a in enumerate((q, k, v)):
        idx = tuple(rng.integers(0, s, n) for s in a.shape)
        vals = []
        for e in zip(*idx):
            args = [np.asarray(x, np.float64) for x in (q, k, v)]
            args[i][e] += eps
            plus = np.sum(numpy_attention(*args, mask) * cot)
            args[i][e] -= 2 * eps
            vals.append((plus - np.sum(numpy_attention(*args, mask) * cot)) / (2 * eps))
        out.append((idx, np.array(vals)))
    return out


def test_attention_impls_agree_in_forward_and_reverse_mode():
    q, k, v, mask = training_case(5, xla.ATTN_Q_BLOCK + 30, 4, 2)
    seen = mask.any(-1)[..., None, None]
    tangents = tuple(np.random.default_rng(3).standard_normal(a.shape).astype(np.float32) for a in (q, k, v))
    results = {}
    for impl in IMPL_NAMES:
        fn = lambda *a: attention(*a, mask, impl=impl) * seen
        primal, tangent = jax.jit(lambda *a: jax.jvp(fn, a[:3], a[3:]))(q, k, v, *tangents)
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2)))(q, k, v)
        results[impl] = (primal, tangent, *grads)
    for name, got, want in zip(("out", "jvp", "dq", "dk", "dv"), results["xla"], results["reference"]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=2e-5, err_msg=name)


# Cached attention: B rows, T slots; queries at slots [index, index + L).
B, NQ, NKV, D, T = 2, 4, 2, 8, 200


def cache_case(seed: int, l: int, index: int):
    rng = np.random.default_rng(seed)
    k, v = rng.standard_normal((2, B, T, NKV, D)).astype(np.float32)
    q = rng.standard_normal((B, l, NQ, D)).astype(np.float32)
    valid = rng.random((B, T)) > 0.2
    valid[1, : index + l] = False  # row 1 sees nothing before its last query...
    valid[1, index + l - 1] = True  # ...except its own last token
    return q, k, v, valid


def filled_cache(k, v, lead=()):
    k_cache, v_cache = (jnp.zeros(s, jnp.float32) for s in kv_cache_shapes(B, NKV, D, T, lead))
    return write_kv(k_cache, v_cache, jnp.asarray(k), jnp.asarray(v), 0, None if not lead else jnp.int32(0))


def cached_mask(valid, l, index):
    slots, q_slot = np.arange(T), index + np.arange(l)
    return valid[:, None, :] & (slots[None, None, :] <= q_slot[None, :, None])


@pytest.mark.parametrize("impl, block", [("reference", None), ("xla", 48), ("xla", None)])
@pytest.mark.parametrize("l, index", [(1, 150), (37, 120), (5, 0)])
def test_cached_attention_matches_numpy(impl, block, l, index):
    q, k, v, valid = cache_case(l + index, l, index)
    k_cache, v_cache = filled_cache(k, v)
    fn = jax.jit(functools.partial(attend_cache, impl=impl, block=block))
    got = fn(jnp.asarray(q), k_cache, v_cache, jnp.asarray(valid), jnp.int32(index))
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, cached_mask(valid, l, index)), atol=1e-5)


def test_cached_attention_derivatives_agree_across_impls():
    """Forward mode (the blocked read is a while loop over the filled blocks: inference has no reverse mode)."""
    l, index = 6, 70
    q, k, v, valid = cache_case(7, l, index)
    primals = (jnp.asarray(q), *filled_cache(k, v))
    tangents = (jnp.asarray(cache_case(8, l, index)[0]), *filled_cache(*cache_case(9, l, index)[1:3]))
    results = {}
    for impl, block in (("reference", None), ("xla", 32)):
        fn = lambda *a: attend_cache(*a, jnp.asarray(valid), jnp.int32(index), impl=impl, block=block)
        results[impl] = jax.jit(lambda p, t: jax.jvp(fn, p, t))(primals, tangents)
    for name, got, want in zip(("out", "jvp"), results["xla"], results["reference"]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("impl, block", [("reference", None), ("xla", 64)])
def test_stacked_caches_read_and_write_their_own_entry(impl, block):
    q, k, v, valid = cache_case(3, 4, 90)
    k_cache, v_cache = (jnp.zeros(s, jnp.float32) for s in kv_cache_shapes(B, NKV, D, T, (3,)))
    for g in range(3):  # entry g holds (k, v) scaled by g + 1
        k_cache, v_cache = write_kv(k_cache, v_cache, jnp.asarray(k) * (g + 1), jnp.asarray(v) * (g + 1), 0,
                                    jnp.int32(g))
    fn = jax.jit(functools.partial(attend_cache, impl=impl, block=block))
    for g in range(3):
        got = fn(jnp.asarray(q), k_cache, v_cache, jnp.asarray(valid), jnp.int32(90), jnp.int32(g))
        want = numpy_attention(q, k * (g + 1), v * (g + 1), cached_mask(valid, 4, 90))
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, err_msg=f"group {g}")


def test_cache_layout_stores_keys_transposed():
    assert K_DIMS == ("batch", "kv_heads", "head_dim", "slots") and V_DIMS == ("batch", "kv_heads", "slots", "head_dim")
    assert kv_cache_shapes(2, 3, 4, 5, (6,)) == ((6, 2, 3, 4, 5), (6, 2, 3, 5, 4))
    rng = np.random.default_rng(0)
    k, v = rng.standard_normal((2, B, 3, NKV, D)).astype(np.float32)
    k_cache, v_cache = (jnp.zeros(s, jnp.float32) for s in kv_cache_shapes(B, NKV, D, T))
    k_cache, v_cache = write_kv(k_cache, v_cache, jnp.asarray(k), jnp.asarray(v), jnp.int32(10))
    np.testing.assert_array_equal(np.asarray(k_cache)[:, :, :, 10:13], k.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(v_cache)[:, :, 10:13], v.transpose(0, 2, 1, 3))
    assert not np.asarray(k_cache)[..., :10].any() and not np.asarray(v_cache)[:, :, 13:].any()


def test_bad_arguments_raise_naming_them():
    q, k, v, mask = training_case(0, 9, 4, 2)
    with pytest.raises(ValueError, match="v must have the shape of k"):
        attention(q, k, v[:, :, :1], mask)
    with pytest.raises(ValueError, match=r"q must have shape \[B, L, Nq, D\] with D = 8 and Nq a multiple of Nkv = 2"):
        attention(q[:, :, :3], k, v, mask)
    with pytest.raises(ValueError, match=r"mask must be a bool array of shape \[B, L, L\] = \(2, 9, 9\)"):
        attention(q, k, v, mask.astype(np.float32))
    with pytest.raises(ValueError, match="impl='pallas' for the attention op"):
        attention(q, k, v, mask, impl="pallas")

    q, k, v, valid = cache_case(0, 1, 5)
    k_cache, v_cache = filled_cache(k, v)
    with pytest.raises(ValueError, match="v_cache must have shape"):
        attend_cache(jnp.asarray(q), k_cache, v_cache[..., :-1], jnp.asarray(valid), 5)
    with pytest.raises(ValueError, match="group must be given exactly when the cache is stacked"):
        attend_cache(jnp.asarray(q), k_cache, v_cache, jnp.asarray(valid), 5, jnp.int32(0))
    with pytest.raises(ValueError, match=r"kv_valid must be a bool array of shape \[B, T\]"):
        attend_cache(jnp.asarray(q), k_cache, v_cache, jnp.asarray(valid[:, :-1]), 5)
    with pytest.raises(ValueError, match="block must be a positive int"):
        attend_cache(jnp.asarray(q), k_cache, v_cache, jnp.asarray(valid), 5, block=0)
    with pytest.raises(ValueError, match=r"k must have shape \[B, L, Nkv, D\] with B, Nkv, D = \(2, 2, 8\)"):
        write_kv(k_cache, v_cache, jnp.asarray(k)[..., :4], jnp.asarray(v), 0)
