"""Gated delta rule (Gated DeltaNet's token mixer): public op, shape checks and dispatch to implementations.

Implementations:
  "reference": per-token `lax.scan` (reference.py), the oracle.
  "xla":       chunked form with all intra-chunk work batched over chunks (xla.py); fastest on the CPU.
  "auto":      the best available for the current backend (currently "xla" everywhere).
"""

from __future__ import annotations

import jax

from qwax.pallas_kernels.gated_delta_rule.reference import gated_delta_rule_reference, gated_delta_rule_step
from qwax.pallas_kernels.gated_delta_rule.xla import gated_delta_rule_xla

__all__ = ["gated_delta_rule", "gated_delta_rule_step", "IMPLS"]

IMPLS = ("auto", "reference", "xla")


def _check_shape(name: str, x: jax.Array, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(x.shape) != expected:
        raise ValueError(f"{name} must have shape {meaning} = {expected}, found {tuple(x.shape)}")


def _validate(q, k, v, g, beta, initial_state, segment_ids, chunk_size) -> None:
    if q.ndim != 4:
        raise ValueError(f"q must have shape [B, L, Hk, dk], found {tuple(q.shape)}")
    b, length, hk, dk = q.shape
    _check_shape("k", k, (b, length, hk, dk), "[B, L, Hk, dk] like q")
    if v.ndim != 4 or v.shape[:2] != (b, length):
        raise ValueError(f"v must have shape [B, L, Hv, dv] with B, L = {(b, length)} from q, found {tuple(v.shape)}")
    hv, dv = v.shape[2], v.shape[3]
    if hv % hk:
        raise ValueError(f"v's head count Hv = {hv} must be a multiple of q/k's head count Hk = {hk}")
    _check_shape("g", g, (b, length, hv), "[B, L, Hv]")
    _check_shape("beta", beta, (b, length, hv), "[B, L, Hv]")
    if initial_state is not None:
        _check_shape("initial_state", initial_state, (b, hv, dk, dv), "[B, Hv, dk, dv]")
    if segment_ids is not None:
        _check_shape("segment_ids", segment_ids, (b, length), "[B, L]")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, found {chunk_size!r}")


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
    chunk_size: int = 64,
    impl: str = "auto",
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
      chunk_size: chunk length of the chunked implementations.
      impl: one of IMPLS.

    Returns:
      (o [B, L, Hv, dv] in v.dtype, final_state [B, Hv, dk, dv] float32). Internal math is float32.
    """
    _validate(q, k, v, g, beta, initial_state, segment_ids, chunk_size)
    if impl == "auto":
        impl = "xla"
    kwargs = dict(scale=scale, initial_state=initial_state, segment_ids=segment_ids)
    if impl == "reference":
        return gated_delta_rule_reference(q, k, v, g, beta, **kwargs)
    if impl == "xla":
        return gated_delta_rule_xla(q, k, v, g, beta, chunk_size=chunk_size, **kwargs)
    raise ValueError(f"impl must be one of {IMPLS}, found {impl!r}")
