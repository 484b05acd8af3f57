"""Long-context inference: the hybrid cache, the decoding engine (chunked prefill, decode step, sampling loop)
and generate; chat templates, output parsers and generation defaults for chat."""

from qwax.inference.cache import Cache, cache_bytes, init_cache
from qwax.inference.engine import decode_step, prefill
from qwax.inference.generate import generate
from qwax.inference.chat_template import ChatTemplate, ChatTemplateError
from qwax.inference.generation_config import GenerationDefaults, load_generation_config
from qwax.inference.sampling import SamplingParams, sample

__all__ = ["Cache", "ChatTemplate", "ChatTemplateError", "GenerationDefaults", "SamplingParams", "cache_bytes",
           "decode_step", "generate", "init_cache", "load_generation_config", "prefill", "sample"]
