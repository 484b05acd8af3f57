"""Rotary inverse frequencies and the cos/sin attention factor of each rope type (qwax.config.RopeScaling).

`rope_frequencies(theta, dim, scaling) -> (inv_freq [dim / 2] float32, attention_factor)`, where `dim` is the
rotary dim (partial rotary: only those dims rotate). They depend on the static config alone, so they are computed
once per trace on the host, in numpy float32 and in transformers' order of operations, the same on every backend
(an accelerator's float32 pow may be an ulp or more off, and the angle position * inv_freq multiplies that error
by up to a million at long context). They equal transformers' bit for bit for rotary dims up to 64; beyond, an odd
frequency differs by an ulp, where torch's vectorised float32 pow is an ulp off the true power and this is not.

Notation: L0 = original_max_position_embeddings (the pretraining length), s = factor, d = dim, and
theta_i = theta^(-2i / d) the unscaled inverse frequency of pair i, whose wavelength is 2 pi / theta_i.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from qwax.config import RopeScaling

_F32 = np.float32


def default_inverse_frequencies(theta: float, dim: int) -> np.ndarray:
    """[dim / 2] float32 theta^(-2i / dim), i = 0 .. dim/2 - 1: plain RoPE."""
    return _F32(1.0) / _powers(theta, dim)


def _powers(theta: float, dim: int) -> np.ndarray:
    """[dim / 2] float32 theta^(2i / dim) (the exponent rounded to float32 first, as the reference does)."""
    exponent = np.arange(0, dim, 2, dtype=_F32) / _F32(dim)
    # The float32 nearest the true power (via float64); torch's own float32 pow agrees to within an ulp.
    return (np.float64(theta) ** exponent.astype(np.float64)).astype(_F32)


def rope_frequencies(theta: float, dim: int, scaling: RopeScaling | None) -> tuple[np.ndarray, float]:
    """(inv_freq [dim / 2] float32, attention_factor): the angle of pair i at position p is p * inv_freq[i], and
    cos and sin are multiplied by attention_factor (1.0 except for yarn)."""
    if scaling is None:
        return default_inverse_frequencies(theta, dim), 1.0
    if scaling.rope_type in ("yarn", "llama3") and scaling.original_max_position_embeddings is None:
        raise ValueError(f"{scaling.rope_type} scaling needs original_max_position_embeddings (QwaxConfig fills in "
                         "its max_position_embeddings)")
    return _SCALERS[scaling.rope_type](theta, dim, scaling)


def _linear(theta: float, dim: int, s: RopeScaling) -> tuple[np.ndarray, float]:
    """Position interpolation: theta_i / s for every pair (positions squeezed s-fold into the trained range)."""
    return default_inverse_frequencies(theta, dim) / _F32(s.factor), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(s: RopeScaling) -> float:
    """The cos/sin multiplier of YaRN: `attention_factor` when given, else the ratio of the mscale terms when both
    mscale and mscale_all_dim are set (and non-zero), else 0.1 ln(s) + 1."""
    if s.attention_factor is not None:
        return s.attention_factor
    if s.mscale and s.mscale_all_dim:
        return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    return yarn_mscale(s.factor)


def _yarn(theta: float, dim: int, s: RopeScaling) -> tuple[np.ndarray, float]:
    """YaRN ("NTK-by-parts"): pairs that turn more than beta_fast times over L0 positions keep theta_i (they have
    seen every phase in pretraining), pairs turning fewer than beta_slow times are interpolated to theta_i / s, and
    a linear ramp over the pair index blends the two in between."""
    orig = s.original_max_position_embeddings

    def pair_turning(rotations: float) -> float:
        # The (fractional) dim index 2i at which theta_i makes `rotations` turns over L0 positions.
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_turning(s.beta_fast), pair_turning(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a one-step ramp instead of a division by zero
    ramp = np.clip((np.arange(dim // 2, dtype=_F32) - _F32(low)) / _F32(high - low), 0, 1)
    keep = _F32(1.0) - ramp  # weight of the pretrained frequency; the reference blends with this, not with ramp
    powers = _powers(theta, dim)
    extrapolated = _F32(1.0) / powers
    interpolated = _F32(1.0) / (_F32(s.factor) * powers)
    return interpolated * (_F32(1.0) - keep) + extrapolated * keep, yarn_attention_factor(s)


def _llama3(theta: float, dim: int, s: RopeScaling) -> tuple[np.ndarray, float]:
    """Llama 3.1: wavelengths above L0 / low_freq_factor are interpolated (theta_i / s), those below
    L0 / high_freq_factor kept, and in between theta_i is blended by how many times it turns over L0."""
    orig, low, high = s.original_max_position_embeddings, s.low_freq_factor, s.high_freq_factor
    inv = default_inverse_frequencies(theta, dim)
    low_wavelen, high_wavelen = _F32(orig / low), _F32(orig / high)
    # torch evaluates scalar / tensor as reciprocal(tensor) * scalar; so does this, to round the same way.
    wavelen = (_F32(1.0) / inv) * _F32(2 * math.pi)
    scaled = np.where(wavelen > low_wavelen, inv / _F32(s.factor), inv)
    turns = (_F32(1.0) / wavelen) * _F32(orig)  # how many times pair i turns over L0 positions
    smooth = (turns - _F32(low)) / _F32(high - low)
    blended = (_F32(1.0) - smooth) * scaled / _F32(s.factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, blended, scaled).astype(_F32), 1.0


_SCALERS: dict[str, Callable[[float, int, RopeScaling], tuple[np.ndarray, float]]] = {
    "linear": _linear, "yarn": _yarn, "llama3": _llama3,
}
