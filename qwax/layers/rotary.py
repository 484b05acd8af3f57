"""Partial and multimodal (interleaved M-RoPE) rotary position embeddings of the text model.

Only the first `rotary_dim = partial_rotary_factor * head_dim` dims of each head rotate (rotate-half pairs
(j, j + rotary_dim/2)); the rest pass through. Qwen3.5 builds the angle of frequency j from the T, H or W position
row chosen by j % 3 (sections `mrope_section`); for text all three rows are equal and this reduces to 1D RoPE.
Long-context scaling (`cfg.rope_scaling`: yarn, linear, llama3) changes the inverse frequencies and multiplies cos
and sin by an attention factor (qwax.layers.rope_scaling); the rotation itself is unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwax.config import QwaxConfig
from qwax.layers.rope_scaling import rope_frequencies


def mrope_axis_of_frequency(cfg: QwaxConfig) -> jax.Array:
    """[rotary_dim / 2] int: which position row (0=T, 1=H, 2=W) drives each frequency (interleaved layout)."""
    n = cfg.rotary_dim // 2
    axis = [0] * n
    if cfg.mrope_section:
        # Frequencies 1, 4, 7, ... take H and 2, 5, 8, ... take W, up to 3 * section; the rest keep T.
        for row, offset in ((1, 1), (2, 2)):
            for j in range(offset, min(3 * cfg.mrope_section[row], n), 3):
                axis[j] = row
    return jnp.asarray(axis, jnp.int32)


def rotary_cos_sin(positions: jax.Array, cfg: QwaxConfig, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, L, rotary_dim] in `dtype` (built in float32, then cast, as the reference does).

    positions: [B, L] text positions, or [3, B, L] (T, H, W) multimodal positions. Under YaRN cos and sin are both
    multiplied by its attention factor (in float32, before the cast), so q.k of the rotated dims scales by its
    square.
    """
    if positions.ndim == 2:
        positions = jnp.broadcast_to(positions[None], (3, *positions.shape))
    inv_freq, scale = rope_frequencies(cfg.rope_theta, cfg.rotary_dim, cfg.rope_scaling)
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [3, B, L, rot/2]
    if cfg.mrope_section and cfg.mrope_interleaved:
        rows = mrope_axis_of_frequency(cfg)[None, None, None, :]  # [1, 1, 1, rot/2]
        angles = jnp.take_along_axis(angles, rows, axis=0)[0]  # a gather, exact on every backend
    else:
        angles = angles[0]
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.astype(dtype), sin.astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first cos.shape[-1] dims of each head. x [B, L, N, D]; cos, sin [B, L, rot]."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1).astype(x.dtype)
