"""Configuration of a multimodal Qwen3.5 model: the text model's QwaxConfig, the VisionConfig and the special tokens.

`MultimodalConfig.from_hf` reads the config.json of `qwen3_5` / `qwen3_5_moe` checkpoints
(`Qwen3_5ForConditionalGeneration`, `Qwen3_5MoeForConditionalGeneration`); `to_hf` writes one back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from qwax.config import ConfigError, QwaxConfig
from qwax.layers.vision import VisionConfig

MULTIMODAL_TYPES = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
_ARCHITECTURES = {"qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"}


def _read(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        return json.load(f)


def is_multimodal_config(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> bool:
    """True for a config.json (dict, file or checkpoint directory) of a multimodal Qwen3.5 model with a vision tower."""
    try:
        cfg = _read(path_or_dict)
    except (OSError, json.JSONDecodeError):
        return False
    return cfg.get("model_type") in MULTIMODAL_TYPES and cfg.get("vision_config") is not None


@dataclass(frozen=True)
class MultimodalConfig:
    """text: the language model; vision: the tower; token ids of the placeholders and vision delimiters."""

    text: QwaxConfig
    vision: VisionConfig
    model_type: str = "qwen3_5"
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054

    def __post_init__(self) -> None:
        if self.model_type not in MULTIMODAL_TYPES:
            raise ConfigError(f"config field 'model_type' = {self.model_type!r}: expected one of "
                              f"{tuple(MULTIMODAL_TYPES)}")
        if self.text.model_type != MULTIMODAL_TYPES[self.model_type]:
            raise ConfigError(f"text config model_type {self.text.model_type!r} does not match multimodal "
                              f"model_type {self.model_type!r} (expected {MULTIMODAL_TYPES[self.model_type]!r})")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(f"vision config field 'out_hidden_size' = {self.vision.out_hidden_size}: expected the "
                              f"text hidden_size {self.text.hidden_size}")
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if not 0 <= getattr(self, key) < self.text.vocab_size:
                raise ConfigError(f"config field {key!r} = {getattr(self, key)}: expected an id in "
                                  f"[0, vocab_size={self.text.vocab_size})")

    def replace(self, **changes: Any) -> "MultimodalConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **text_overrides: Any) -> "MultimodalConfig":
        """Read a multimodal config.json (dict, file or directory). `text_overrides` replace QwaxConfig fields."""
        cfg = _read(path_or_dict)
        if cfg.get("model_type") not in MULTIMODAL_TYPES or cfg.get("vision_config") is None:
            raise ConfigError(f"config field 'model_type' = {cfg.get('model_type')!r}: expected a multimodal "
                              f"config ({tuple(MULTIMODAL_TYPES)}) with a vision_config")
        text = QwaxConfig.from_hf(cfg, **text_overrides)
        vision = VisionConfig.from_hf(cfg["vision_config"])
        ids = {k: cfg[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                   "vision_end_token_id") if cfg.get(k) is not None}
        return cls(text=text, vision=vision, model_type=cfg["model_type"], **ids)

    def to_hf(self, dtype: Any = None) -> dict[str, Any]:
        """The transformers config.json dict of the `*ForConditionalGeneration` model (`dtype`: as for
        QwaxConfig.to_hf)."""
        text = self.text.to_hf(dtype)
        text.pop("architectures", None)
        return {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "text_config": text,
            "vision_config": self.vision.to_hf(f"{self.model_type}_vision"),
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.text.tie_word_embeddings,
        }
