"""qwax orbax checkpoints: one zarr array per qwax parameter in an OCDBT database, written with tensorstore.

A checkpoint directory holds

    manifest.ocdbt, d/...   the OCDBT key-value store; key "<parameter path joined by '.'>/" is a zarr v2 array
    _METADATA, _CHECKPOINT_METADATA
                            orbax's tree metadata, so `orbax.checkpoint.StandardCheckpointer().restore(path)`
                            reads the parameters too (as a nested dict of numpy arrays)
    qwax.json               what qwax needs to load it: the parameter layout (scanned or unscanned), the source
                            checkpoint's key layout, dtypes, and the shape, dtype and crc32 of every checkpoint
                            tensor (so an export back to safetensors is verified end to end)
    hf/                     the source checkpoint's config.json, tokenizer and other small files, verbatim

Arrays are written region by region (orbax itself writes whole arrays): a converter streams one checkpoint tensor,
or a part of one, into the stacked parameter it belongs to, so no stack is ever held whole. Chunks are at most
`CHUNK_BYTES` and split along the axis the source tensor is streamed in, so streamed writes fill whole chunks.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from qwax.convert.safetensors_io import CheckpointError

QWAX_METADATA = "qwax.json"
HF_FILES_DIR = "hf"
FORMAT_VERSION = 1
CHUNK_BYTES = 32 << 20
TRANSACTION_BYTES = 256 << 20

_OCDBT_CONFIG = {"compression": {"id": "zstd"}}  # b-tree nodes, as orbax configures them


def param_name(path: tuple[Any, ...]) -> str:
    """Array name of a qwax parameter path: ("decoder", "layers", 0, "mlp", ...) -> "decoder.layers.0.mlp..."."""
    return ".".join(str(p) for p in path)


def chunk_shape(shape: tuple[int, ...], itemsize: int, split_first: int | None, unit_dims: set[int],
                target: int = CHUNK_BYTES) -> tuple[int, ...]:
    """Zarr chunk shape of an array: dims in `unit_dims` (layer group, per-checkpoint-tensor expert) get 1, then
    `split_first` (the axis a source tensor is streamed along), then the other dims from the left, are cut until a
    chunk is at most `target` bytes."""
    chunks = [1 if d in unit_dims else n for d, n in enumerate(shape)]
    order = ([split_first] if split_first is not None else []) + [d for d in range(len(shape)) if d != split_first]
    for d in order:
        nbytes = math.prod(chunks) * itemsize
        if nbytes <= target:
            break
        other = nbytes // max(chunks[d], 1)
        chunks[d] = max(1, target // max(other, 1))
    return tuple(max(1, c) for c in chunks)


def _spec(directory: Path, name: str) -> dict[str, Any]:
    return {"driver": "zarr",
            "kvstore": {"driver": "ocdbt", "base": f"file://{directory.resolve()}", "path": name + "/",
                        "config": _OCDBT_CONFIG}}


class OrbaxWriter:
    """Creates the arrays of a checkpoint in `directory` and writes regions of them.

    All arrays share one tensorstore Context, which serialises commits to the single OCDBT manifest.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.context = ts.Context()
        self.arrays: dict[str, ts.TensorStore] = {}
        self.shapes: dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]] = {}
        self._transaction: ts.Transaction | None = None
        self._transaction_bytes = 0

    def create(self, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...]) -> None:
        spec = _spec(self.directory, name)
        spec["metadata"] = {"shape": list(shape), "chunks": list(chunks), "dtype": _zarr_dtype(dtype),
                            "compressor": None, "fill_value": None}
        self.arrays[name] = ts.open(spec, create=True, context=self.context).result()
        self.shapes[name] = (tuple(shape), np.dtype(dtype).name, tuple(chunks))

    def write(self, name: str, region: tuple[Any, ...], data: np.ndarray) -> None:
        """Writes `data` into `array[region]`.

        Writes are batched in a transaction committed every `TRANSACTION_BYTES` (each commit rewrites the OCDBT
        manifest, ~10 ms): many small tensors cost one commit, and a chunk filled by several writes (the gate and
        up halves of an expert) is assembled in memory and written once.
        """
        if self._transaction is None:
            self._transaction = ts.Transaction()
        self.arrays[name].with_transaction(self._transaction)[region].write(data).result()
        self._transaction_bytes += data.nbytes
        if self._transaction_bytes >= TRANSACTION_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._transaction is not None:
            self._transaction.commit_async().result()
        self._transaction, self._transaction_bytes = None, 0

    def finish(self, qwax_metadata: dict[str, Any]) -> None:
        """Waits for every write, then writes orbax's and qwax's metadata files."""
        self.flush()
        self.arrays.clear()
        tree = {}
        for name, (shape, _, _) in self.shapes.items():
            parts = name.split(".")
            tree[str(tuple(parts))] = {
                "key_metadata": [{"key": p, "key_type": 1 if p.isdigit() else 2} for p in parts],
                "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(shape)},
            }
        _write_json(self.directory / "_METADATA", {
            "tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None})
        now = time.time_ns()
        _write_json(self.directory / "_CHECKPOINT_METADATA", {
            "item_handlers": "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler",
            "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now,
            "custom_metadata": {}})
        _write_json(self.directory / QWAX_METADATA, dict(qwax_metadata, format_version=FORMAT_VERSION))


class OrbaxReader:
    """Reads regions of the arrays of a qwax orbax checkpoint; `metadata` is its qwax.json."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        meta_file = self.directory / QWAX_METADATA
        if not self.directory.is_dir():
            raise CheckpointError(f"orbax checkpoint directory {self.directory} does not exist")
        if not meta_file.is_file():
            raise CheckpointError(f"{self.directory} is not a qwax orbax checkpoint: no {QWAX_METADATA} "
                                  "(write one with `qwax convert hf-to-orbax`)")
        try:
            self.metadata = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{meta_file}: cannot parse: {e}") from e
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{meta_file}: format_version {self.metadata.get('format_version')!r}, "
                                  f"this qwax reads {FORMAT_VERSION}")
        self.params: dict[str, dict[str, Any]] = self.metadata["params"]
        self.context = ts.Context()  # fresh: reads come from disk, not from a writer's cache
        self._arrays: dict[str, ts.TensorStore] = {}

    def array(self, name: str) -> ts.TensorStore:
        if name not in self._arrays:
            if name not in self.params:
                raise CheckpointError(f"{self.directory}: no array {name!r} in the checkpoint")
            try:
                self._arrays[name] = ts.open(_spec(self.directory, name), open=True, context=self.context).result()
            except ValueError as e:
                raise CheckpointError(f"{self.directory}: cannot open array {name!r}: {e}") from e
            want = tuple(self.params[name]["shape"])
            if tuple(self._arrays[name].shape) != want:
                raise CheckpointError(f"{self.directory}: array {name!r} has shape {list(self._arrays[name].shape)}, "
                                      f"{QWAX_METADATA} says {list(want)}")
        return self._arrays[name]

    def read(self, name: str, region: tuple[Any, ...] = ()) -> np.ndarray:
        try:
            return np.asarray(self.array(name)[region].read().result())
        except ValueError as e:
            raise CheckpointError(f"{self.directory}: cannot read {name!r}{list(region)}: {e}") from e


def _zarr_dtype(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    return "bfloat16" if dtype.name == "bfloat16" else dtype.newbyteorder("<").str


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
