"""Early-fusion multimodal Qwen3.5: the vision tower's tokens replace the placeholder embeddings of the text model.

input_ids -> embed -> (image / video placeholders <- vision features, in order) -> text model with multimodal
rotary positions (T, H, W rows from `rope_index`) -> logits. There is no cross-attention: after the fusion the
sequence is an ordinary (hybrid Gated DeltaNet / attention) decoder input.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwax.layers.vision import VisionModel, check_grids, vision_features
from qwax.model import ModelOutput, QwaxForCausalLM
from qwax.multimodal.config import MultimodalConfig
from qwax.multimodal.rope_index import rope_index
from qwax.options import RunOptions


def scatter_features(embeds: jax.Array, placeholder: jax.Array, features: jax.Array) -> jax.Array:
    """Replace the embeddings at `placeholder` positions, in row-major order, with the rows of `features`.

    embeds [B, L, H]; placeholder [B, L] bool with exactly N True entries; features [N, H]. Works under jit.
    """
    b, l, h = embeds.shape
    flat = placeholder.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat) - 1, 0, max(features.shape[0] - 1, 0))
    picked = features.astype(embeds.dtype)[index]
    return jnp.where(flat[:, None], picked, embeds.reshape(-1, h)).reshape(b, l, h)


class QwaxForConditionalGeneration(nnx.Module):
    """Weights: visual (the VisionModel) and language_model (a QwaxForCausalLM with the LM head and MTP)."""

    def __init__(self, cfg: MultimodalConfig, options: RunOptions | None = None, *, rngs: nnx.Rngs):
        opts = RunOptions() if options is None else options
        self.config, self.options = cfg, opts
        self.visual = VisionModel(cfg.vision, opts, rngs=rngs)
        self.language_model = QwaxForCausalLM(cfg.text, opts, rngs=rngs)

    def _features(self, input_ids: np.ndarray, pixel_values: Any, grid_thw: Any, token_id: int, kind: str
                  ) -> jax.Array | None:
        grid_name = f"{kind}_grid_thw"
        pixels_name = "pixel_values" if kind == "image" else "pixel_values_videos"
        if pixel_values is None and grid_thw is None:
            count = int((input_ids == token_id).sum())
            if count:
                raise ValueError(f"input_ids hold {count} {kind} placeholder token(s) (id {token_id}) but no "
                                 f"{pixels_name} / {grid_name} were given")
            return None
        if pixel_values is None or grid_thw is None:
            raise ValueError(f"pass both {pixels_name} and {grid_name}, or neither")
        grids = check_grids(grid_thw, self.config.vision, grid_name)
        count = int((input_ids == token_id).sum())
        expected = sum(t * h * w for t, h, w in grids) // self.config.vision.merge_unit
        if count != expected:
            raise ValueError(f"input_ids hold {count} {kind} placeholder token(s) (id {token_id}) but {grid_name} "
                             f"{[list(g) for g in grids]} gives {expected} {kind} feature(s)")
        return vision_features(self.visual, pixel_values, grids)

    def embed(self, input_ids: Any, pixel_values: Any = None, image_grid_thw: Any = None,
              pixel_values_videos: Any = None, video_grid_thw: Any = None) -> jax.Array:
        """[B, L] ids (concrete) -> [B, L, H] embeddings with image and video features fused in.

        Raises ValueError when the placeholder count differs from the grids' token count or a grid is malformed.
        """
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
        cfg = self.config
        x = self.language_model.embed(jnp.asarray(ids))
        for pixels, grid, token, kind in ((pixel_values, image_grid_thw, cfg.image_token_id, "image"),
                                          (pixel_values_videos, video_grid_thw, cfg.video_token_id, "video")):
            features = self._features(ids, pixels, grid, token, kind)
            if features is not None:
                x = scatter_features(x, jnp.asarray(ids == token), features)
        return x

    def rope_index(self, input_ids: Any, attention_mask: Any = None, image_grid_thw: Any = None,
                   video_grid_thw: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(positions [3, B, L], rope_delta [B]) of a prompt; see qwax.multimodal.rope_index."""
        cfg = self.config
        return rope_index(input_ids, attention_mask, image_grid_thw, video_grid_thw,
                          image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                          spatial_merge_size=cfg.vision.spatial_merge_size)

    def __call__(self, input_ids: Any, attention_mask: Any = None, pixel_values: Any = None,
                 image_grid_thw: Any = None, pixel_values_videos: Any = None, video_grid_thw: Any = None,
                 position_ids: Any = None) -> ModelOutput:
        """input_ids [B, L] (concrete); attention_mask [B, L] 1/0 (left or right padding);
        pixel_values [sum t*h*w, C*T*P*P] with image_grid_thw [num_images, 3]; likewise pixel_values_videos and
        video_grid_thw. position_ids [3, B, L] default to the multimodal rope index when grids are given (else the
        text model's 0..L-1, as transformers). Returns the text model's ModelOutput (logits [B, L, vocab])."""
        embeds = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        if position_ids is None and (image_grid_thw is not None or video_grid_thw is not None):
            position_ids = jnp.asarray(self.rope_index(input_ids, attention_mask, image_grid_thw, video_grid_thw)[0])
        mask = None if attention_mask is None else jnp.asarray(attention_mask)
        return self.language_model(None, attention_mask=mask, position_ids=position_ids, inputs_embeds=embeds)
