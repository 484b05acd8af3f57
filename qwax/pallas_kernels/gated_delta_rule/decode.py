"""Single-token gated delta rule step as a Pallas kernel (`pl.pallas_call`), used by the TPU path (`tpu.decode`).

One program per (batch row, value head) holds that head's [dk, dv] state; the key head is chosen by the BlockSpec
index map (value head h reads key head h // (Hv / Hk)), so keys are never repeated. The GPU path has its own
Mosaic GPU kernel (`gpu.decode`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qwax.pallas_kernels.gated_delta_rule.chunk_math import decode_step

_F32 = jnp.float32


def decode_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, s_ref, o_ref, s_out_ref, *, scale: float):
    """Kernel body for one (batch row, value head): refs as `decode_step`'s arguments, outputs o [1, dv] and the
    new state [dk, dv]."""
    o, s = decode_step(q_ref[...].astype(_F32), k_ref[...].astype(_F32), v_ref[...].astype(_F32),
                       g_ref[...], b_ref[...], s_ref[...], scale=scale)
    o_ref[...] = o.astype(o_ref.dtype)
    s_out_ref[...] = s


def decode_call(q, k, v, g, beta, state, *, scale: float, compiler_params: Any, name: str, interpret: Any = False):
    """Single-token step. q, k [B, Hk, dk, 1] (columns); v [B, Hv, 1, dv]; g, beta [B, Hv, 1, 1] float32;
    state [B, Hv, dk, dv] float32. Returns (o [B, Hv, 1, dv] in v.dtype, new state [B, Hv, dk, dv])."""
    b, hk, dk, _ = q.shape
    hv, dv = v.shape[1], v.shape[-1]
    r = hv // hk
    key = pl.BlockSpec((None, None, dk, 1), lambda bi, h: (bi, jax.lax.div(h, r), 0, 0))
    per_head = lambda *shape: pl.BlockSpec((None, None, *shape), lambda bi, h: (bi, h, 0, 0))  # noqa: E731
    return pl.pallas_call(
        functools.partial(decode_kernel, scale=scale),
        grid=(b, hv),
        in_specs=[key, key, per_head(1, dv), per_head(1, 1), per_head(1, 1), per_head(dk, dv)],
        out_specs=[per_head(1, dv), per_head(dk, dv)],
        out_shape=[jax.ShapeDtypeStruct((b, hv, 1, dv), v.dtype), jax.ShapeDtypeStruct((b, hv, dk, dv), _F32)],
        input_output_aliases={5: 1},  # the state is updated in place when the caller donates it
        compiler_params=compiler_params,
        interpret=interpret,
        name=name,
    )(q, k, v, g, beta, state)
