"""Gated delta rule: the chunked impl against the per-token reference, and the reference against numpy loops.

Compiling the chunked impl takes seconds on the CPU, so each test compiles as few distinct shapes as it can:
rows of one batch carry different cases (zero vs non-zero initial state) instead of separate calls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwax.pallas_kernels import gated_delta_rule, gated_delta_rule_step

jax.config.update("jax_enable_x64", False)

B, HK, HV, DK, DV = 2, 2, 4, 16, 8  # Hv = 2 * Hk: grouped value attention
ARG_NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def make_inputs(seed: int, length: int, decay: float = 0.3, dtype=np.float32):
    """(q, k, v, g, beta, state) as numpy: L2-normalised q/k, beta in (0, 1), g = -decay * softplus(randn).

    Row 0 of the state is zero and row 1 is random, so one call covers both kinds of initial state.
    """
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    l2norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q, k = l2norm(normal(B, length, HK, DK)), l2norm(normal(B, length, HK, DK))
    v = normal(B, length, HV, DV)
    g = -decay * np.logaddexp(0.0, normal(B, length, HV))
    beta = 1.0 / (1.0 + np.exp(-normal(B, length, HV)))
    state = normal(B, HV, DK, DV)
    state[0] = 0.0
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), g, beta.astype(dtype), state


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "scale"))
def run(q, k, v, g, beta, initial_state=None, segment_ids=None, *, impl, chunk_size=64, scale=None):
    return gated_delta_rule(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
        chunk_size=chunk_size, impl=impl,
    )


def numpy_oracle(q, k, v, g, beta, initial_state=None, segment_ids=None, scale=None):
    """The recurrence as plain loops in float64, written independently of the JAX code."""
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    b, length, hk, dk = q.shape
    hv, dv = v.shape[2:]
    scale = dk**-0.5 if scale is None else scale
    o = np.zeros((b, length, hv, dv))
    final = np.zeros((b, hv, dk, dv))
    for bi in range(b):
        for h in range(hv):
            kh = h // (hv // hk)
            s = np.zeros((dk, dv)) if initial_state is None else np.array(initial_state[bi, h], np.float64)
            for t in range(length):
                if segment_ids is not None and t > 0 and segment_ids[bi, t] != segment_ids[bi, t - 1]:
                    s = np.zeros((dk, dv))
                s = np.exp(g[bi, t, h]) * s
                u = beta[bi, t, h] * (v[bi, t, h] - s.T @ k[bi, t, kh])
                s = s + np.outer(k[bi, t, kh], u)
                o[bi, t, h] = scale * s.T @ q[bi, t, kh]
            final[bi, h] = s
    return o, final


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_reference_matches_numpy_loops():
    q, k, v, g, beta, state = make_inputs(0, 37)
    # Row 0 reuses id 0 after segment 1: that is still a new segment.
    seg = np.array([[0] * 10 + [1] * 20 + [0] * 7, [5] * 37], np.int32)
    for initial_state, segment_ids in ((None, None), (state, seg)):
        expected_o, expected_s = numpy_oracle(q, k, v, g, beta, initial_state, segment_ids)
        o, s = run(q, k, v, g, beta, initial_state, segment_ids, impl="reference")
        assert max_abs(o, expected_o) <= 1e-5
        assert max_abs(s, expected_s) <= 1e-5


@pytest.mark.parametrize(
    "length, chunk_size",
    [(1, 64), (63, 64), (64, 64), (65, 64), (200, 64), (257, 64), (257, 16), (257, 48), (257, 128)],
)
def test_xla_matches_reference(length, chunk_size):
    q, k, v, g, beta, state = make_inputs(length, length)
    o_ref, s_ref = run(q, k, v, g, beta, state, impl="reference")
    o, s = run(q, k, v, g, beta, state, impl="xla", chunk_size=chunk_size)
    assert o.shape == (B, length, HV, DV) and s.shape == (B, HV, DK, DV)
    assert max_abs(o, o_ref) <= 1e-5
    assert max_abs(s, s_ref) <= 1e-5


def test_xla_without_initial_state_starts_from_zeros():
    q, k, v, g, beta, _ = make_inputs(1, 100)
    expected_o, expected_s = numpy_oracle(q, k, v, g, beta)
    o, s = run(q, k, v, g, beta, impl="xla")
    assert max_abs(o, expected_o) <= 1e-5 and max_abs(s, expected_s) <= 1e-5


def test_strong_decay_stays_finite_and_exact():
    # exp(G_i - G_j) above the diagonal reaches exp(60 * 64) here: it must be masked before exp, not after.
    q, k, v, g, beta, state = make_inputs(3, 130, decay=60.0)
    o_ref, s_ref = run(q, k, v, g, beta, state, impl="reference")
    o, s = run(q, k, v, g, beta, state, impl="xla")
    assert max_abs(o, o_ref) <= 1e-5 and max_abs(s, s_ref) <= 1e-5


@pytest.mark.parametrize("with_segments, chunk_size", [(False, 64), (True, 32)])
def test_xla_gradients_match_reference(with_segments, chunk_size):
    length = 100  # two chunks of 64 or four of 32, with padding
    q, k, v, g, beta, state = make_inputs(11, length)
    g[:, 40:43] = -80.0  # decays that underflow exp: gradients must stay finite
    seg = np.repeat([[0, 1, 2, 3], [4, 4, 5, 6]], [30, 20, 45, 5], axis=1).astype(np.int32) if with_segments else None
    rng = np.random.default_rng(1)
    w_o = rng.standard_normal((B, length, HV, DV)).astype(np.float32)
    w_s = rng.standard_normal((B, HV, DK, DV)).astype(np.float32)

    def grads(impl):
        def loss(q, k, v, g, beta, state):
            o, s = gated_delta_rule(
                q, k, v, g, beta, initial_state=state, segment_ids=seg, chunk_size=chunk_size, impl=impl
            )
            return jnp.sum(o * w_o) + jnp.sum(s * w_s)

        return jax.jit(jax.grad(loss, argnums=range(6)))(q, k, v, g, beta, state)

    for name, got, expected in zip(ARG_NAMES, grads("xla"), grads("reference")):
        assert bool(jnp.all(jnp.isfinite(got))), name
        rel = max_abs(got, expected) / float(jnp.max(jnp.abs(expected)))
        assert rel <= 1e-4, f"d/d{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("with_segments, chunk_size", [(False, 64), (True, 32)])
def test_xla_jvp_matches_reference(with_segments, chunk_size):
    """Forward mode (jax.jvp) through the chunked path: the custom JVP runs the scan form's JVP."""
    length = 100
    primals = make_inputs(12, length)
    primals[3][:, 40:43] = -80.0  # decays that underflow exp: tangents must stay finite
    seg = np.repeat([[0, 1, 2, 3], [4, 4, 5, 6]], [30, 20, 45, 5], axis=1).astype(np.int32) if with_segments else None
    rng = np.random.default_rng(2)
    tangents = tuple(rng.standard_normal(x.shape).astype(np.float32) for x in primals)

    def jvp(impl):
        def f(*args):
            return gated_delta_rule(*args[:5], initial_state=args[5], segment_ids=seg, chunk_size=chunk_size, impl=impl)

        return jax.jit(lambda p, t: jax.jvp(f, p, t))(primals, tangents)

    (o, s), (do, ds) = jvp("xla")
    (o_ref, s_ref), (do_ref, ds_ref) = jvp("reference")
    assert max_abs(o, o_ref) <= 1e-5 and max_abs(s, s_ref) <= 1e-5
    for name, got, expected in (("o", do, do_ref), ("final_state", ds, ds_ref)):
        assert bool(jnp.all(jnp.isfinite(got))), name
        rel = max_abs(got, expected) / float(jnp.max(jnp.abs(expected)))
        assert rel <= 1e-4, f"tangent of {name}: relative error {rel:.2e}"


def test_unit_lower_inverse_gradient_is_strictly_lower():
    """The JVP rule dT = -T dM T transposes to -T^T T_bar T^T over the whole matrix; the strictly-lower mask the
    caller builds M with must restrict it to where M lives (what the former hand-written VJP did itself)."""
    from qwax.pallas_kernels.gated_delta_rule.xla import _unit_lower_inverse

    rng = np.random.default_rng(3)
    c = 16
    lower = np.tril(np.ones((c, c), bool), -1)
    a = rng.standard_normal((3, c, c)).astype(np.float32) * 0.3
    w = rng.standard_normal((3, c, c)).astype(np.float32)
    m_bar = jax.grad(lambda a: jnp.sum(_unit_lower_inverse(jnp.where(lower, a, 0.0)) * w))(a)
    t = np.linalg.inv(np.eye(c) + np.where(lower, a, 0.0).astype(np.float64))
    t_h = np.swapaxes(t, -1, -2)
    expected = np.tril(-(t_h @ w @ t_h), -1)
    assert max_abs(m_bar, expected) <= 1e-5 * float(np.max(np.abs(expected)))


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_segments_equal_separate_runs(impl):
    lengths = [[37, 64, 1, 98], [150, 50]]
    q, k, v, g, beta, state = make_inputs(5, 200)
    seg = np.stack([np.repeat(np.arange(len(ls)), ls) for ls in lengths]).astype(np.int32)
    o, s = run(q, k, v, g, beta, state, seg, impl=impl, chunk_size=32)
    for row, ls in enumerate(lengths):
        start = 0
        for i, n in enumerate(ls):
            piece = slice(start, start + n)
            args = [x[row : row + 1, piece] for x in (q, k, v, g, beta)]
            # initial_state applies to the first segment of the row only.
            o_piece, s_piece = numpy_oracle(*args, state[row : row + 1] if i == 0 else None)
            assert max_abs(o[row : row + 1, piece], o_piece) <= 1e-5, (row, i)
            start += n
        assert max_abs(s[row : row + 1], s_piece) <= 1e-5, row


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_split_sequence_with_carried_state_equals_one_pass(impl):
    q, k, v, g, beta, state = make_inputs(9, 160)
    o, s = run(q, k, v, g, beta, state, impl=impl)
    cut = 80  # equal halves: one compilation for both
    o1, s1 = run(*(x[:, :cut] for x in (q, k, v, g, beta)), state, impl=impl)
    o2, s2 = run(*(x[:, cut:] for x in (q, k, v, g, beta)), s1, impl=impl)
    assert max_abs(np.concatenate([o1, o2], axis=1), o) <= 1e-5
    assert max_abs(s2, s) <= 1e-5


def test_step_matches_reference_for_one_token():
    q, k, v, g, beta, state = make_inputs(4, 1)
    o_ref, s_ref = run(q, k, v, g, beta, state, impl="reference")
    o, s = jax.jit(gated_delta_rule_step)(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state)
    assert o.shape == (B, HV, DV) and s.shape == (B, HV, DK, DV)
    assert max_abs(o, o_ref[:, 0]) <= 1e-6
    assert max_abs(s, s_ref) <= 1e-6


def test_low_precision_inputs_keep_float32_state():
    q, k, v, g, beta, state = make_inputs(6, 70)
    expected_o, expected_s = numpy_oracle(q, k, v, g, beta, state)
    as_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    o, s = run(as_bf16(q), as_bf16(k), as_bf16(v), g, as_bf16(beta), state, impl="xla")
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    # Only the inputs were rounded to bf16 (relative 2^-9), and the output once more.
    assert max_abs(s, expected_s) <= 5e-2
    assert max_abs(o, expected_o) <= 5e-2


def test_custom_scale():
    q, k, v, g, beta, state = make_inputs(10, 40)
    expected_o, _ = numpy_oracle(q, k, v, g, beta, state, scale=0.5)
    o, _ = run(q, k, v, g, beta, state, impl="reference", scale=0.5)
    assert max_abs(o, expected_o) <= 1e-5
    o, _ = run(q, k, v, g, beta, state, impl="xla", scale=0.5)
    assert max_abs(o, expected_o) <= 1e-5


def test_auto_is_the_xla_impl_on_cpu():
    args = make_inputs(8, 20)[:5]
    trace = lambda impl: str(jax.make_jaxpr(functools.partial(gated_delta_rule, impl=impl))(*args))
    assert trace("auto") == trace("xla")


@pytest.mark.parametrize(
    "name, change",
    [
        ("k", lambda a: {**a, "k": a["k"][..., :-1]}),
        ("v", lambda a: {**a, "v": a["v"][:, :-1]}),
        ("Hv", lambda a: {**a, "v": a["v"][:, :, :3], "g": a["g"][..., :3], "beta": a["beta"][..., :3]}),
        ("g", lambda a: {**a, "g": a["g"][..., :-1]}),
        ("beta", lambda a: {**a, "beta": a["beta"][:1]}),
        ("initial_state", lambda a: {**a, "initial_state": np.swapaxes(a["initial_state"], -1, -2)}),
        ("segment_ids", lambda a: {**a, "segment_ids": np.zeros((B, 3), np.int32)}),
        ("q", lambda a: {**a, "q": a["q"][0]}),
        ("chunk_size", lambda a: {**a, "chunk_size": 0}),
    ],
)
def test_bad_shapes_raise_naming_the_argument(name, change):
    args = change(dict(zip(ARG_NAMES, make_inputs(0, 10))))
    with pytest.raises(ValueError, match=name):
        gated_delta_rule(**args)


def test_step_bad_shapes_raise_naming_the_argument():
    q, k, v, g, beta, state = make_inputs(0, 1)
    token = lambda x: x[:, 0]
    with pytest.raises(ValueError, match="state"):
        gated_delta_rule_step(token(q), token(k), token(v), token(g), token(beta), state[:, :, :-1])
    with pytest.raises(ValueError, match="beta"):
        gated_delta_rule_step(token(q), token(k), token(v), token(g), beta, state)


def test_unknown_impl_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"impl=.cuda.*.xla.*.reference."):
        gated_delta_rule(*make_inputs(0, 4)[:5], impl="cuda")
