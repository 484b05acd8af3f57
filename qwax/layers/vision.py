"""The Qwen3.5 vision tower (docs/model.md, Vision tower): patches -> ViT blocks -> 2x2 merger.

pixel_values holds one row of C*T*P*P values per patch (channel, time, y, x), rows in merge-block order
(frame, block_row, block_col, in_row, in_col). The tower adds a learned position table sampled bilinearly onto each
grid, runs pre-LN blocks whose non-causal attention stays inside each frame (2D axial rotary over the whole head),
and merges each 2x2 block of patches into one token of the language model's width.

Everything that depends on the grids (position-table taps, rotary positions, which patches share a frame) is
computed with numpy from concrete `grid_thw`, so the tower can be jitted with the grids as a static argument.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwax.options import RunOptions

_ACTIVATIONS = {
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower of a multimodal Qwen3.5 checkpoint (its `vision_config`); defaults are the published ones."""

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        def bad(key: str, expected: str) -> ValueError:
            return ValueError(f"vision config field {key!r} = {getattr(self, key)!r}: expected {expected}")

        if self.hidden_size % self.num_heads:
            raise bad("hidden_size", f"a multiple of num_heads={self.num_heads}")
        if self.head_dim % 4:
            raise bad("num_heads", "a head dim divisible by 4 (2D axial rotary)")
        side = math.isqrt(self.num_position_embeddings)
        if side * side != self.num_position_embeddings:
            raise bad("num_position_embeddings", "a square number (a side x side table)")
        if self.hidden_act not in _ACTIVATIONS:
            raise bad("hidden_act", f"one of {sorted(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    def replace(self, **changes: Any) -> "VisionConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], **overrides: Any) -> "VisionConfig":
        """Read a transformers `vision_config` dict."""
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta"}
        kwargs: dict[str, Any] = {k: cfg[k] for k in names if cfg.get(k) is not None}
        for key in ("patch_size", "temporal_patch_size"):
            if isinstance(kwargs.get(key), (list, tuple)):
                values = set(kwargs[key])
                if len(values) != 1:
                    raise ValueError(f"vision config field {key!r} = {kwargs[key]!r}: only square patches are supported")
                kwargs[key] = values.pop()
        rope = cfg.get("rope_parameters") or {}
        kwargs["rope_theta"] = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self, model_type: str) -> dict[str, Any]:
        """The transformers `vision_config` dict; model_type 'qwen3_5_vision' or 'qwen3_5_moe_vision'."""
        return {
            "model_type": model_type, "depth": self.depth, "hidden_size": self.hidden_size,
            "hidden_act": self.hidden_act, "intermediate_size": self.intermediate_size, "num_heads": self.num_heads,
            "in_channels": self.in_channels, "patch_size": self.patch_size,
            "spatial_merge_size": self.spatial_merge_size, "temporal_patch_size": self.temporal_patch_size,
            "out_hidden_size": self.out_hidden_size, "num_position_embeddings": self.num_position_embeddings,
            "initializer_range": self.initializer_range,
            "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta},
        }


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], cfg: VisionConfig, opts: RunOptions,
           init: str | float = "normal") -> nnx.Param:
    """A replicated parameter (the tower is small next to the language model; no logical axes are sharded)."""
    if init == "normal":
        value = cfg.initializer_range * jax.random.normal(rngs.params(), shape, jnp.float32)
    else:
        value = jnp.full(shape, float(init), jnp.float32)
    return nnx.Param(value.astype(opts.param_dtype), logical_axes=(None,) * len(shape))


class Dense(nnx.Module):
    """y = x @ kernel + bias; kernel [in, out] (torch's weight transposed), bias [out]."""

    def __init__(self, din: int, dout: int, *, cfg: VisionConfig, opts: RunOptions, rngs: nnx.Rngs):
        self.kernel = _param(rngs, (din, dout), cfg, opts)
        self.bias = _param(rngs, (dout,), cfg, opts, init=0.0)
        self.dtype = opts.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out]."""
        return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype)) + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
    """Standard LayerNorm with weight and bias (eps 1e-6), normalised in float32."""

    def __init__(self, dim: int, *, cfg: VisionConfig, opts: RunOptions, rngs: nnx.Rngs, eps: float = 1e-6):
        self.weight = _param(rngs, (dim,), cfg, opts, init=1.0)
        self.bias = _param(rngs, (dim,), cfg, opts, init=0.0)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x.astype(jnp.float32)
        mean = jnp.mean(y, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(y - mean), axis=-1, keepdims=True)
        y = (y - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------- grid metadata
@dataclass(frozen=True)
class GridLayout:
    """Per-patch constants of a list of grids, in pixel_values row order (numpy, built once per grid tuple).

    pos_index, pos_weight [N, 4]: bilinear taps into the flattened position table and their weights;
    rows, cols [N]: patch row / column inside its frame (rotary positions);
    frames: tuples (patches per frame, [F, S] row indices) grouping the frames of equal size S.
    """

    pos_index: np.ndarray
    pos_weight: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    frames: tuple[tuple[int, np.ndarray], ...]
    num_patches: int


def check_grids(grid_thw: Any, cfg: VisionConfig, name: str = "image_grid_thw") -> tuple[tuple[int, int, int], ...]:
    """Validate a [N, 3] (t, h, w) grid array and return it as a tuple of int triples."""
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array [num_items, 3] of (t, h, w) patch counts, got "
                         f"{grid.dtype} {tuple(grid.shape)}")
    m = cfg.spatial_merge_size
    for i, (t, h, w) in enumerate(grid.tolist()):
        if t < 1 or h < 1 or w < 1 or h % m or w % m:
            raise ValueError(f"{name}[{i}] = {[t, h, w]}: expected t >= 1 and h, w positive multiples of the "
                             f"spatial merge size {m}")
    return tuple(tuple(int(v) for v in row) for row in grid.tolist())


@functools.lru_cache(maxsize=64)
def grid_layout(grids: tuple[tuple[int, int, int], ...], side: int, merge: int) -> GridLayout:
    """The GridLayout of `grids` for a side x side position table and merge size `merge`."""
    idx, wgt, rows, cols, frame_starts, frame_sizes = [], [], [], [], [], []
    start = 0
    for t, h, w in grids:
        # Patch (row, col) of each pixel_values row of one frame, in merge-block order.
        br, bc, ir, ic = np.meshgrid(np.arange(h // merge), np.arange(w // merge), np.arange(merge),
                                     np.arange(merge), indexing="ij")
        row = (br * merge + ir).reshape(-1)
        col = (bc * merge + ic).reshape(-1)

        def taps(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
            # align_corners=True: source coordinate index * (side - 1) / (size - 1), computed in float32.
            src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
            lo = np.floor(src)
            tap = lo[:, None] + np.arange(2, dtype=np.float32)
            weight = np.clip(np.float32(1) - np.abs(src[:, None] - tap), 0, None).astype(np.float32)
            return np.clip(tap.astype(np.int64), 0, side - 1), weight

        rt, rw = taps(row, h)
        ct, cw = taps(col, w)
        frame_idx = (rt[:, :, None] * side + ct[:, None, :]).reshape(-1, 4)
        frame_wgt = (rw[:, :, None] * cw[:, None, :]).reshape(-1, 4)
        for _ in range(t):
            idx.append(frame_idx), wgt.append(frame_wgt), rows.append(row), cols.append(col)
            frame_starts.append(start), frame_sizes.append(h * w)
            start += h * w
    frames = []
    starts, sizes = np.asarray(frame_starts), np.asarray(frame_sizes)
    for size in sorted(set(frame_sizes)):
        sel = starts[sizes == size]
        frames.append((size, sel[:, None] + np.arange(size)[None, :]))
    return GridLayout(pos_index=np.concatenate(idx), pos_weight=np.concatenate(wgt), rows=np.concatenate(rows),
                      cols=np.concatenate(cols), frames=tuple(frames), num_patches=start)


# ----------------------------------------------------------------------------------------------------- layers
def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class VisionAttention(nnx.Module):
    """Non-causal multi-head attention over the patches of one frame. qkv [D, 3D] rows [q | k | v], proj [D, D]."""

    def __init__(self, cfg: VisionConfig, opts: RunOptions, *, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = Dense(cfg.hidden_size, 3 * cfg.hidden_size, cfg=cfg, opts=opts, rngs=rngs)
        self.proj = Dense(cfg.hidden_size, cfg.hidden_size, cfg=cfg, opts=opts, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x [F, S, D] (F frames of S patches), cos/sin [F, S, head_dim] -> [F, S, D]."""
        f, s, _ = x.shape
        qkv = self.qkv(x).reshape(f, s, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        q = (q.astype(jnp.float32) * cos + _rotate_half(q.astype(jnp.float32)) * sin).astype(x.dtype)
        k = (k.astype(jnp.float32) * cos + _rotate_half(k.astype(jnp.float32)) * sin).astype(x.dtype)
        scores = jnp.einsum("fqhd,fkhd->fhqk", q, k) * (self.head_dim ** -0.5)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("fhqk,fkhd->fqhd", probs, v).reshape(f, s, -1)
        return self.proj(out)


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, opts: RunOptions, *, rngs: nnx.Rngs):
        self.linear_fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, cfg=cfg, opts=opts, rngs=rngs)
        self.linear_fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, cfg=cfg, opts=opts, rngs=rngs)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nnx.Module):
    """Pre-LN block: x += attn(norm1(x)) within each frame; x += mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig, opts: RunOptions, *, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(cfg.hidden_size, cfg=cfg, opts=opts, rngs=rngs)
        self.norm2 = LayerNorm(cfg.hidden_size, cfg=cfg, opts=opts, rngs=rngs)
        self.attn = VisionAttention(cfg, opts, rngs=rngs)
        self.mlp = VisionMLP(cfg, opts, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, layout: GridLayout) -> jax.Array:
        """x [N, D]; cos/sin [N, head_dim]."""
        h = self.norm1(x)
        if len(layout.frames) == 1:  # every frame has the same size: a reshape, no gather
            size = layout.frames[0][0]
            shape = (-1, size)
            attn = self.attn(h.reshape(*shape, h.shape[-1]), cos.reshape(*shape, cos.shape[-1]),
                             sin.reshape(*shape, sin.shape[-1])).reshape(h.shape)
        else:
            attn = jnp.zeros_like(h)
            for _, index in layout.frames:
                out = self.attn(h[index], cos[index], sin[index])
                attn = attn.at[index.reshape(-1)].set(out.reshape(-1, h.shape[-1]))
        x = x + attn
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """LayerNorm per patch, concatenate each merge block (4 patches), fc1, exact GELU, fc2 -> out_hidden_size."""

    def __init__(self, cfg: VisionConfig, opts: RunOptions, *, rngs: nnx.Rngs):
        width = cfg.hidden_size * cfg.merge_unit
        self.norm = LayerNorm(cfg.hidden_size, cfg=cfg, opts=opts, rngs=rngs)
        self.linear_fc1 = Dense(width, width, cfg=cfg, opts=opts, rngs=rngs)
        self.linear_fc2 = Dense(width, cfg.out_hidden_size, cfg=cfg, opts=opts, rngs=rngs)
        self.width = width

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [N, D] -> [N / merge_unit, out_hidden_size]."""
        x = self.norm(x).reshape(-1, self.width)
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


class VisionModel(nnx.Module):
    """Weights: patch_embed [C*T*P*P, D] + bias (the Conv3d as a Linear), pos_embed [side^2, D], blocks, merger."""

    def __init__(self, cfg: VisionConfig, opts: RunOptions, *, rngs: nnx.Rngs):
        self.config = cfg
        self.patch_embed = Dense(cfg.patch_dim, cfg.hidden_size, cfg=cfg, opts=opts, rngs=rngs)
        self.pos_embed = _param(rngs, (cfg.num_position_embeddings, cfg.hidden_size), cfg, opts)
        self.blocks = nnx.List([VisionBlock(cfg, opts, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, opts, rngs=rngs)

    def rotary(self, layout: GridLayout) -> tuple[jax.Array, jax.Array]:
        """cos, sin [N, head_dim]: angles [row * inv_freq | col * inv_freq], duplicated (rotate-half layout)."""
        quarter = self.config.head_dim // 2
        inv_freq = 1.0 / (self.config.rope_theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
        rows = jnp.asarray(layout.rows, jnp.float32)[:, None] * inv_freq
        cols = jnp.asarray(layout.cols, jnp.float32)[:, None] * inv_freq
        angles = jnp.concatenate([rows, cols, rows, cols], axis=-1)
        return jnp.cos(angles), jnp.sin(angles)

    def __call__(self, pixel_values: jax.Array, grid_thw: Any) -> jax.Array:
        """pixel_values [N, C*T*P*P]; grid_thw [num_items, 3] concrete ints -> features [N / merge_unit, out].

        N must equal sum(t * h * w) over the grids.
        """
        cfg = self.config
        grids = check_grids(grid_thw, cfg, "grid_thw")
        layout = grid_layout(grids, math.isqrt(cfg.num_position_embeddings), cfg.spatial_merge_size)
        if tuple(pixel_values.shape) != (layout.num_patches, cfg.patch_dim):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, expected "
                             f"({layout.num_patches}, {cfg.patch_dim}): sum(t*h*w) over grids {list(grids)} rows of "
                             f"C*T*P*P = {cfg.patch_dim} values")
        x = self.patch_embed(pixel_values)
        table = self.pos_embed[...].astype(x.dtype)
        pos = jnp.sum(table[layout.pos_index] * jnp.asarray(layout.pos_weight, x.dtype)[:, :, None], axis=1)
        x = x + pos
        cos, sin = self.rotary(layout)
        for block in self.blocks:
            x = block(x, cos, sin, layout)
        return self.merger(x)


def vision_features(model: VisionModel, pixel_values: Any, grid_thw: Any) -> jax.Array:
    """Run the tower jitted once per grid tuple (the grids are static: they set every shape)."""
    grids = check_grids(grid_thw, model.config, "grid_thw")
    graphdef, params = nnx.split(model)
    return _vision_jit(graphdef, params, jnp.asarray(pixel_values), grids)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _vision_jit(graphdef: nnx.GraphDef, params: nnx.State, pixel_values: jax.Array,
                grids: Sequence[tuple[int, int, int]]) -> jax.Array:
    return nnx.merge(graphdef, params)(pixel_values, np.asarray(grids, np.int64).reshape(-1, 3))
