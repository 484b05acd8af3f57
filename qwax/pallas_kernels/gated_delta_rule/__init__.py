"""Gated delta rule (Gated DeltaNet's token mixer): public op, shape checks and dispatch to implementations.

Implementations:
  "reference": per-token `lax.scan` (reference.py), the oracle.
  "xla":       chunked form in plain JAX (xla.py); stores one state per chunk for autodiff.
  "pallas":    chunked Pallas kernels with a custom VJP (pallas.py; TPU kernels in tpu.py with their per-chunk math
               in chunk_math.py, Hopper Mosaic GPU kernels in gpu.py). On the CPU they run in interpret mode (slow: tests only).
  "auto":      "pallas" on TPU and Hopper GPUs, "xla" elsewhere (the CPU, other GPUs): `dispatch.resolve_impl`.

gated_delta_rule_step is the single-token decode step (the same recurrence, one token); it has a Pallas kernel
too (decode.py; "pallas"/"auto" as above; "xla" and "reference" both mean the jnp step).
"""

from __future__ import annotations

from typing import Any

import jax

from qwax.pallas_kernels.dispatch import op_impls, resolve_impl
from qwax.pallas_kernels.gated_delta_rule.pallas import gated_delta_rule_pallas, gated_delta_rule_step_pallas
from qwax.pallas_kernels.gated_delta_rule.reference import gated_delta_rule_reference, recurrent_step
from qwax.pallas_kernels.gated_delta_rule.xla import gated_delta_rule_xla
from qwax.pallas_kernels.platform import current_platform

__all__ = ["gated_delta_rule", "gated_delta_rule_step", "default_chunk_size", "IMPLS"]

IMPLS = op_impls("gated_delta_rule")

# Chunk length C when the caller gives none, per (implementation, platform). The Pallas kernels' natural block is
# 64 (a [64, 64] intra-chunk matrix is one MXU pass on TPU and one warpgroup-matmul tile on Hopper). On the CPU
# the XLA path is fastest at 32: its intra-chunk triangular work grows with C while the per-chunk state products
# stay fixed (`benchmarks/bench_gated_delta_rule.py --chunk-sizes 16,32,64,128` measures it; the README has the
# numbers). XLA on an accelerator keeps the kernels' block.
_DEFAULT_CHUNK = {("xla", "cpu"): 32}
_ACCELERATOR_CHUNK = 64


def default_chunk_size(impl: str = "auto", platform: str | None = None) -> int:
    """The chunk length `gated_delta_rule` uses when `chunk_size` is None.

    impl: one of IMPLS; platform: "cpu" | "gpu" | "tpu", default the current devices' platform.
    """
    resolved = resolve_impl("gated_delta_rule", impl, platform)
    return _DEFAULT_CHUNK.get((resolved, platform or current_platform()), _ACCELERATOR_CHUNK)


def _check_shape(name: str, x: jax.Array, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(x.shape) != expected:
        raise ValueError(f"{name} must have shape {meaning} = {expected}, found {tuple(x.shape)}")


def _validate_heads(
    q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, state: jax.Array | None,
    lead: str, state_name: str,
) -> None:
    """Checks q, k [*lead, Hk, dk], v [*lead, Hv, dv], g, beta [*lead, Hv], state [B, Hv, dk, dv].

    `lead` names the leading axes ("B, L" for a sequence, "B" for one token).
    """
    n_lead = len(lead.split(","))
    if q.ndim != n_lead + 2:
        raise ValueError(f"q must have shape [{lead}, Hk, dk], found {tuple(q.shape)}")
    *lead_shape, hk, dk = q.shape
    lead_shape = tuple(lead_shape)
    _check_shape("k", k, (*lead_shape, hk, dk), f"[{lead}, Hk, dk] like q")
    if v.ndim != n_lead + 2 or v.shape[:n_lead] != lead_shape:
        raise ValueError(f"v must have shape [{lead}, Hv, dv] with {lead} = {lead_shape} from q, found {tuple(v.shape)}")
    hv, dv = v.shape[-2:]
    if hv % hk:
        raise ValueError(f"v's head count Hv = {hv} must be a multiple of q/k's head count Hk = {hk}")
    _check_shape("g", g, (*lead_shape, hv), f"[{lead}, Hv]")
    _check_shape("beta", beta, (*lead_shape, hv), f"[{lead}, Hv]")
    if state is not None:
        _check_shape(state_name, state, (lead_shape[0], hv, dk, dv), "[B, Hv, dk, dv]")


def gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
    backend: str | None = None,
    interpret: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """Gated delta rule over a sequence.

    Per (batch, value head) with state S in R^{dk x dv}, for each token t:
    S <- exp(g_t) S;  u_t = beta_t (v_t - S^T k_t);  S <- S + k_t u_t^T;  o_t = scale * S^T q_t.

    Args:
      q, k: [B, L, Hk, dk], already L2-normalised.
      v: [B, L, Hv, dv]. Hv must be a multiple of Hk; value head j reads key head j // (Hv // Hk).
      g: [B, L, Hv] log decay (<= 0). beta: [B, L, Hv] write strength, usually in (0, 1).
      scale: multiplies the read; defaults to dk ** -0.5.
      initial_state: [B, Hv, dk, dv] or None (zeros). Applies to the first segment only.
      segment_ids: [B, L] ints or None. The state is reset to zero wherever the id changes from the previous
        position (packed documents).
      chunk_size: chunk length of the chunked implementations; None picks `default_chunk_size(impl)` (32 for
        the XLA path on the CPU, 64 for the Pallas kernels).
      impl: one of IMPLS.
      backend: impl="pallas" only: kernel family "tpu" | "gpu"; None follows `jax.default_backend()` (the TPU
        kernels on the CPU). Tests use it to run both families on the CPU.
      interpret: impl="pallas" only: None means interpret mode on the CPU (`pltpu.InterpretParams()` for the TPU
        kernels, `plgpu.InterpretGPUParams()` for the Mosaic GPU kernels) and compiled kernels elsewhere; anything
        else is passed to the kernels.

    Returns:
      (o [B, L, Hv, dv] in v.dtype, final_state [B, Hv, dk, dv] float32). Internal math is float32.
    """
    _validate_heads(q, k, v, g, beta, initial_state, "B, L", "initial_state")
    if segment_ids is not None:
        _check_shape("segment_ids", segment_ids, q.shape[:2], "[B, L]")
    if chunk_size is None:
        chunk_size = default_chunk_size(impl)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, found {chunk_size!r}")
    impl = resolve_impl("gated_delta_rule", impl)
    if impl == "pallas" and chunk_size % 8:
        raise ValueError(f"chunk_size must be a multiple of 8 (TPU sublanes) for impl='pallas', found {chunk_size}")
    kwargs = dict(scale=scale, initial_state=initial_state, segment_ids=segment_ids)
    if impl == "reference":
        return gated_delta_rule_reference(q, k, v, g, beta, **kwargs)
    if impl == "xla":
        return gated_delta_rule_xla(q, k, v, g, beta, chunk_size=chunk_size, **kwargs)
    return gated_delta_rule_pallas(
        q, k, v, g, beta, chunk_size=chunk_size, backend=backend, interpret=interpret, **kwargs
    )


def gated_delta_rule_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
    *,
    scale: float | None = None,
    impl: str = "auto",
    backend: str | None = None,
    interpret: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """One token of the gated delta rule (single-token decode), the same recurrence as `gated_delta_rule`.

    Args:
      q, k: [B, Hk, dk], already L2-normalised. v: [B, Hv, dv]. g, beta: [B, Hv].
      state: [B, Hv, dk, dv], the running state (float32).
      scale: multiplies the read; defaults to dk ** -0.5.
      impl: one of IMPLS; "pallas" is a decode kernel (forward only), "xla" and "reference" the jnp step.
      backend, interpret: as in `gated_delta_rule` (impl="pallas" only).

    Returns:
      (o [B, Hv, dv] in v.dtype, new_state [B, Hv, dk, dv] float32).
    """
    _validate_heads(q, k, v, g, beta, state, "B", "state")
    if resolve_impl("gated_delta_rule", impl) == "pallas":
        return gated_delta_rule_step_pallas(q, k, v, g, beta, state, scale=scale, backend=backend,
                                            interpret=interpret)
    return recurrent_step(q, k, v, g, beta, state, scale=scale)
