"""Early-fusion multimodal Qwen3.5: vision tower + text model, multimodal rotary positions, image/video processing."""

from qwax.layers.vision import VisionConfig, VisionModel
from qwax.multimodal.config import MultimodalConfig, is_multimodal_config
from qwax.multimodal.model import QwaxForConditionalGeneration
from qwax.multimodal.rope_index import rope_index

__all__ = ["VisionConfig", "VisionModel", "MultimodalConfig", "is_multimodal_config", "QwaxForConditionalGeneration",
           "rope_index"]
