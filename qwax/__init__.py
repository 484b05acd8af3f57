"""qwax: Qwen3.5 / Qwen3-Next in JAX (Flax NNX), with Pallas kernels, sharding rules and HF checkpoint conversion.

Public surface: `QwaxConfig` (the checkpoint's config), `RunOptions` (dtypes, kernels, scan, remat), `QwaxForCausalLM`, `QwaxForConditionalGeneration` (multimodal), `load_hf`, `save_hf`,
`generate`; LoRA: `LoRAConfig`, `apply_lora`, `merge_lora` and PEFT adapter files `save_peft`, `load_peft`.
Importing qwax never imports torch.
"""

from qwax.config import PRESETS, QwaxConfig, get_preset
from qwax.convert.hf import load_hf, save_hf
from qwax.convert.peft import load_peft, save_peft
from qwax.inference.generate import generate
from qwax.layers.lora import LoRAConfig
from qwax.lora import apply_lora, merge_lora
from qwax.model import ModelOutput, QwaxForCausalLM, forward
from qwax.multimodal import MultimodalConfig, QwaxForConditionalGeneration
from qwax.options import RunOptions

__all__ = ["PRESETS", "QwaxConfig", "RunOptions", "get_preset", "QwaxForCausalLM", "ModelOutput", "forward", "load_hf", "save_hf", "generate",
           "MultimodalConfig", "QwaxForConditionalGeneration", "LoRAConfig", "apply_lora", "merge_lora", "load_peft",
           "save_peft"]
__version__ = "0.1.0"
