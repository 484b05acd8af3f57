"""Long-context inference: the hybrid cache, the decoding engine (chunked prefill, decode step, sampling loop)
and generate."""

from qwax.inference.cache import Cache, cache_bytes, init_cache
from qwax.inference.engine import decode_step, prefill
from qwax.inference.generate import generate
from qwax.inference.sampling import sample

__all__ = ["Cache", "cache_bytes", "init_cache", "generate", "prefill", "decode_step", "sample"]
