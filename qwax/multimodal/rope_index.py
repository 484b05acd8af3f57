"""Multimodal rotary positions (T, H, W rows) of a prompt, as transformers' `get_rope_index` for Qwen3.5.

Walking each row's real tokens (padding removed), a run of n text tokens takes positions pos..pos+n-1 on all three
rows; a run of vision placeholders with merged grid (t, h', w') takes T = pos + frame, H = pos + row, W = pos + col
in raster order, then advances pos by max(h', w'). Videos are split into one grid per temporal patch first (their
frames are separated by timestamp text). rope_delta = max position + 1 - number of real tokens: while decoding,
a row's next token sits at position (tokens so far) + delta on all three rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2


def token_types(input_ids: np.ndarray, image_token_id: int, video_token_id: int) -> np.ndarray:
    """[B, L] int: 0 text, 1 image placeholder, 2 video placeholder (transformers' mm_token_type_ids)."""
    ids = np.asarray(input_ids)
    return np.where(ids == image_token_id, IMAGE, np.where(ids == video_token_id, VIDEO, TEXT)).astype(np.int32)


def _grids(grid_thw: Any, name: str) -> np.ndarray:
    if grid_thw is None:
        return np.zeros((0, 3), np.int64)
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or not np.issubdtype(grid.dtype, np.integer) or (grid < 1).any():
        raise ValueError(f"{name} must be a positive integer array [num_items, 3] of (t, h, w), got {grid.dtype} "
                         f"{tuple(grid.shape)}")
    return grid.astype(np.int64)


def rope_index(input_ids: Any, attention_mask: Any = None, image_grid_thw: Any = None, video_grid_thw: Any = None,
               *, image_token_id: int, video_token_id: int, spatial_merge_size: int = 2
               ) -> tuple[np.ndarray, np.ndarray]:
    """positions [3, B, L] int32 (0 at padding) and rope_delta [B] int32.

    Grids are consumed in order over the batch (row 0's images first). Raises ValueError when a run of
    placeholders does not match its grid's token count t*h*w/merge^2, or when there are more runs than grids.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
    b, l = ids.shape
    mask = np.ones((b, l), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    types = token_types(ids, image_token_id, video_token_id)
    m = spatial_merge_size
    images = _grids(image_grid_thw, "image_grid_thw")
    videos = _grids(video_grid_thw, "video_grid_thw")
    videos = np.repeat(videos, videos[:, 0], axis=0)  # one grid per temporal patch
    videos[:, 0] = 1
    queues = {IMAGE: list(images), VIDEO: list(videos)}
    used = {IMAGE: 0, VIDEO: 0}
    names = {IMAGE: "image", VIDEO: "video frame"}

    positions = np.zeros((3, b, l), np.int64)
    deltas = np.zeros((b,), np.int64)
    for row in range(b):
        kinds = types[row][mask[row]]
        n = kinds.size
        out = np.zeros((3, n), np.int64)
        pos, i = 0, 0
        while i < n:
            j = i
            while j < n and kinds[j] == kinds[i]:
                j += 1
            kind = int(kinds[i])
            if kind == TEXT:
                out[:, i:j] = pos + np.arange(j - i)
                pos += j - i
            else:
                if used[kind] >= len(queues[kind]):
                    raise ValueError(f"row {row}: {names[kind]} placeholder run at tokens {i}..{j - 1} has no grid "
                                     f"left ({len(queues[kind])} {names[kind]} grid(s) given)")
                t, h, w = (int(v) for v in queues[kind][used[kind]])
                used[kind] += 1
                if h % m or w % m:
                    raise ValueError(f"{names[kind]} grid {[t, h, w]}: h and w must be multiples of the merge size {m}")
                hh, ww = h // m, w // m
                if j - i != t * hh * ww:
                    raise ValueError(f"row {row}: {names[kind]} placeholder run at tokens {i}..{j - 1} has {j - i} "
                                     f"tokens but its grid {[t, h, w]} gives t*h*w/{m * m} = {t * hh * ww}")
                tt, rr, cc = np.meshgrid(np.arange(t), np.arange(hh), np.arange(ww), indexing="ij")
                out[0, i:j] = pos + tt.reshape(-1)
                out[1, i:j] = pos + rr.reshape(-1)
                out[2, i:j] = pos + cc.reshape(-1)
                pos += max(hh, ww)
            i = j
        positions[:, row, mask[row]] = out
        deltas[row] = (out.max() + 1 if n else 0) - n
    return positions.astype(np.int32), deltas.astype(np.int32)
