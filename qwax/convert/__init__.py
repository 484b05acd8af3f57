"""Checkpoint conversion: HF key/layout mapping (keymap.py), loading and saving HF checkpoints (hf.py), placing
parameters on a mesh (placement.py), safetensors I/O, orbax checkpoints and streaming converters (stream.py).

`qwax.convert.load_orbax(path, mesh=None, rules=None)` loads a checkpoint written by `qwax convert hf-to-orbax`.
"""

_STREAM_NAMES = ("load_orbax", "orbax_layout", "convert_hf_to_orbax", "convert_orbax_to_hf", "convert_hf_to_hf")


def __getattr__(name: str):
    # Lazy, so that `import qwax` (which imports qwax.convert.hf) does not import tensorstore through stream.
    if name in _STREAM_NAMES:
        from qwax.convert import stream
        return getattr(stream, name)
    raise AttributeError(f"module 'qwax.convert' has no attribute {name!r}")
