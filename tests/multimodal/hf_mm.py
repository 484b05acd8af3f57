"""Tiny random multimodal Hugging Face Qwen3.5 models (vision tower + text model) and inputs for them.

The text model is the tiny one of tests/hf_models.py; the tower has depth 2, width 32, 2 heads and 8-pixel
patches, so a 64 x 48 image is an 8 x 6 patch grid and 12 language-model tokens. Token ids 120..123 are the image
and video placeholders and the vision start / end delimiters.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hf_models import _perturb, hf_config

IMAGE, VIDEO, START, END = 120, 121, 122, 123
VISION = dict(depth=2, hidden_size=32, hidden_act="gelu_pytorch_tanh", intermediate_size=48, num_heads=2,
              in_channels=3, patch_size=8, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
              num_position_embeddings=36)


def make_mm_model(model_type: str = "qwen3_5", path: str | os.PathLike | None = None, *, seed: int = 0,
                  vision: dict | None = None, **text_overrides):
    """A tiny random float32 Qwen3_5(Moe)ForConditionalGeneration in eval mode, saved to `path` if given."""
    import torch
    import transformers

    text_type = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}[model_type]
    text = hf_config(text_type, **text_overrides).to_dict()
    config_class, model_class = {
        "qwen3_5": (transformers.Qwen3_5Config, transformers.Qwen3_5ForConditionalGeneration),
        "qwen3_5_moe": (transformers.Qwen3_5MoeConfig, transformers.Qwen3_5MoeForConditionalGeneration),
    }[model_type]
    vision_cfg = dict(VISION, **(vision or {}))
    vision_cfg["out_hidden_size"] = text["hidden_size"]
    config = config_class(text_config=text, vision_config=vision_cfg, image_token_id=IMAGE, video_token_id=VIDEO,
                          vision_start_token_id=START, vision_end_token_id=END, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = "eager"
    config.dtype = "float32"
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    _perturb(model, seed)
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
    return model


def pixels(grids, patch_dim: int = 3 * 2 * 8 * 8, seed: int = 0) -> np.ndarray:
    """Random float32 pixel_values rows [sum t*h*w, patch_dim] for grids [(t, h, w), ...]."""
    n = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).normal(size=(n, patch_dim)).astype(np.float32)


def vision_run(t: int, h: int, w: int, token: int = IMAGE) -> list[int]:
    """<vision_start> placeholder x (t*h*w/4) <vision_end>."""
    return [START] + [token] * (t * h * w // 4) + [END]


def text(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 100, size=n).tolist()


def hf_forward(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               pixel_values_videos=None, video_grid_thw=None) -> np.ndarray:
    """Float32 logits of the transformers model (mm_token_type_ids built from the placeholder ids)."""
    import torch

    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    types = torch.zeros_like(ids, dtype=torch.int32)
    types[ids == IMAGE] = 1
    types[ids == VIDEO] = 2
    kwargs = dict(input_ids=ids, mm_token_type_ids=types, use_cache=False)
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    if pixel_values is not None:
        kwargs.update(pixel_values=torch.as_tensor(pixel_values),
                      image_grid_thw=torch.as_tensor(np.asarray(image_grid_thw), dtype=torch.long))
    if pixel_values_videos is not None:
        kwargs.update(pixel_values_videos=torch.as_tensor(pixel_values_videos),
                      video_grid_thw=torch.as_tensor(np.asarray(video_grid_thw), dtype=torch.long))
    with torch.no_grad():
        return model(**kwargs).logits.to(torch.float32).numpy()
