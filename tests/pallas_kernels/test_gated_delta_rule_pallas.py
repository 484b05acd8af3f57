"""Gated delta rule Pallas kernels (impl="pallas") against the per-token reference, in interpret mode on the CPU.

Both kernel families run here: the TPU kernels under `pltpu.InterpretParams()` and the Mosaic GPU kernels under
`plgpu.InterpretGPUParams()` (what `interpret=None` picks on the CPU). Interpret mode is slow (the TPU one ~200x
jnp), so shapes are tiny (B = 2, Hk = 1, Hv = 2, dk = 16, dv = 8; the GPU wrappers pad dk and dv to 64 and
sequences to whole chunks of 64) and each test compiles one function that returns outputs and gradients
together; those tests are marked slow. The lowering test exports both families for their real backends.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import mosaic_gpu as plgpu

import qwax
from qwax.pallas_kernels import gated_delta_rule, gated_delta_rule_step
from qwax.pallas_kernels.gated_delta_rule.pallas import resolve
from qwax.pallas_kernels.gated_delta_rule.reference import recurrent_step

from .test_gated_delta_rule import max_abs, numpy_oracle
from .test_gated_delta_rule import make_inputs as make_inputs_2x4

BACKENDS = ("tpu", "gpu")
ARG_NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def make_inputs(seed: int, length: int):
    """make_inputs of test_gated_delta_rule cut to Hk = 1, Hv = 2 (grouped values); state row 0 zero, row 1 not."""
    q, k, v, g, beta, state = make_inputs_2x4(seed, length)
    return q[:, :, :1], k[:, :, :1], v[:, :, :2], g[..., :2], beta[..., :2], state[:, :2]


def _weights(o_shape, s_shape):
    rng = np.random.default_rng(1)
    return rng.standard_normal(o_shape).astype(np.float32), rng.standard_normal(s_shape).astype(np.float32)


def interpret_params(backend: str):
    """The interpret mode `interpret=None` would pick on the CPU, for the GPU family with its race detector on: a
    read of a TMA destination before its barrier wait (or similar unsynchronised access) raises."""
    return plgpu.InterpretGPUParams(detect_races=True) if backend == "gpu" else None


@functools.partial(jax.jit, static_argnames=("impl", "backend"))
def outputs_and_grads(q, k, v, g, beta, state, segment_ids, w_o, w_s, *, impl, backend=None):
    """(o, final_state, grads of sum(o * w_o) + sum(s * w_s) w.r.t. q, k, v, g, beta, state), one compilation."""

    def f(q, k, v, g, beta, state):
        return gated_delta_rule(
            q, k, v, g, beta, initial_state=state, segment_ids=segment_ids, impl=impl, backend=backend,
            interpret=interpret_params(backend) if impl == "pallas" else None,
        )

    (o, s), pullback = jax.vjp(f, q, k, v, g, beta, state)
    return o, s, pullback((w_o, w_s))


def _check(backend, inputs, segment_ids):
    length = inputs[0].shape[1]
    b, hv, dk, dv = inputs[5].shape
    w_o, w_s = _weights((b, length, hv, dv), (b, hv, dk, dv))
    o, s, grads = outputs_and_grads(*inputs, segment_ids, w_o, w_s, impl="pallas", backend=backend)
    o_ref, s_ref, grads_ref = outputs_and_grads(*inputs, segment_ids, w_o, w_s, impl="reference")
    assert o.shape == o_ref.shape and s.shape == s_ref.shape
    assert max_abs(o, o_ref) <= 1e-4 and max_abs(s, s_ref) <= 1e-4
    for name, got, expected in zip(ARG_NAMES, grads, grads_ref):
        rel = max_abs(got, expected) / float(jnp.max(jnp.abs(expected)))
        assert rel <= 1e-3, f"d/d{name}: relative error {rel:.2e}"
    return o, s


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, 63, 64])
def test_matches_reference_with_gradients(backend, length):
    # One chunk (TPU: C = 8 for L = 1, else 64, padded for L = 63; GPU: always 64); several chunks below.
    _check(backend, make_inputs(length, length), None)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_keys_beta_one_no_decay(backend):
    # The worst case for the triangular inverse: A is all ones below the diagonal. Power-series forms of
    # (I + A)^-1 cancel terms of size ~1e18 here; the blocked substitution must stay exact. Same shape as the
    # L = 64 case above (no new compilation).
    q, k, v, g, beta, state = make_inputs(7, 64)
    k = np.broadcast_to(k[:, :1], k.shape).copy()
    _check(backend, (q, k, v, np.zeros_like(g), np.ones_like(beta), state), None)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_segments_several_chunks_with_gradients(backend):
    # L = 200: four chunks of 64, the last one padded; segment boundaries inside chunks and one on a chunk
    # boundary (128); a length-1 document; row 1 reuses id 0 later (still a new segment).
    lengths = [[37, 91, 1, 71], [150, 50]]
    ids = [[0, 1, 2, 3], [0, 1]]
    seg = np.stack([np.repeat(i, n) for i, n in zip(ids, lengths)]).astype(np.int32)
    seg[1, 180:] = 0
    inputs = make_inputs(5, 200)
    inputs[3][:, 40:43] = -80.0  # decays that underflow exp (and would overflow it unmasked): must stay exact
    o, s = _check(backend, inputs, seg)
    # Each document equals running it alone (initial_state applies to the first document of a row only).
    q, k, v, g, beta, state = inputs
    for row in range(2):
        bounds = np.flatnonzero(np.diff(seg[row])) + 1
        pieces = np.split(np.arange(200), bounds)
        for i, piece in enumerate(pieces):
            args = [x[row : row + 1, piece] for x in (q, k, v, g, beta)]
            o_piece, s_piece = numpy_oracle(*args, state[row : row + 1] if i == 0 else None)
            assert max_abs(o[row : row + 1, piece], o_piece) <= 1e-4, (row, i)
        assert max_abs(s[row : row + 1], s_piece) <= 1e-4, row


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_step_kernel_matches_recurrent_step(backend):
    q, k, v, g, beta, state = make_inputs(4, 1)
    q, k, v, g, beta = (x[:, 0] for x in (q, k, v, g, beta))
    step = jax.jit(functools.partial(gated_delta_rule_step, impl="pallas", backend=backend,
                                     interpret=interpret_params(backend)))
    o, s = step(q, k, v, g, beta, state)
    o_ref, s_ref = recurrent_step(q, k, v, g, beta, state)
    assert o.shape == o_ref.shape and s.shape == s_ref.shape
    assert max_abs(o, o_ref) <= 1e-5 and max_abs(s, s_ref) <= 1e-5


@pytest.mark.slow
def test_gpu_value_blocks_and_unpadded_heads():
    # dk = 64, dv = 128: no padding, and two 64-column value blocks per head, whose partial dq, dk, dG and
    # dbeta the wrapper sums; L = 70: two chunks, the second mostly padding.
    rng = np.random.default_rng(3)
    b, length, hk, hv, dk, dv = 1, 70, 1, 2, 64, 128
    l2norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, k = (l2norm(rng.standard_normal((b, length, hk, dk))).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((b, length, hv, dv)).astype(np.float32)
    g = (-0.3 * np.logaddexp(0.0, rng.standard_normal((b, length, hv)))).astype(np.float32)
    beta = (1.0 / (1.0 + np.exp(-rng.standard_normal((b, length, hv))))).astype(np.float32)
    state = rng.standard_normal((b, hv, dk, dv)).astype(np.float32)
    _check("gpu", (q, k, v, g, beta, state), None)


@pytest.mark.slow
def test_low_precision_inputs_keep_float32_state():
    q, k, v, g, beta, state = make_inputs(6, 64)
    expected_o, expected_s = numpy_oracle(q, k, v, g, beta, state)
    as_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    kw = dict(impl="pallas", backend="gpu", interpret=interpret_params("gpu"))
    o, s = jax.jit(functools.partial(gated_delta_rule, **kw))(
        as_bf16(q), as_bf16(k), as_bf16(v), g, as_bf16(beta), initial_state=state)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert max_abs(s, expected_s) <= 5e-2 and max_abs(o, expected_o) <= 5e-2  # inputs rounded to bf16 only
    # Gradients with bf16 q, k, v, do (the kernels' single-part operands) against the reference on the same
    # rounded values in float32; the cotangent of o is rounded to bf16 too.
    bf16_inputs = [np.asarray(as_bf16(x), np.float32) if i in (0, 1, 2, 4) else x
                   for i, x in enumerate((q, k, v, g, beta, state))]
    w_o, w_s = _weights((2, 64, 2, 8), state.shape)
    w_o = np.asarray(as_bf16(w_o), np.float32)
    _, _, grads = outputs_and_grads(*(as_bf16(x) if i in (0, 1, 2, 4) else x for i, x in enumerate(bf16_inputs)),
                                    None, as_bf16(w_o), w_s, impl="pallas", backend="gpu")
    _, _, grads_ref = outputs_and_grads(*bf16_inputs, None, w_o, w_s, impl="reference")
    for name, got, expected in zip(ARG_NAMES, grads, grads_ref):
        rel = max_abs(got, expected) / float(jnp.max(jnp.abs(expected)))
        assert rel <= 2e-2, f"d/d{name}: relative error {rel:.2e}"  # bf16 gradients of bf16 inputs


@pytest.mark.parametrize("backend, platform, dtype", [("tpu", "tpu", jnp.float32), ("gpu", "cuda", jnp.float32),
                                                     ("gpu", "cuda", jnp.bfloat16)])
@pytest.mark.slow
def test_kernels_lower_for_the_real_backend(backend, platform, dtype):
    """Forward, gradient and decode at real head sizes (dk = dv = 128, C = 64) lower for TPU / CUDA (for the GPU
    kernels also with bf16 q, k, v: their single-part operands).

    `jax.export` runs the Pallas lowering without the hardware: to Mosaic MLIR for TPU, and for CUDA the whole
    Mosaic GPU lowering (done in Python, for sm_90a when no GPU is present: no abstract device is needed), which
    fails on any op without a lowering rule, unsupported layout or SMEM over budget. Mosaic's own compiler
    passes (in libtpu) and the GPU's LLVM/ptxas compilation do not run here.
    """
    b, length, hk, hv, d = 1, 128, 1, 2, 128
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    x = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
    seq_args = (x(b, length, hk, d), x(b, length, hk, d), x(b, length, hv, d), f32(b, length, hv),
                x(b, length, hv), f32(b, hv, d, d), jax.ShapeDtypeStruct((b, length), jnp.int32))
    step_args = (x(b, hk, d), x(b, hk, d), x(b, hv, d), f32(b, hv), x(b, hv), f32(b, hv, d, d))
    kw = dict(impl="pallas", backend=backend, interpret=False)

    def loss(q, k, v, g, beta, state, seg):
        o, s = gated_delta_rule(q, k, v, g, beta, initial_state=state, segment_ids=seg, **kw)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    # The kernels are in the module as the backend's custom calls, lowered without error.
    custom_call = "tpu_custom_call" if platform == "tpu" else "stablehlo.custom_call @mosaic_gpu_v2"
    for fn, args, count in ((jax.grad(loss, argnums=range(6)), seq_args, 2),
                            (functools.partial(gated_delta_rule_step, **kw), step_args, 1)):
        exported = jax.export.export(jax.jit(fn), platforms=[platform])(*args)
        assert exported.mlir_module().count(custom_call) == count  # forward + backward kernels, or decode


def test_auto_picks_xla_on_cpu_and_bad_pallas_options_raise():
    args = make_inputs(8, 20)[:5]
    trace = lambda impl: str(jax.make_jaxpr(functools.partial(gated_delta_rule, impl=impl))(*args))
    assert trace("auto") == trace("xla")
    with pytest.raises(ValueError, match="backend"):
        gated_delta_rule(*args, impl="pallas", backend="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        gated_delta_rule(*args, impl="pallas", chunk_size=60)
    # On the CPU, interpret=None means each family's interpret mode.
    assert isinstance(resolve("gpu", None)[1], plgpu.InterpretGPUParams)
    assert isinstance(resolve("gpu", True)[1], plgpu.InterpretGPUParams)
    # The Mosaic GPU kernels: chunks of 64 only, key head dims up to 128 (raised before any kernel is traced).
    with pytest.raises(ValueError, match="chunk_size = 64"):
        gated_delta_rule(*args, impl="pallas", backend="gpu", chunk_size=32)
    q, k, v, g, beta = args
    wide = np.concatenate([q] * 9, axis=-1)  # dk = 144
    with pytest.raises(ValueError, match="dk = 144"):
        gated_delta_rule(wide, wide, v, g, beta, impl="pallas", backend="gpu")


@pytest.mark.slow
def test_tiny_model_pallas_matches_xla():
    # Logits and parameter gradients of a tiny model (3 Gated DeltaNet layers, scanned, rematerialised): the
    # custom VJP inside the model's layer scan. tiny-dense: the same GDN layers as tiny-moe, faster to compile.
    cfg = qwax.get_preset("tiny-dense")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)), jnp.int32)
    results = {}
    for impl in ("xla", "pallas"):
        graphdef, params = nnx.split(qwax.QwaxForCausalLM(cfg, qwax.RunOptions(gdn_impl=impl), rngs=nnx.Rngs(0)))

        def loss(params):
            logits = qwax.forward(graphdef, params, ids).logits
            return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

        results[impl] = jax.jit(jax.grad(loss, has_aux=True))(params)
    (grads, logits), (grads_xla, logits_xla) = results["pallas"], results["xla"]
    assert max_abs(logits, logits_xla) <= 1e-4
    for (path, expected), got in zip(jax.tree_util.tree_flatten_with_path(grads_xla)[0], jax.tree.leaves(grads)):
        rel = max_abs(got, expected) / (float(jnp.max(jnp.abs(expected))) + 1e-30)
        assert rel <= 1e-3, f"{jax.tree_util.keystr(path)}: relative error {rel:.2e}"
