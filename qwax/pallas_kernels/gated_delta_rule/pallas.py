"""impl="pallas": layout preparation, the custom VJP around the Pallas kernels, and kernel-family selection.

The public op (`__init__.py`) validates shapes; this module only rearranges data and calls tpu.py or gpu.py:
- q, k, v go head-major and chunked, [B, H, N, C, d] (L zero-padded to N * C; padding has k = v = beta = 0 and
  g = 0, so it neither writes nor decays: outputs and the final state are unchanged).
- g becomes the cumulative log decay within each chunk (a cumsum in plain JAX, differentiated by autodiff, so
  the kernels only see G); g and beta are [B, Hv, N, C].
- segment ids become a running segment number and first/last masks, [B, N, C] float32 (see chunk_math.py).

The custom VJP: the forward kernel also writes each chunk's start state ([B, Hv, N, dk, dv] float32, one per chunk
as the XLA path stores; the GPU kernels store it as bf16 (hi, lo) pairs, see gpu.py) when differentiated; the
backward kernel walks the chunks in reverse, carrying dS, and recomputes each chunk's intermediates from its start
state. Without differentiation the states are not written.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from qwax.pallas_kernels.gated_delta_rule import gpu, tpu

_F32 = jnp.float32
BACKENDS = ("tpu", "gpu")


def resolve(backend: str | None, interpret: Any) -> tuple[Any, Any]:
    """(kernel family "tpu" | "gpu", interpret argument).

    backend: "tpu" | "gpu" | None (from `jax.default_backend()`; the TPU kernels on the CPU).
    interpret: None picks interpret mode on the CPU only (`pltpu.InterpretParams()` for the TPU kernels,
    `plgpu.InterpretGPUParams()` for the Mosaic GPU kernels, which also take True to mean it) and compiled
    kernels on TPU/GPU; anything else is passed to the kernels as is.
    """
    on_cpu = jax.default_backend() not in ("tpu", "gpu")
    if backend is None:
        backend = "gpu" if jax.default_backend() == "gpu" else "tpu"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, found {backend!r}")
    if backend == "tpu" and interpret is None and on_cpu:
        from jax.experimental.pallas import tpu as pltpu

        interpret = pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True
    elif backend == "gpu" and ((interpret is None and on_cpu) or interpret is True):
        # Mosaic GPU kernels run only in their own interpret mode (the generic one does not know their TMA,
        # barrier and wgmma primitives).
        from jax.experimental.pallas import mosaic_gpu as plgpu

        interpret = plgpu.InterpretGPUParams()
    return backend, (False if interpret is None else interpret)


def _chunk_len(length: int, chunk_size: int, backend: str) -> int:
    """Chunk length C: for the TPU kernels chunk_size, or for shorter sequences the length rounded up to a
    multiple of 8 (sublanes); the Mosaic GPU kernels always use C = 64 (wgmma's M), padding short sequences."""
    if backend == "tpu":
        return min(chunk_size, -(-length // 8) * 8)
    if chunk_size != gpu.CHUNK:
        raise ValueError(f"the GPU (Mosaic GPU) kernels need chunk_size = {gpu.CHUNK}, found {chunk_size}")
    return gpu.CHUNK


def _segment_rows(segment_ids: jax.Array | None, b: int, n: int, c: int, pad: int):
    """(segment number, first, last), each [B, N, C] float32; see chunk_math.py."""
    if segment_ids is None:
        ones = jnp.ones((b, n, c), _F32)
        return jnp.zeros((b, n, c), _F32), ones, ones
    changed = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    # A running count of changes names segments even when an id value is reused later in the row.
    seg = jnp.cumsum(jnp.pad(changed, [(0, 0), (1, 0)]), axis=1)
    seg = jnp.pad(seg, [(0, 0), (0, pad)], mode="edge").reshape(b, n, c)  # padding continues the last segment
    # The segment running when a chunk starts is the previous token's (segment 0 for the first chunk).
    start = jnp.pad(seg[:, :-1, -1], [(0, 0), (1, 0)])[..., None]
    first = (seg == start).astype(_F32)
    last = (seg == seg[..., -1:]).astype(_F32)
    return seg.astype(_F32), first, last


def _make_op(lib, scale: float, interpret: Any):
    """The differentiable kernel-layout op: (q, k, v, G, beta, seg, first, last, s0) -> (o, s_final)."""

    @jax.custom_vjp
    def op(q, k, v, gcum, beta, seg, first, last, s0):
        o, s_final = lib.forward(q, k, v, gcum, beta, seg, first, last, s0, scale=scale, with_states=False,
                                 interpret=interpret)
        return o, s_final

    def fwd(q, k, v, gcum, beta, seg, first, last, s0):
        o, s_final, states = lib.forward(q, k, v, gcum, beta, seg, first, last, s0, scale=scale,
                                         with_states=True, interpret=interpret)
        return (o, s_final), (q, k, v, gcum, beta, seg, first, last, states)

    def bwd(res, cotangents):
        q, k, v, gcum, beta, seg, first, last, states = res
        do, ds_final = cotangents
        dq, dk, dv, dg, db, ds0 = lib.backward(q, k, v, gcum, beta, seg, first, last, states, do, ds_final,
                                               scale=scale, interpret=interpret)
        # dq/dk come per value head: sum the Hv // Hk value heads that share each key head.
        b, hk = q.shape[:2]
        r = v.shape[1] // hk
        dq = dq.reshape(b, hk, r, *dq.shape[2:]).sum(axis=2)
        dk = dk.reshape(b, hk, r, *dk.shape[2:]).sum(axis=2)
        zeros = jnp.zeros_like(seg)
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, db, zeros, zeros, zeros, ds0)

    op.defvjp(fwd, bwd)
    return op


def gated_delta_rule_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = 64,
    backend: str | None = None,
    interpret: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """Chunked gated delta rule with Pallas kernels. Same contract as `gated_delta_rule` (already validated).

    Args:
      q, k: [B, L, Hk, dk]; v: [B, L, Hv, dv]; g, beta: [B, L, Hv]; initial_state: [B, Hv, dk, dv] or None;
      segment_ids: [B, L] or None. chunk_size: C, a multiple of 8 (exactly 64 for the GPU kernels); shorter
        sequences use one chunk of the length rounded up (see `_chunk_len`).
      backend, interpret: see `resolve`.

    Returns:
      (o [B, L, Hv, dv] in v.dtype, final_state [B, Hv, dk, dv] float32).
    """
    backend, interpret = resolve(backend, interpret)
    lib = tpu if backend == "tpu" else gpu
    b, length, hk, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    scale = dk**-0.5 if scale is None else float(scale)
    c = _chunk_len(length, chunk_size, backend)
    n = -(-length // c)
    pad = n * c - length

    def chunked(x: jax.Array) -> jax.Array:  # [B, L, H, ...] -> [B, H, N, C, ...], zero-padded
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = jnp.moveaxis(x, 1, 2)
        return x.reshape(*x.shape[:2], n, c, *x.shape[3:])

    # q, k, v keep their dtype (the kernels upcast each block after loading it: half the HBM traffic for bf16);
    # the gates are float32 from here on.
    g, beta = g.astype(_F32), beta.astype(_F32)
    gcum = jnp.cumsum(chunked(g), axis=-1)
    seg, first, last = _segment_rows(segment_ids, b, n, c, pad)
    s0 = jnp.zeros((b, hv, dk, dv), _F32) if initial_state is None else initial_state.astype(_F32)
    op = _make_op(lib, scale, interpret)
    o, s_final = op(chunked(q), chunked(k), chunked(v), gcum, chunked(beta), seg, first, last, s0)
    o = jnp.moveaxis(o.reshape(b, hv, n * c, dv), 1, 2)[:, :length]
    return o.astype(v.dtype), s_final


def gated_delta_rule_step_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
    *,
    scale: float | None = None,
    backend: str | None = None,
    interpret: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """Single-token decode step with the Pallas kernel. Same contract as `gated_delta_rule_step`.

    q, k [B, Hk, dk]; v [B, Hv, dv]; g, beta [B, Hv]; state [B, Hv, dk, dv]. Returns (o [B, Hv, dv] in v.dtype,
    new state float32). Forward only (decoding is not differentiated).
    """
    backend, interpret = resolve(backend, interpret)
    lib = tpu if backend == "tpu" else gpu
    dk = q.shape[-1]
    scale = dk**-0.5 if scale is None else float(scale)
    o, s = lib.decode(
        q[..., None], k[..., None], v[:, :, None],
        g.astype(_F32)[..., None, None], beta.astype(_F32)[..., None, None], state.astype(_F32),
        scale=scale, interpret=interpret,
    )
    return o[:, :, 0].astype(v.dtype), s
