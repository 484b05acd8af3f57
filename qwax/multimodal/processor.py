"""Image and video preprocessing for Qwen3.5 (numpy + PIL, no torch), and placeholder expansion of the prompt text.

Images: convert to RGB, resize (PIL bicubic) to the nearest size whose sides are multiples of patch * merge and
whose area lies in [min_pixels, max_pixels], scale to [0, 1], normalise with mean / std, repeat each image over the
temporal patch, and cut into rows of C * T * P * P values in merge-block order. The result equals transformers'
`Qwen2VLImageProcessorPil` (what `Qwen3VLProcessor` uses without torchvision).

Videos ([T, H, W, C] frames already sampled): the same per frame with the video resize rule (all frames share the
size), frames padded to a multiple of the temporal patch by repeating the last, rows in (time patch, block row,
block col, in row, in col) order as transformers' `Qwen3VLVideoProcessor`. Its torchvision resize is not bitwise
equal to PIL's; everything after the resize is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                 num_frames: int | None = None, temporal_factor: int = 2) -> tuple[int, int]:
    """(h, w): multiples of `factor` near (height, width) with h * w (times the frame count, for videos) in
    [min_pixels, max_pixels], keeping the aspect ratio as closely as possible."""
    frames = 1
    if num_frames is not None:  # the video rule: small frames are first scaled up to one factor, frames count
        if num_frames < temporal_factor:
            raise ValueError(f"a video needs at least temporal_patch_size={temporal_factor} frames, got {num_frames}")
        if height < factor or width < factor:
            scale = max(factor / height, factor / width)
            height, width = int(height * scale), int(width * scale)
        frames = num_frames
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(frames / temporal_factor) * temporal_factor if num_frames is not None else 1
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _as_rgb_uint8(image: Any) -> np.ndarray:
    """A PIL image or an [H, W, C] / [H, W] array (uint8, or float in [0, 1]) -> [H, W, 3] uint8."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # channels first
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.min() >= 0 and arr.max() <= 1:
            arr = arr * 255
        arr = arr.astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"an image must be [height, width, channels], got shape {arr.shape}")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(arr.shape[-1])
    if mode is None:
        raise ValueError(f"an image must have 1, 3 or 4 channels, got {arr.shape[-1]}")
    return np.asarray(Image.fromarray(arr[..., 0] if mode == "L" else arr, mode=mode).convert("RGB"))


@dataclass(frozen=True)
class VisionProcessor:
    """Settings of Qwen3.5's image (and, with `video=True` defaults, video) processor: preprocessor_config.json."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536  # size["shortest_edge"]
    max_pixels: int = 16777216  # size["longest_edge"]
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | str | os.PathLike) -> "VisionProcessor":
        """From a preprocessor_config.json / video_preprocessor_config.json dict or file."""
        if not isinstance(cfg, Mapping):
            with open(cfg) as f:
                cfg = json.load(f)
        size = cfg.get("size") or {}
        kwargs = {k: cfg[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor") if k in cfg}
        for key in ("image_mean", "image_std"):
            if key in cfg:
                value = cfg[key]
                kwargs[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,) * 3
        kwargs["min_pixels"] = cfg.get("min_pixels", size.get("shortest_edge", cls.min_pixels))
        kwargs["max_pixels"] = cfg.get("max_pixels", size.get("longest_edge", cls.max_pixels))
        return cls(**kwargs)

    @classmethod
    def video_defaults(cls) -> "VisionProcessor":
        """transformers' Qwen3VLVideoProcessor defaults (per-video pixel budget over all frames)."""
        return cls(min_pixels=128 * 32 * 32, max_pixels=32 * 32 * 768)

    def replace(self, **changes: Any) -> "VisionProcessor":
        return dataclasses.replace(self, **changes)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def _normalise(self, frames: np.ndarray) -> np.ndarray:
        """[..., H, W, C] uint8 -> [..., C, H, W] float32: x / 255, then (x - mean) / std, as transformers."""
        x = (frames.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.moveaxis(x, -1, -3)

    def _patchify(self, frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """[T, C, H, W] float32 (T a multiple of the temporal patch) -> rows [t*h*w, C*Tp*P*P], grid (t, h, w)."""
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        t, c, height, width = frames.shape
        gt, gh, gw = t // tp, height // p, width // p
        x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        # -> (time patch, block row, block col, in row, in col, channel, frame in patch, y, x)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return np.ascontiguousarray(x).reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)

    def _resize(self, frame: np.ndarray, height: int, width: int) -> np.ndarray:
        from PIL import Image

        if frame.shape[:2] == (height, width):
            return frame
        return np.asarray(Image.fromarray(frame).resize((width, height), resample=Image.Resampling.BICUBIC))

    def preprocess_images(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        """images (PIL or [H, W, C] arrays) -> {pixel_values [sum t*h*w, C*T*P*P] float32, image_grid_thw [n, 3]}."""
        rows, grids = [], []
        for image in images:
            rgb = _as_rgb_uint8(image)
            h, w = smart_resize(rgb.shape[0], rgb.shape[1], self.factor, self.min_pixels, self.max_pixels)
            x = self._normalise(self._resize(rgb, h, w))
            x = np.broadcast_to(x[None], (self.temporal_patch_size, *x.shape))
            patches, grid = self._patchify(x)
            rows.append(patches)
            grids.append(grid)
        return {"pixel_values": np.concatenate(rows), "image_grid_thw": np.asarray(grids, np.int64)}

    def preprocess_videos(self, videos: Sequence[Any]) -> dict[str, np.ndarray]:
        """videos ([T, H, W, C] uint8 frames each) -> {pixel_values_videos, video_grid_thw [n, 3]}."""
        rows, grids = [], []
        for video in videos:
            frames = np.stack([_as_rgb_uint8(f) for f in video])
            t = frames.shape[0]
            h, w = smart_resize(frames.shape[1], frames.shape[2], self.factor, self.min_pixels, self.max_pixels,
                                num_frames=t, temporal_factor=self.temporal_patch_size)
            x = self._normalise(np.stack([self._resize(f, h, w) for f in frames]))
            if pad := -t % self.temporal_patch_size:
                x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
            patches, grid = self._patchify(x)
            rows.append(patches)
            grids.append(grid)
        return {"pixel_values_videos": np.concatenate(rows), "video_grid_thw": np.asarray(grids, np.int64)}


def frame_timestamps(frame_indices: Sequence[int], fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Seconds of each temporal patch: the mean time of its first and last frame (indices padded with the last)."""
    idx = list(frame_indices)
    if len(idx) % temporal_patch_size:
        idx += [idx[-1]] * (temporal_patch_size - len(idx) % temporal_patch_size)
    times = [i / fps for i in idx]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def expand_placeholders(texts: Sequence[str], image_grid_thw: Any = None, video_grid_thw: Any = None,
                        video_timestamps: Sequence[Sequence[float]] | None = None, merge_size: int = 2) -> list[str]:
    """Replace each `<|image_pad|>` by t*h*w/merge^2 copies, and each `<|video_pad|>` by, per temporal patch,
    `<{seconds:.1f} seconds><|vision_start|>` + `<|video_pad|>` x (h*w/merge^2) + `<|vision_end|>`.

    Images and videos are consumed in order over the batch. Raises ValueError when the counts disagree.
    """
    images = [] if image_grid_thw is None else [tuple(int(v) for v in g) for g in np.asarray(image_grid_thw)]
    videos = [] if video_grid_thw is None else [tuple(int(v) for v in g) for g in np.asarray(video_grid_thw)]
    stamps = list(video_timestamps or [])
    unit = merge_size ** 2
    n_img = sum(t.count(IMAGE_PAD) for t in texts)
    n_vid = sum(t.count(VIDEO_PAD) for t in texts)
    if n_img != len(images):
        raise ValueError(f"the text holds {n_img} {IMAGE_PAD} placeholder(s) but {len(images)} image(s) were given")
    if n_vid != len(videos):
        raise ValueError(f"the text holds {n_vid} {VIDEO_PAD} placeholder(s) but {len(videos)} video(s) were given")
    if videos and len(stamps) != len(videos):
        raise ValueError(f"{len(videos)} video(s) need as many timestamp lists, got {len(stamps)}")
    image_iter, video_iter = iter(images), iter(zip(videos, stamps))
    out = []
    for text in texts:
        pieces, i = [], 0
        while True:
            nxt = [(text.find(tok, i), tok) for tok in (IMAGE_PAD, VIDEO_PAD)]
            nxt = [(pos, tok) for pos, tok in nxt if pos >= 0]
            if not nxt:
                pieces.append(text[i:])
                break
            pos, tok = min(nxt)
            pieces.append(text[i:pos])
            if tok == IMAGE_PAD:
                t, h, w = next(image_iter)
                pieces.append(IMAGE_PAD * (t * h * w // unit))
            else:
                (t, h, w), times = next(video_iter)
                if len(times) != t:
                    raise ValueError(f"video grid {[t, h, w]} has {t} temporal patches but {len(times)} timestamps")
                for seconds in times:
                    pieces.append(f"<{seconds:.1f} seconds>{VISION_START}{VIDEO_PAD * (h * w // unit)}{VISION_END}")
            i = pos + len(tok)
        out.append("".join(pieces))
    return out
