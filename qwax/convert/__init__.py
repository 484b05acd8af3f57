"""Checkpoint conversion: HF key/layout mapping (hf.py), safetensors I/O, orbax checkpoints, streaming converters.

`qwax.convert.load_orbax(path, mesh=None, rules=None)` loads a checkpoint written by `qwax convert hf-to-orbax`.
"""


def __getattr__(name: str):
    # Lazy: stream imports hf, which imports this package.
    if name in ("load_orbax", "convert_hf_to_orbax", "convert_orbax_to_hf", "convert_hf_to_hf"):
        from qwax.convert import stream
        return getattr(stream, name)
    raise AttributeError(f"module 'qwax.convert' has no attribute {name!r}")
