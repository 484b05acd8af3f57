"""Gated delta rule Pallas kernels for TPU (Mosaic): chunked forward, chunked backward, single-token decode.

Kernel layout (prepared by pallas.py): q, k [B, Hk, N, C, dk]; v [B, Hv, N, C, dv]; per-position scalars
(cumulative log decay G, beta) [B, Hv, N, C]; segment number, first, last [B, N, C] (float32); states
[B, Hv, dk, dv] float32. The per-chunk math is chunk_math.py.

Forward: grid (B, Hv, N), the chunk axis innermost and "arbitrary" (sequential on one core), the running
state [dk, dv] float32 in a VMEM scratch. Value head h reads key head h // (Hv // Hk) through the q/k index
maps, so keys are never repeated in HBM. q/k/v/o blocks are one chunk [C, d]; with C a multiple of 8 and
d = 128 (or d the full head dim) they satisfy the (8, 128) tiling. The per-position scalars of a whole
(batch, head) row, [N, C], are one block whose index does not change along the chunk axis, so it is DMAed
once per row; the kernel reads its chunk's row with a dynamic sublane slice. (VMEM: an [N, C] f32 block pads
C = 64 to 128 lanes, 512 KB per buffer at L = 64k; five such inputs double-buffered, seven in the backward,
stay well inside the default scoped VMEM up to that length.) Optionally each chunk's start
state is written out ([B, Hv, N, dk, dv]) for the backward pass.

Backward: the same grid walking the chunks in reverse (index maps use N - 1 - n) and carrying dS, the
cotangent of the running state, in VMEM scratch. Each step recomputes its chunk's intermediates from the
stored start state. dq/dk come out per value head ([B, Hv, N, C, dk]); the wrapper sums the Hv // Hk value
heads of each key head (several programs must not accumulate into one block).

Decode: grid (B, Hv), one [dk, dv] state block per program, state aliased in place (input_output_aliases).

Verified here (CPU only, no TPU available):
- values and gradients in TPU interpret mode (`pltpu.InterpretParams()`) against the per-token reference, and a
  tiny model's logits and parameter gradients against impl="xla"
  (tests/pallas_kernels/test_gated_delta_rule_pallas.py);
- the Pallas -> Mosaic lowering (done in Python) at real head sizes, dk = dv = 128 and C = 64, via
  `jax.export(..., platforms=["tpu"])`: every op has a Mosaic lowering rule.
Not verified: Mosaic's own compiler passes (vector layouts, in libtpu), which can still reject a shape or op
combination, and speed. Untested choices a TPU run should look at first: the transposed-lhs contractions
(K^T X), the dynamic one-row sublane slices of the [N, C] gate blocks, and whether the 16 dependent [C, C]
matmuls of the triangular inverse (chunk_math.unit_lower_inverse) dominate a chunk's time.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwax.pallas_kernels.gated_delta_rule.chunk_math import chunk_backward, chunk_forward
from qwax.pallas_kernels.gated_delta_rule.decode import decode_call

_F32 = jnp.float32


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, seg_ref, f_ref, l_ref, s0_ref, o_ref, sfin_ref, *rest,
                scale, num_chunks, with_states):
    states_ref, s_scr = rest if with_states else (None, rest[0])
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _init():
        s_scr[...] = s0_ref[...]

    s = s_scr[...]
    if with_states:
        states_ref[...] = s
    row = lambda ref: ref[pl.ds(n, 1), :]  # this chunk's [1, C] slice of the row-resident [N, C] block
    o, s_next = chunk_forward(
        q_ref[...].astype(_F32), k_ref[...].astype(_F32), v_ref[...].astype(_F32),
        row(g_ref), row(b_ref), row(seg_ref), row(f_ref), row(l_ref), s, scale=scale,
    )
    o_ref[...] = o.astype(o_ref.dtype)
    s_scr[...] = s_next

    @pl.when(n == num_chunks - 1)
    def _final():
        sfin_ref[...] = s_next


def _specs(b, hk, hv, n, c, dk, dv, *, reverse: bool):
    """BlockSpecs for grid (B, Hv, N); chunk index n -> N - 1 - n when walking backward."""
    r = hv // hk
    chunk = (lambda i: n - 1 - i) if reverse else (lambda i: i)
    key = pl.BlockSpec((None, None, None, c, dk), lambda bi, h, i: (bi, jax.lax.div(h, r), chunk(i), 0, 0))
    val = lambda d: pl.BlockSpec((None, None, None, c, d), lambda bi, h, i: (bi, h, chunk(i), 0, 0))
    gate = pl.BlockSpec((None, None, n, c), lambda bi, h, i: (bi, h, 0, 0))
    seg = pl.BlockSpec((None, n, c), lambda bi, h, i: (bi, 0, 0))
    state = pl.BlockSpec((None, None, dk, dv), lambda bi, h, i: (bi, h, 0, 0))
    chunk_state = pl.BlockSpec((None, None, None, dk, dv), lambda bi, h, i: (bi, h, chunk(i), 0, 0))
    return key, val, gate, seg, state, chunk_state


_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def forward(q, k, v, g, beta, seg, first, last, s0, *, scale: float, with_states: bool, interpret: Any = False):
    """Chunked forward. Shapes as the module docstring.

    Returns (o [B, Hv, N, C, dv] in v.dtype, final state [B, Hv, dk, dv], and if with_states the chunk start
    states [B, Hv, N, dk, dv]).
    """
    b, hk, n, c, dk = q.shape
    hv, dv = v.shape[1], v.shape[-1]
    key, val, gate, segs, state, chunk_state = _specs(b, hk, hv, n, c, dk, dv, reverse=False)
    out_shape = [jax.ShapeDtypeStruct((b, hv, n, c, dv), v.dtype), jax.ShapeDtypeStruct((b, hv, dk, dv), _F32)]
    out_specs = [val(dv), state]
    if with_states:
        out_shape.append(jax.ShapeDtypeStruct((b, hv, n, dk, dv), _F32))
        out_specs.append(chunk_state)
    kernel = functools.partial(_fwd_kernel, scale=scale, num_chunks=n, with_states=with_states)
    return pl.pallas_call(
        kernel,
        grid=(b, hv, n),
        in_specs=[key, key, val(dv), gate, gate, segs, segs, segs, state],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((dk, dv), _F32)],
        compiler_params=_PARAMS,
        interpret=interpret,
        name="qwax_gdr_fwd",
    )(q, k, v, g, beta, seg, first, last, s0)


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, seg_ref, f_ref, l_ref, st_ref, do_ref, dsfin_ref,
                dq_ref, dk_ref, dv_ref, dg_ref, db_ref, ds0_ref, ds_scr, *, scale, num_chunks):
    i = pl.program_id(2)
    n = num_chunks - 1 - i  # chunks in reverse

    @pl.when(i == 0)
    def _init():
        ds_scr[...] = dsfin_ref[...]

    row = lambda ref: ref[pl.ds(n, 1), :]
    dq, dk, dv, dg, db, ds = chunk_backward(
        q_ref[...].astype(_F32), k_ref[...].astype(_F32), v_ref[...].astype(_F32),
        row(g_ref), row(b_ref), row(seg_ref), row(f_ref), row(l_ref), st_ref[...], do_ref[...].astype(_F32),
        ds_scr[...], scale=scale,
    )
    dq_ref[...] = dq
    dk_ref[...] = dk
    dv_ref[...] = dv
    # The [N, C] gate-gradient blocks stay resident along the chunk axis; each step fills its own row.
    dg_ref[pl.ds(n, 1), :] = dg
    db_ref[pl.ds(n, 1), :] = db
    ds_scr[...] = ds

    @pl.when(i == num_chunks - 1)
    def _final():
        ds0_ref[...] = ds


def backward(q, k, v, g, beta, seg, first, last, states, do, ds_final, *, scale: float, interpret: Any = False):
    """Chunked backward from the stored chunk start states.

    Args: forward's inputs (without s0), states [B, Hv, N, dk, dv], do [B, Hv, N, C, dv], ds_final [B, Hv, dk, dv].
    Returns (dq, dk [B, Hv, N, C, dk] per value head, dv [B, Hv, N, C, dv], dG, dbeta [B, Hv, N, C],
    ds0 [B, Hv, dk, dv]), all float32.
    """
    b, hk, n, c, dk = q.shape
    hv, dv = v.shape[1], v.shape[-1]
    key, val, gate, segs, state, chunk_state = _specs(b, hk, hv, n, c, dk, dv, reverse=True)
    out_shape = [
        jax.ShapeDtypeStruct((b, hv, n, c, dk), _F32),
        jax.ShapeDtypeStruct((b, hv, n, c, dk), _F32),
        jax.ShapeDtypeStruct((b, hv, n, c, dv), _F32),
        jax.ShapeDtypeStruct((b, hv, n, c), _F32),
        jax.ShapeDtypeStruct((b, hv, n, c), _F32),
        jax.ShapeDtypeStruct((b, hv, dk, dv), _F32),
    ]
    kernel = functools.partial(_bwd_kernel, scale=scale, num_chunks=n)
    return pl.pallas_call(
        kernel,
        grid=(b, hv, n),
        in_specs=[key, key, val(dv), gate, gate, segs, segs, segs, chunk_state, val(dv), state],
        out_specs=[val(dk), val(dk), val(dv), gate, gate, state],
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((dk, dv), _F32)],
        compiler_params=_PARAMS,
        interpret=interpret,
        name="qwax_gdr_bwd",
    )(q, k, v, g, beta, seg, first, last, states, do, ds_final)


def decode(q, k, v, g, beta, state, *, scale: float, interpret: Any = False):
    """Single-token step; arguments and results as `decode.decode_call`."""
    return decode_call(q, k, v, g, beta, state, scale=scale, interpret=interpret, name="qwax_gdr_decode",
                       compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")))
