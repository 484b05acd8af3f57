"""Tests for qwax.pallas_kernels.moe: grouped matmuls, routed experts, all implementations.

Pallas kernels run in interpret mode on the CPU: the TPU family (jax's megablox) under
``pltpu.InterpretParams()``, the GPU family (qwax's Hopper Mosaic GPU kernels) under
``plgpu.InterpretGPUParams()``. Both fill uninitialised memory with NaNs, so an output row a kernel forgets
to write shows. Interpret mode is slow: shapes and tiles are tiny and those tests are marked slow. The GPU
kernels take bfloat16 only (Hopper wgmma), so they are checked on bf16 inputs with bf16 tolerances.
Lowering for real TPU / CUDA is checked with ``jax.export`` (no hardware here).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

from qwax.pallas_kernels import moe
from qwax.pallas_kernels.moe import gpu, reference, tpu, xla
from qwax.pallas_kernels.dispatch import resolve_impl
from qwax.pallas_kernels.moe.common import pallas_takes
from qwax.pallas_kernels.moe.grouped_matmul import make_config

ATOL, RTOL = 1e-5, 1e-4
slow = pytest.mark.slow

# (impl, backend, interpret, tiling) for every non-reference kernel family.
KERNELS = {
    "xla": dict(impl="xla"),
    "pallas_tpu": dict(impl="pallas", backend="tpu", interpret=pltpu.InterpretParams(), tiling=(8, 128, 128)),
    "pallas_gpu": dict(impl="pallas", backend="gpu", interpret=plgpu.InterpretGPUParams(), tiling=(64, 64, 64)),
}
KERNEL_PARAMS = [pytest.param(k, marks=slow) if k.startswith("pallas") else k for k in KERNELS]
DTYPE = {"pallas_gpu": jnp.bfloat16}  # the operand dtype each family is tested in (default float32)


def _dtype(kernel):
    return DTYPE.get(kernel, jnp.float32)


def _close(actual, expected, err_msg="", dtype=jnp.float32):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if dtype == jnp.bfloat16:  # f32 accumulation, one bf16 rounding of the result
        scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
        np.testing.assert_allclose(actual, expected, atol=1e-2 * scale, rtol=1e-2, err_msg=err_msg)
    else:
        np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=RTOL, err_msg=err_msg)


# ------------------------------------------------------------------------------------------------
# Independent numpy oracles.
# ------------------------------------------------------------------------------------------------


def np_gmm(lhs, rhs, group_sizes, group_offset=0):
    """Group by group in float64: rows of group g use rhs[g - group_offset]; other rows are zero."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for g, size in enumerate(np.asarray(group_sizes)):
        if 0 <= g - group_offset < rhs.shape[0]:
            out[start : start + size] = lhs[start : start + size] @ rhs[g - group_offset]
        start += size
    return out


def np_tgmm(lhs, grad, group_sizes, group_offset=0, num_groups=None):
    lhs, grad = np.asarray(lhs, np.float64), np.asarray(grad, np.float64)
    sizes = np.asarray(group_sizes)
    num_groups = len(sizes) if num_groups is None else num_groups
    starts = np.concatenate([[0], np.cumsum(sizes)])
    out = np.zeros((num_groups, lhs.shape[1], grad.shape[1]))
    for i in range(num_groups):
        a, b = starts[group_offset + i], starts[group_offset + i + 1]
        out[i] = lhs[a:b].T @ grad[a:b]
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


def _operands(gmm_operands, kernel):
    """The fixture's operands in the kernel family's dtype (group sizes unchanged)."""
    lhs, rhs, grad, gs = gmm_operands
    dt = _dtype(kernel)
    return lhs.astype(dt), rhs.astype(dt), grad.astype(dt), gs


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


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_grouped_matmul_matches_numpy(kernel, gmm_operands):
    lhs, rhs, _, gs = _operands(gmm_operands, kernel)
    out = moe.grouped_matmul(lhs, rhs, gs, **KERNELS[kernel])
    assert out.shape == (M, N) and out.dtype == lhs.dtype
    _close(out, np_gmm(lhs, rhs, gs), dtype=lhs.dtype)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_tgmm_matches_numpy(kernel, gmm_operands):
    lhs, _, grad, gs = _operands(gmm_operands, kernel)
    out = moe.tgmm(lhs, grad, gs, **KERNELS[kernel])
    assert out.shape == (len(GROUP_SIZES), K, N) and out.dtype == lhs.dtype
    _close(out, np_tgmm(lhs, grad, gs), dtype=lhs.dtype)


@slow
@pytest.mark.parametrize("lib", [tpu, gpu], ids=["tpu", "gpu"])
def test_pallas_gmm_transpose_rhs(lib, gmm_operands):
    """rhs given as [G, N, K] (the d lhs = d out @ rhs^T form) is contracted on its last dim, no copy made."""
    kernel = "pallas_tpu" if lib is tpu else "pallas_gpu"
    lhs, rhs, _, gs = _operands(gmm_operands, kernel)
    kw = {k: KERNELS[kernel][k] for k in ("tiling", "interpret")}
    out = lib.gmm(lhs, jnp.swapaxes(rhs, 1, 2), gs, transpose_rhs=True, **kw)
    _close(out, np_gmm(lhs, rhs, gs), dtype=lhs.dtype)


def test_reference_grouped_ops_match_numpy(gmm_operands):
    lhs, rhs, grad, gs = gmm_operands
    _close(moe.grouped_matmul(lhs, rhs, gs, impl="reference"), np_gmm(lhs, rhs, gs))
    _close(moe.tgmm(lhs, grad, gs, impl="reference"), np_tgmm(lhs, grad, gs))
    _close(moe.grouped_matmul(lhs, rhs[2:5], gs, group_offset=2, impl="reference"), np_gmm(lhs, rhs[2:5], gs, 2))
    _close(moe.tgmm(lhs, grad, gs, group_offset=2, num_groups=3, impl="reference"), np_tgmm(lhs, grad, gs, 2, 3))


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_grouped_matmul_grads(kernel, gmm_operands):
    """The custom VJP (gmm with transposed rhs + tgmm) equals autodiff of the dense reference."""
    lhs, rhs, grad, gs = _operands(gmm_operands, kernel)
    lhs = lhs.at[int(GROUP_SIZES.sum()) :].set(0.0)  # reference gives finite grads only for finite rows
    loss = lambda f: lambda a, b: jnp.sum(f(a, b, gs).astype(jnp.float32) * grad)  # noqa: E731
    got = jax.jit(jax.grad(loss(functools.partial(moe.grouped_matmul, **KERNELS[kernel])), argnums=(0, 1)))(lhs, rhs)
    want = jax.jit(jax.grad(loss(reference.grouped_matmul), argnums=(0, 1)))(lhs, rhs)
    for g, w, name in zip(got, want, ("lhs", "rhs")):
        assert g.dtype == w.dtype == lhs.dtype, name
        _close(g, w, err_msg=name, dtype=lhs.dtype)


# (group_offset, G_local): interior groups including an empty one; only empty groups (all rows zero).
OFFSETS = [(2, 3), (5, 1)]


@pytest.mark.parametrize("offset, num_local", OFFSETS)
@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_group_offset_values_and_grads(kernel, offset, num_local, gmm_operands):
    """Only groups [offset, offset + G_local) are computed (rhs holds just those); other rows are zero.

    The offset is traced (an argument of the jitted function), as it is under shard_map.
    """
    lhs, rhs, grad, gs = _operands(gmm_operands, kernel)
    kw = KERNELS[kernel]
    rhs_local = rhs[offset : offset + num_local]
    out = jax.jit(lambda a, b, o: moe.grouped_matmul(a, b, gs, group_offset=o, **kw))(lhs, rhs_local, offset)
    assert out.shape == (M, N)
    _close(out, np_gmm(lhs, rhs_local, gs, offset), dtype=lhs.dtype)
    w = jax.jit(lambda a, b, o: moe.tgmm(a, b, gs, group_offset=o, num_groups=num_local, **kw))(lhs, grad, offset)
    assert w.shape == (num_local, K, N)
    _close(w, np_tgmm(lhs, grad, gs, offset, num_local), dtype=lhs.dtype)

    lhs = lhs.at[int(GROUP_SIZES.sum()) :].set(0.0)
    loss = lambda f: lambda a, b: jnp.sum(f(a, b).astype(jnp.float32) * grad)  # noqa: E731
    fn = lambda a, b: moe.grouped_matmul(a, b, gs, group_offset=offset, **kw)  # noqa: E731
    got = jax.jit(jax.grad(loss(fn), argnums=(0, 1)))(lhs, rhs_local)
    want = jax.grad(loss(lambda a, b: reference.grouped_matmul(a, b, gs, offset)), argnums=(0, 1))(lhs, rhs_local)
    for g, w_, name in zip(got, want, ("lhs", "rhs")):
        _close(g, w_, err_msg=name, dtype=lhs.dtype)


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
    # With a group offset the local rows are rolled to the top and back.
    _close(xla.gmm_ragged(lhs, rhs[2:5], gs, 2), np_gmm(lhs, rhs[2:5], gs, 2))
    _close(xla.tgmm_ragged(lhs, grad, gs, 2, 3), np_tgmm(lhs, grad, gs, 2, 3))


@pytest.mark.parametrize("backend, platform, custom_call", [("tpu", "tpu", "tpu_custom_call"),
                                                            ("gpu", "cuda", "mosaic_gpu_v2")])
def test_pallas_gmm_lowers_for_the_real_backend(backend, platform, custom_call):
    """Forward and gradient (gmm, transposed gmm, tgmm) at the default tiles lower for TPU / CUDA.

    ``jax.export`` runs the Pallas lowering without the hardware: for TPU to Mosaic MLIR, for CUDA through
    Mosaic GPU's layout inference and dialect lowering (in Python; with no GPU to ask, Mosaic GPU targets
    sm_90, i.e. Hopper) and its shared-memory budget check. What is left for the hardware is the backend's
    own compiler (libtpu's Mosaic passes; the Mosaic GPU custom call's PTX compilation).
    """
    m, k, n, g = 256, 256, 384, 8
    dt = jnp.bfloat16
    args = (jax.ShapeDtypeStruct((m, k), dt), jax.ShapeDtypeStruct((g // 2, k, n), dt),
            jax.ShapeDtypeStruct((g,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
    kw = dict(impl="pallas", backend=backend, interpret=False)  # False: compile, even on this CPU host

    def loss(lhs, rhs, gs, offset):
        return jnp.sum(moe.grouped_matmul(lhs, rhs, gs, group_offset=offset, **kw).astype(jnp.float32))

    for fn in (loss, jax.grad(loss, argnums=(0, 1))):
        text = jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
        calls = re.findall(r"stablehlo\.custom_call @(\w+)", text)
        assert calls and set(calls) == {custom_call}, calls
    assert len(calls) >= 2  # the gradient: d lhs (transposed-rhs gmm) and d rhs (tgmm)


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


@pytest.mark.parametrize("kernel", ["reference", *KERNEL_PARAMS])
def test_routed_experts_matches_reference(kernel):
    x, idx, w, wgu, wd, dy = make_routing_case(seed=2)
    dt = _dtype(kernel)
    x, w, wgu, wd, dy = (a.astype(dt) for a in (x, w, wgu, wd, dy))
    kw = KERNELS.get(kernel, dict(impl="reference"))
    fn = functools.partial(moe.routed_experts, **kw)
    y, grads = _value_and_grads(fn, x, idx, w, wgu, wd, dy)
    y_ref, grads_ref = _value_and_grads(reference.routed_experts, x, idx, w, wgu, wd, dy)
    assert y.shape == x.shape and y.dtype == x.dtype
    _close(y, y_ref, err_msg="y", dtype=dt)
    _close(y, np_routed_experts(x, idx, w, wgu, wd), err_msg="y vs numpy", dtype=dt)
    for g, g_ref, name in zip(grads, grads_ref, ("x", "expert_weights", "w_gate_up", "w_down")):
        assert g.shape == g_ref.shape, name
        _close(g, g_ref, err_msg=f"d{name}", dtype=dt)
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


def test_impl_and_interpret_resolution():
    """auto -> xla on the CPU; Pallas interprets on the CPU unless told interpret=False (for jax.export)."""
    if jax.default_backend() == "cpu":
        assert resolve_impl("moe", "auto") == "xla"
        assert make_config("pallas", backend="gpu").interpret is True
        assert make_config("pallas", backend="tpu", interpret=False).interpret is False
    # Which dtypes "auto" sends to each Pallas family (off the CPU); other dtypes get "xla" (ragged_dot).
    assert pallas_takes("tpu", (jnp.bfloat16, jnp.float32)) and not pallas_takes("tpu", (jnp.float16,))
    assert pallas_takes("gpu", (jnp.bfloat16,)) and pallas_takes("gpu", (jnp.float16, jnp.float16))
    assert not pallas_takes("gpu", (jnp.float32,)) and not pallas_takes("gpu", (jnp.bfloat16, jnp.float16))


def test_bad_pallas_options_name_the_value(gmm_operands):
    lhs, rhs, grad, gs = gmm_operands
    bf = lambda a: a.astype(jnp.bfloat16)  # noqa: E731
    gpu_kw, tpu_kw = dict(impl="pallas", backend="gpu"), dict(impl="pallas", backend="tpu")
    cases = [
        (r"gpu Pallas kernels take bfloat16/float16.*lhs.dtype=float32",
         lambda: moe.grouped_matmul(lhs, rhs, gs, **gpu_kw)),
        (r"one dtype.*lhs.dtype=bfloat16, grad.dtype=float16",
         lambda: moe.tgmm(bf(lhs), grad.astype(jnp.float16), gs, **gpu_kw)),
        (r"tpu Pallas kernels take bfloat16/float32.*lhs.dtype=float16",
         lambda: moe.grouped_matmul(lhs.astype(jnp.float16), rhs, gs, **tpu_kw)),
        (r"GPU tiling.*multiples of 64.*tiling=\(64, 32, 64\)",
         lambda: moe.grouped_matmul(bf(lhs), bf(rhs), gs, tiling=(64, 32, 64), **gpu_kw)),
        (r"TPU tiling.*tiling=\(8, 100, 128\)",
         lambda: moe.grouped_matmul(lhs, rhs, gs, tiling=(8, 100, 128), **tpu_kw)),
        (r"InterpretGPUParams",
         lambda: moe.grouped_matmul(bf(lhs), bf(rhs), gs, interpret=pltpu.InterpretParams(), **gpu_kw)),
        (r"pltpu.InterpretParams",
         lambda: moe.grouped_matmul(lhs, rhs, gs, interpret=plgpu.InterpretGPUParams(), **tpu_kw)),
        (r"group_offset must be in \[0, 3\].*got 4", lambda: moe.grouped_matmul(lhs, rhs[:3], gs, group_offset=4)),
        (r"group_offset must be an integer scalar",
         lambda: moe.grouped_matmul(lhs, rhs, gs, group_offset=jnp.zeros(2, jnp.int32))),
        (r"num_groups must be a static int in \[0, 6\].*7", lambda: moe.tgmm(lhs, grad, gs, num_groups=7)),
    ]
    for pattern, call in cases:
        with pytest.raises(ValueError, match=pattern):
            call()


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


@pytest.mark.parametrize("t,k,e", [(1, 2, 8), (3, 3, 12), (8, 2, 8), (16, 3, 5)])
def test_xla_cpu_few_rows_paths(t, k, e):
    """Few rows take the gather path (T * k < E) or, with few experts per slot, the dense path over all
    experts (T * k >= E, E <= DENSE_EXPERTS_PER_SLOT * k): values and gradients equal the reference."""
    x, idx, w, wgu, wd, dy = make_routing_case(seed=5, t=t, k=k, e=e)
    idx = idx.at[0, 0].set(e)  # an out-of-range id contributes nothing on both paths
    y, grads = _value_and_grads(xla.routed_experts_cpu, x, idx, w, wgu, wd, dy)
    y_ref, grads_ref = _value_and_grads(reference.routed_experts, x, idx, w, wgu, wd, dy)
    _close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        _close(g, g_ref)
