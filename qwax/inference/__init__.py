"""Long-context inference: the hybrid cache, chunked prefill, decode steps, sampling and generate."""

from qwax.inference.cache import Cache, cache_bytes, init_cache
from qwax.inference.generate import decode_step, generate, prefill
from qwax.inference.sampling import sample

__all__ = ["Cache", "cache_bytes", "init_cache", "generate", "prefill", "decode_step", "sample"]
