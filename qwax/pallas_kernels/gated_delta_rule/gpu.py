"""Gated delta rule Pallas kernels for GPU (Triton-style `pl.pallas_call`): chunked forward/backward, decode.

Same kernel layout and per-chunk math as tpu.py (see there and chunk_math.py). GPU grid programs run in no
guaranteed order, so a sequential grid axis cannot carry the state: each program owns one (batch, value head)
and walks its chunks with `lax.fori_loop` inside the kernel, the state (or its cotangent, in the backward
pass) as the loop carry. The program's whole [N, C, d] slab is its block; each iteration loads and stores one
chunk ([C, d], dynamic index on the leading axis). Value head h reads key head h // (Hv // Hk) through the
index maps.

Triton needs power-of-two value shapes: C, dk and dv must be powers of two (>= 16 for tl.dot) on a real GPU;
the wrapper's chunk lengths are. Triton compiler params are passed so that Pallas picks its Triton lowering.

Verified here (CPU only, no GPU available): values and gradients in plain Pallas interpret mode
(`interpret=True`) against the per-token reference, and the Pallas -> Triton IR lowering at dk = dv = 128,
C = 64 via `jax.export(..., platforms=["cuda"])`. Not verified: Triton's compilation to PTX, shared-memory
limits for these block sizes, and speed.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qwax.pallas_kernels.gated_delta_rule.chunk_math import chunk_backward, chunk_forward
from qwax.pallas_kernels.gated_delta_rule.decode import decode_call

_F32 = jnp.float32
# Triton compiler params also select the Triton lowering (not Mosaic GPU) for these kernels.
_PARAMS = plgpu.CompilerParams(num_warps=4, num_stages=1)


def _specs(hk, hv, n, c, dk, dv):
    """BlockSpecs for grid (B, Hv): a program's whole sequence."""
    r = hv // hk
    key = pl.BlockSpec((None, None, n, c, dk), lambda bi, h: (bi, jax.lax.div(h, r), 0, 0, 0))
    val = lambda d: pl.BlockSpec((None, None, n, c, d), lambda bi, h: (bi, h, 0, 0, 0))
    gate = pl.BlockSpec((None, None, n, c), lambda bi, h: (bi, h, 0, 0))
    seg = pl.BlockSpec((None, n, c), lambda bi, h: (bi, 0, 0))
    state = pl.BlockSpec((None, None, dk, dv), lambda bi, h: (bi, h, 0, 0))
    chunk_states = pl.BlockSpec((None, None, n, dk, dv), lambda bi, h: (bi, h, 0, 0, 0))
    return key, val, gate, seg, state, chunk_states


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, seg_ref, f_ref, l_ref, s0_ref, o_ref, sfin_ref, *rest,
                scale, num_chunks, with_states):
    states_ref = rest[0] if with_states else None

    def body(n, s):
        if with_states:
            states_ref[n] = s
        row = lambda ref: ref[pl.ds(n, 1), :]
        o, s_next = chunk_forward(
            q_ref[n].astype(_F32), k_ref[n].astype(_F32), v_ref[n].astype(_F32),
            row(g_ref), row(b_ref), row(seg_ref), row(f_ref), row(l_ref), s, scale=scale,
        )
        o_ref[n] = o.astype(o_ref.dtype)
        return s_next

    sfin_ref[...] = jax.lax.fori_loop(0, num_chunks, body, s0_ref[...])


def forward(q, k, v, g, beta, seg, first, last, s0, *, scale: float, with_states: bool, interpret: bool = False):
    """Chunked forward; arguments and results as `tpu.forward`."""
    b, hk, n, c, dk = q.shape
    hv, dv = v.shape[1], v.shape[-1]
    key, val, gate, segs, state, chunk_states = _specs(hk, hv, n, c, dk, dv)
    out_shape = [jax.ShapeDtypeStruct((b, hv, n, c, dv), v.dtype), jax.ShapeDtypeStruct((b, hv, dk, dv), _F32)]
    out_specs = [val(dv), state]
    if with_states:
        out_shape.append(jax.ShapeDtypeStruct((b, hv, n, dk, dv), _F32))
        out_specs.append(chunk_states)
    kernel = functools.partial(_fwd_kernel, scale=scale, num_chunks=n, with_states=with_states)
    return pl.pallas_call(
        kernel,
        grid=(b, hv),
        in_specs=[key, key, val(dv), gate, gate, segs, segs, segs, state],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_PARAMS,
        interpret=interpret,
        name="qwax_gdr_fwd_gpu",
    )(q, k, v, g, beta, seg, first, last, s0)


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, seg_ref, f_ref, l_ref, st_ref, do_ref, dsfin_ref,
                dq_ref, dk_ref, dv_ref, dg_ref, db_ref, ds0_ref, *, scale, num_chunks):
    def body(i, ds_next):
        n = num_chunks - 1 - i  # chunks in reverse
        row = lambda ref: ref[pl.ds(n, 1), :]
        dq, dk, dv, dg, db, ds = chunk_backward(
            q_ref[n].astype(_F32), k_ref[n].astype(_F32), v_ref[n].astype(_F32),
            row(g_ref), row(b_ref), row(seg_ref), row(f_ref), row(l_ref), st_ref[n], do_ref[n].astype(_F32),
            ds_next, scale=scale,
        )
        dq_ref[n] = dq
        dk_ref[n] = dk
        dv_ref[n] = dv
        dg_ref[pl.ds(n, 1), :] = dg
        db_ref[pl.ds(n, 1), :] = db
        return ds

    ds0_ref[...] = jax.lax.fori_loop(0, num_chunks, body, dsfin_ref[...])


def backward(q, k, v, g, beta, seg, first, last, states, do, ds_final, *, scale: float, interpret: bool = False):
    """Chunked backward; arguments and results as `tpu.backward`."""
    b, hk, n, c, dk = q.shape
    hv, dv = v.shape[1], v.shape[-1]
    key, val, gate, segs, state, chunk_states = _specs(hk, hv, n, c, dk, dv)
    out_shape = [
        jax.ShapeDtypeStruct((b, hv, n, c, dk), _F32),
        jax.ShapeDtypeStruct((b, hv, n, c, dk), _F32),
        jax.ShapeDtypeStruct((b, hv, n, c, dv), _F32),
        jax.ShapeDtypeStruct((b, hv, n, c), _F32),
        jax.ShapeDtypeStruct((b, hv, n, c), _F32),
        jax.ShapeDtypeStruct((b, hv, dk, dv), _F32),
    ]
    return pl.pallas_call(
        functools.partial(_bwd_kernel, scale=scale, num_chunks=n),
        grid=(b, hv),
        in_specs=[key, key, val(dv), gate, gate, segs, segs, segs, chunk_states, val(dv), state],
        out_specs=[val(dk), val(dk), val(dv), gate, gate, state],
        out_shape=out_shape,
        compiler_params=_PARAMS,
        interpret=interpret,
        name="qwax_gdr_bwd_gpu",
    )(q, k, v, g, beta, seg, first, last, states, do, ds_final)


def decode(q, k, v, g, beta, state, *, scale: float, interpret: Any = False):
    """Single-token step; arguments and results as `decode.decode_call`."""
    return decode_call(q, k, v, g, beta, state, scale=scale, interpret=interpret,
                       compiler_params=_PARAMS, name="qwax_gdr_decode_gpu")
