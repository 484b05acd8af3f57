"""Tests for qwax.pallas_kernels.moe: grouped matmuls, routed experts, all implementations.

Pallas kernels run in interpret mode on the CPU (TPU kernels with ``pltpu.InterpretParams()`` when this
jax has it, GPU kernels with ``interpret=True``); interpret mode is slow, so shapes and tiles are tiny.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from qwax.pallas_kernels import moe
from qwax.pallas_kernels.moe import reference, xla

TPU_INTERPRET = pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True
ATOL, RTOL = 1e-5, 1e-4

# (impl, backend, interpret, tiling) for every non-reference kernel family.
KERNELS = {
    "xla": dict(impl="xla"),
    "pallas_tpu": dict(impl="pallas", backend="tpu", interpret=TPU_INTERPRET, tiling=(8, 128, 128)),
    "pallas_gpu": dict(impl="pallas", backend="gpu", interpret=True, tiling=(16, 16, 16)),
}


def _close(actual, expected, err_msg=""):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=ATOL, rtol=RTOL, err_msg=err_msg)


# ------------------------------------------------------------------------------------------------
# Independent numpy oracles.
# ------------------------------------------------------------------------------------------------


def np_gmm(lhs, rhs, group_sizes):
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for g, size in enumerate(np.asarray(group_sizes)):
        out[start : start + size] = lhs[start : start + size] @ rhs[g]
        start += size
    return out


def np_tgmm(lhs, grad, group_sizes):
    lhs, grad = np.asarray(lhs, np.float64), np.asarray(grad, np.float64)
    out = np.zeros((len(group_sizes), lhs.shape[1], grad.shape[1]))
    start = 0
    for g, size in enumerate(np.asarray(group_sizes)):
        out[g] = lhs[start : start + size].T @ grad[start : start + size]
        start += size
    return out


def np_routed_experts(x, expert_idx, expert_weights, w_gate_up, w_down):
    """Token by token, choice by choice: the definition in the docstring, in float64."""
    x, wgu, wd = (np.asarray(a, np.float64) for a in (x, w_gate_up, w_down))
    i = wd.shape[1]
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(expert_idx.shape[1]):
            e = int(expert_idx[t, j])
            gate, up = x[t] @ wgu[e, :, :i], x[t] @ wgu[e, :, i:]
            act = gate / (1.0 + np.exp(-gate)) * up
            y[t] += float(expert_weights[t, j]) * (act @ wd[e])
    return y


# ------------------------------------------------------------------------------------------------
# Fixtures.
# ------------------------------------------------------------------------------------------------

# Ragged groups: empty groups in the middle and a zero-size last group; sum = 18 < M = 21.
GROUP_SIZES = np.array([5, 0, 7, 3, 3, 0], np.int32)
M, K, N = 21, 16, 24


@pytest.fixture(scope="module")
def gmm_operands():
    rng = np.random.default_rng(0)
    lhs = rng.standard_normal((M, K)).astype(np.float32)
    rhs = rng.standard_normal((len(GROUP_SIZES), K, N)).astype(np.float32)
    grad = rng.standard_normal((M, N)).astype(np.float32)
    # Rows past sum(group_sizes) are "ignored": make them large so any leak shows.
    lhs[GROUP_SIZES.sum() :] = 1e3
    grad[GROUP_SIZES.sum() :] = 1e3
    return jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(grad), jnp.asarray(GROUP_SIZES)


def make_routing_case(seed=0, t=8, h=16, i=8, e=6, k=2, empty=(2, 5), dtype=jnp.float32):
    """Random top-k routing where the experts in ``empty`` receive no tokens."""
    rng = np.random.default_rng(seed)
    allowed = np.array([x for x in range(e) if x not in empty])
    idx = np.stack([rng.choice(allowed, size=k, replace=False) for _ in range(t)]).astype(np.int32)
    w = rng.random((t, k)).astype(np.float32) + 0.1
    w /= w.sum(-1, keepdims=True)
    x = rng.standard_normal((t, h)).astype(np.float32)
    wgu = (rng.standard_normal((e, h, 2 * i)) / np.sqrt(h)).astype(np.float32)
    wd = (rng.standard_normal((e, i, h)) / np.sqrt(i)).astype(np.float32)
    dy = rng.standard_normal((t, h)).astype(np.float32)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return cast(x), jnp.asarray(idx), cast(w), cast(wgu), cast(wd), cast(dy)


# ------------------------------------------------------------------------------------------------
# grouped_matmul / tgmm.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_grouped_matmul_matches_numpy(kernel, gmm_operands):
    lhs, rhs, _, gs = gmm_operands
    out = moe.grouped_matmul(lhs, rhs, gs, **KERNELS[kernel])
    assert out.shape == (M, N) and out.dtype == lhs.dtype
    _close(out, np_gmm(lhs, rhs, gs))


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_tgmm_matches_numpy(kernel, gmm_operands):
    lhs, _, grad, gs = gmm_operands
    out = moe.tgmm(lhs, grad, gs, **KERNELS[kernel])
    assert out.shape == (len(GROUP_SIZES), K, N)
    _close(out, np_tgmm(lhs, grad, gs))


def test_reference_grouped_ops_match_numpy(gmm_operands):
    lhs, rhs, grad, gs = gmm_operands
    _close(moe.grouped_matmul(lhs, rhs, gs, impl="reference"), np_gmm(lhs, rhs, gs))
    _close(moe.tgmm(lhs, grad, gs, impl="reference"), np_tgmm(lhs, grad, gs))


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_grouped_matmul_grads(kernel, gmm_operands):
    """The custom VJP (gmm with transposed rhs + tgmm) equals autodiff of the dense reference."""
    lhs, rhs, grad, gs = gmm_operands
    lhs = lhs.at[int(GROUP_SIZES.sum()) :].set(0.0)  # reference gives finite grads only for finite rows
    loss = lambda f: lambda a, b: jnp.sum(f(a, b, gs) * grad)  # noqa: E731
    got = jax.jit(jax.grad(loss(functools.partial(moe.grouped_matmul, **KERNELS[kernel])), argnums=(0, 1)))(lhs, rhs)
    want = jax.jit(jax.grad(loss(reference.grouped_matmul), argnums=(0, 1)))(lhs, rhs)
    for g, w, name in zip(got, want, ("lhs", "rhs")):
        _close(g, w, err_msg=name)


def test_tgmm_grads_xla(gmm_operands):
    """Second-order path: d tgmm runs gmm / transposed gmm."""
    lhs, _, grad, gs = gmm_operands
    n_valid = int(GROUP_SIZES.sum())
    lhs, grad = lhs.at[n_valid:].set(0.0), grad.at[n_valid:].set(0.0)
    cot = jax.random.normal(jax.random.PRNGKey(3), (len(GROUP_SIZES), K, N))
    loss = lambda f: lambda a, b: jnp.sum(f(a, b, gs) * cot)  # noqa: E731
    got = jax.jit(jax.grad(loss(functools.partial(moe.tgmm, impl="xla")), argnums=(0, 1)))(lhs, grad)
    want = jax.jit(jax.grad(loss(reference.tgmm), argnums=(0, 1)))(lhs, grad)
    for g, w in zip(got, want):
        _close(g, w)


@pytest.mark.parametrize("row_tiles", [(8, 4), (3,), (64,)])
def test_xla_cpu_grouped_ladders(row_tiles, gmm_operands):
    """Tile ladders that do / do not divide the groups, and tiles larger than every group."""
    lhs, rhs, grad, gs = gmm_operands
    _close(xla.gmm_cpu(lhs, rhs, gs, row_tiles), np_gmm(lhs, rhs, gs))
    _close(xla.tgmm_cpu(lhs, grad, gs, row_tiles), np_tgmm(lhs, grad, gs))


def test_ragged_dot_fallback_matches_numpy(gmm_operands):
    """The TPU/GPU "xla" path (ragged_dot) also runs, slowly, on the CPU: check its semantics here."""
    lhs, rhs, grad, gs = gmm_operands
    _close(xla.gmm_ragged(lhs, rhs, gs), np_gmm(lhs, rhs, gs))
    n_valid = int(GROUP_SIZES.sum())
    _close(xla.tgmm_ragged(lhs[:n_valid], grad[:n_valid], gs), np_tgmm(lhs, grad, gs))


# ------------------------------------------------------------------------------------------------
# routed_experts.
# ------------------------------------------------------------------------------------------------


def test_reference_matches_numpy_oracle():
    x, idx, w, wgu, wd, _ = make_routing_case(seed=1, t=5, h=8, i=4, e=4, k=2, empty=(1,))
    _close(moe.routed_experts(x, idx, w, wgu, wd, impl="reference"), np_routed_experts(x, idx, w, wgu, wd))


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(fn, x, idx, w, wgu, wd, dy):
    """y and the cotangents (d x, d expert_weights, d w_gate_up, d w_down) for output cotangent dy."""
    y, vjp = jax.vjp(lambda x, w, wgu, wd: fn(x, idx, w, wgu, wd), x, w, wgu, wd)
    return y, vjp(dy)


@pytest.mark.parametrize("kernel", ["reference", *KERNELS])
def test_routed_experts_matches_reference(kernel):
    x, idx, w, wgu, wd, dy = make_routing_case(seed=2)
    kw = KERNELS.get(kernel, dict(impl="reference"))
    fn = functools.partial(moe.routed_experts, **kw)
    y, grads = _value_and_grads(fn, x, idx, w, wgu, wd, dy)
    y_ref, grads_ref = _value_and_grads(reference.routed_experts, x, idx, w, wgu, wd, dy)
    assert y.shape == x.shape and y.dtype == x.dtype
    _close(y, y_ref, err_msg="y")
    _close(y, np_routed_experts(x, idx, w, wgu, wd), err_msg="y vs numpy")
    for g, g_ref, name in zip(grads, grads_ref, ("x", "expert_weights", "w_gate_up", "w_down")):
        assert g.shape == g_ref.shape, name
        _close(g, g_ref, err_msg=f"d{name}")
    # Experts without tokens get exactly zero weight gradient.
    for e in (2, 5):
        assert not np.any(np.asarray(grads[2][e])) and not np.any(np.asarray(grads[3][e]))


@pytest.mark.parametrize("row_tiles", [(4, 2, 1), (3,), (64,)])
def test_xla_cpu_routed_ladders(row_tiles):
    """The fused CPU loop for several tile ladders (overrunning last tiles, exact fits, one huge tile)."""
    x, idx, w, wgu, wd, dy = make_routing_case(seed=3, t=16, k=3, e=5, empty=(0, 3))
    fn = functools.partial(xla.routed_experts_cpu, row_tiles=row_tiles)
    y, grads = _value_and_grads(fn, x, idx, w, wgu, wd, dy)
    y_ref, grads_ref = _value_and_grads(reference.routed_experts, x, idx, w, wgu, wd, dy)
    _close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        _close(g, g_ref)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_routed_experts_drops_out_of_range_ids(impl):
    """Ids outside [0, E) contribute nothing and get zero weight gradient."""
    x, idx, w, wgu, wd, dy = make_routing_case(seed=4)
    e = wgu.shape[0]
    idx_dropped = idx.at[1, 0].set(e).at[4, 1].set(-1)
    w_kept = w.at[1, 0].set(0.0).at[4, 1].set(0.0)
    fn = functools.partial(moe.routed_experts, impl=impl)
    y, grads = _value_and_grads(fn, x, idx_dropped, w, wgu, wd, dy)
    y_ref = reference.routed_experts(x, idx, w_kept, wgu, wd)
    _close(y, y_ref)
    assert float(grads[1][1, 0]) == 0.0 and float(grads[1][4, 1]) == 0.0


def test_routed_experts_bf16_keeps_dtype():
    x, idx, w, wgu, wd, _ = make_routing_case(seed=5, dtype=jnp.bfloat16)
    y = moe.routed_experts(x, idx, w, wgu, wd, impl="xla")
    y_ref = reference.routed_experts(*(a.astype(jnp.float32) for a in (x,)), idx, w, wgu, wd)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), atol=5e-2, rtol=5e-2)


# ------------------------------------------------------------------------------------------------
# Argument errors.
# ------------------------------------------------------------------------------------------------


def test_bad_impl_names_allowed_values(gmm_operands):
    x, idx, w, wgu, wd, _ = make_routing_case()
    lhs, rhs, grad, gs = gmm_operands
    for call in (
        lambda: moe.routed_experts(x, idx, w, wgu, wd, impl="cuda"),
        lambda: moe.grouped_matmul(lhs, rhs, gs, impl="cuda"),
        lambda: moe.tgmm(lhs, grad, gs, impl="cuda"),
    ):
        with pytest.raises(ValueError, match=r"impl.*'auto'.*'pallas'.*'xla'.*'reference'"):
            call()
    with pytest.raises(ValueError, match="backend"):
        moe.grouped_matmul(lhs, rhs, gs, impl="pallas", backend="cpu", interpret=True)
    if jax.default_backend() == "cpu":  # Pallas cannot compile for the CPU: ask for interpret mode
        with pytest.raises(ValueError, match="interpret"):
            moe.routed_experts(x, idx, w, wgu, wd, impl="pallas")


def test_bad_shapes_name_the_argument(gmm_operands):
    x, idx, w, wgu, wd, _ = make_routing_case()
    lhs, rhs, grad, gs = gmm_operands
    cases = {
        "x": lambda: moe.routed_experts(x[None], idx, w, wgu, wd),
        "expert_idx": lambda: moe.routed_experts(x, idx[:-1], w, wgu, wd),
        "expert_weights": lambda: moe.routed_experts(x, idx, w[:, :1], wgu, wd),
        "w_gate_up": lambda: moe.routed_experts(x, idx, w, wgu[:, :-1], wd),
        "w_down": lambda: moe.routed_experts(x, idx, w, wgu, wd[:, :-1]),
        "lhs": lambda: moe.grouped_matmul(lhs[None], rhs, gs),
        "rhs": lambda: moe.grouped_matmul(lhs, rhs[:, :-1], gs),
        "group_sizes": lambda: moe.grouped_matmul(lhs, rhs, gs[:-1]),
        "grad": lambda: moe.tgmm(lhs, grad[:-1], gs),
    }
    for name, call in cases.items():
        with pytest.raises(ValueError, match=name):
            call()
    with pytest.raises(ValueError, match="expert_idx"):
        moe.routed_experts(x, idx.astype(jnp.float32), w, wgu, wd)
    with pytest.raises(ValueError, match="group_sizes"):
        moe.tgmm(lhs, grad, gs.astype(jnp.float32))
