"""Building qwax parameters from checkpoint tensors, region by region, and placing them on a device mesh.

A `TensorMap` (qwax.convert.keymap) says that checkpoint tensor `hf_key` is the view-transformed slice
`param[path][index]` of one parameter. `assemble` builds any rectangular region of a parameter from the
checkpoint tensors mapped to it, fetching only the parts of them that intersect the region; `HFSource` fetches
from a safetensors checkpoint reading only the leading-axis rows it needs (one byte-range read each), since the
transforms are views and a piece of rows maps to a box of the parameter.

`place` turns a region reader into a `jax.Array`: with a sharding, through `jax.make_array_from_callback`, so each
device's region is assembled from exactly the rows it covers and no device (or the process feeding it) ever holds
more than its own shard of an expert stack. `qwax.load_hf(mesh=...)` and `qwax.convert.load_orbax(mesh=...)` both
go through here.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwax.config import QwaxConfig
from qwax.convert.keymap import ParamPath, TensorMap
from qwax.convert.safetensors_io import CheckpointError, CheckpointReader
from qwax.model import QwaxForCausalLM
from qwax.multimodal.config import MultimodalConfig
from qwax.multimodal.model import QwaxForConditionalGeneration
from qwax.options import RunOptions
from qwax.sharding import get_rules, param_shardings

NormIndex = list[int | tuple[int, int]]  # one entry per parameter dim: an int (dim dropped) or [start, stop)


def abstract_model(cfg: QwaxConfig | MultimodalConfig, options: RunOptions) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state of jax.ShapeDtypeStruct) of the model `cfg` and `options` build, allocating nothing."""
    cls = QwaxForConditionalGeneration if isinstance(cfg, MultimodalConfig) else QwaxForCausalLM
    abstract = nnx.eval_shape(lambda: cls(cfg, options, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


# ----------------------------------------------------------------------------------------------- index algebra
def norm_index(index: tuple[Any, ...], shape: tuple[int, ...]) -> NormIndex:
    """A TensorMap index as one entry per parameter dim: an int (dim dropped) or a (start, stop) range."""
    out: NormIndex = []
    for d, n in enumerate(shape):
        e = index[d] if d < len(index) else slice(None)
        if isinstance(e, slice):
            start, stop, step = e.indices(n)
            if step != 1:
                raise ValueError(f"strided TensorMap index {index} for a parameter of shape {list(shape)}")
            out.append((start, stop))
        else:
            out.append(int(e))
    return out


def compose(nidx: NormIndex, box: tuple[slice, ...]) -> tuple[Any, ...]:
    """Parameter-coordinate region of `piece[box]`, where piece = param[nidx] (box has one slice per range dim)."""
    it = iter(box)
    out: list[Any] = []
    for e in nidx:
        if isinstance(e, int):
            out.append(e)
        else:
            s = next(it, slice(None))
            lo = 0 if s.start is None else s.start
            hi = e[1] - e[0] if s.stop is None else s.stop
            out.append(slice(e[0] + lo, e[0] + hi))
    return tuple(out)


def range_dims(nidx: NormIndex) -> list[int]:
    """The parameter dims a TensorMap slice keeps (those of `piece = param[nidx]`)."""
    return [d for d, e in enumerate(nidx) if not isinstance(e, int)]


def row_axis(m: TensorMap, hf_shape: tuple[int, ...]) -> int | None:
    """The axis of to_qwax(tensor) that the checkpoint tensor's leading axis becomes (None: do not split it).

    Found by transforming a zero-stride stand-in whose only moving axis is the leading one; transforms are views,
    so exactly one output axis keeps a non-zero stride."""
    if len(hf_shape) == 0 or hf_shape[0] <= 1:
        return None
    probe = np.broadcast_to(np.arange(hf_shape[0], dtype=np.int64).reshape((-1,) + (1,) * (len(hf_shape) - 1)),
                            hf_shape)
    strides = m.to_qwax(probe).strides
    moving = [i for i, s in enumerate(strides) if s != 0]
    return moving[0] if len(moving) == 1 else None


def row_bounds(rows: int, row_bytes: int, align: int, limit: int) -> Iterator[tuple[int, int]]:
    """[start, stop) pieces of a leading axis: at most `limit` bytes each, a multiple of `align` rows if possible."""
    step = max(1, limit // max(row_bytes, 1))
    if align > 1:
        step = max(align, step // align * align)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def box(ndim: int, axis: int | None, start: int, stop: int) -> tuple[slice, ...]:
    """The box [start, stop) along `axis` (everything along the other dims) of an ndim-dimensional piece."""
    return tuple(slice(start, stop) if d == axis else slice(None) for d in range(ndim))


def assemble(shape: tuple[int, ...], dtype: np.dtype, maps: list[TensorMap], region: tuple[slice, ...],
             fetch: Callable[[TensorMap, tuple[slice, ...]], np.ndarray]) -> np.ndarray:
    """`param[region]` of a parameter of `shape` built from the checkpoint tensors mapped to it.

    fetch(m, box) returns `to_qwax(tensor m.hf_key)[box]`; only the boxes that intersect `region` are fetched.
    Raises CheckpointError when the maps leave part of the region uncovered.
    """
    bounds = []
    for d, n in enumerate(shape):
        s = region[d] if d < len(region) else slice(None)
        start, stop, _ = s.indices(n)
        bounds.append((start, stop))
    out = np.empty([hi - lo for lo, hi in bounds], dtype)
    covered = 0
    for m in maps:
        out_sel: list[Any] = []
        piece_box: list[slice] = []
        for (lo, hi), e in zip(bounds, norm_index(m.index, shape)):
            if isinstance(e, int):
                if not lo <= e < hi:
                    break
                out_sel.append(e - lo)
            else:
                s, t = max(e[0], lo), min(e[1], hi)
                if s >= t:
                    break
                out_sel.append(slice(s - lo, t - lo))
                piece_box.append(slice(s - e[0], t - e[0]))
        else:
            piece = fetch(m, tuple(piece_box))
            out[tuple(out_sel)] = piece
            covered += piece.size
    if covered != out.size:
        raise CheckpointError(f"checkpoint tensors {[m.hf_key for m in maps][:3]}... cover {covered} of the "
                              f"{out.size} values of region {region} of a parameter of shape {list(shape)}")
    return out


# ---------------------------------------------------------------------------------------------- sources
class HFSource:
    """fetch(m, box) from a safetensors checkpoint, reading only the leading-axis rows the box needs."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self._cache: tuple[str, int, int, np.ndarray] | None = None  # last rows read: devices often share them
        self.max_read_bytes = 0

    def rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of checkpoint tensor `key` (shape [stop - start, *rest])."""
        if self._cache is not None and self._cache[:3] == (key, start, stop):
            return self._cache[3]
        self._cache = None
        data = self.reader.get_slice(key, start, stop)
        self.max_read_bytes = max(self.max_read_bytes, data.nbytes)
        self._cache = (key, start, stop, data)
        return data

    def fetch(self, m: TensorMap, piece_box: tuple[slice, ...]) -> np.ndarray:
        """`to_qwax(tensor m.hf_key)[piece_box]`, reading only the rows of the tensor that the box covers."""
        shape = self.reader.shape(m.hf_key)
        axis = row_axis(m, shape)
        if axis is None:
            return m.to_qwax(self.rows(m.hf_key, 0, shape[0]) if shape else self.reader.get(m.hf_key))[piece_box]
        start, stop, _ = (piece_box[axis] if axis < len(piece_box) else slice(None)).indices(shape[0])
        piece = m.to_qwax(self.rows(m.hf_key, start, stop))
        return piece[tuple(slice(None) if d == axis else s for d, s in enumerate(piece_box))]

    def clear(self) -> None:
        self._cache = None


# ---------------------------------------------------------------------------------------------- placement
def param_shardings_for(abstract: nnx.State, mesh: Any, rules: Any) -> dict[ParamPath, Any]:
    """{parameter path: NamedSharding} from qwax.sharding's rules (a strategy name, default "fsdp", or a table)."""
    table = get_rules(rules if rules is not None else "fsdp") if isinstance(rules, (str, type(None))) else rules
    return {p: v.get_value() for p, v in nnx.to_flat_state(param_shardings(abstract, table, mesh))}


def place(shape: tuple[int, ...], sharding: Any, read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A jax.Array of `shape` whose region r holds read(r); sharding None: one array on the default device."""
    if sharding is None:
        return jnp.asarray(read(tuple(slice(None) for _ in shape)))
    return jax.make_array_from_callback(shape, sharding, read)


def place_from_hf(shape: tuple[int, ...], dtype: np.dtype, maps: list[TensorMap], sharding: Any,
                  source: HFSource) -> jax.Array:
    """One parameter of `shape`, cast to `dtype`, built in its sharded form from the checkpoint tensors `maps`
    (sharding None: on one device). Each device's region reads only the checkpoint rows it covers."""
    def read(region: tuple[slice, ...]) -> np.ndarray:
        return assemble(shape, dtype, maps, region, lambda m, b: source.fetch(m, b).astype(dtype, copy=False))

    array = place(shape, sharding, read)
    source.clear()
    return array


def merge(graphdef: nnx.GraphDef, abstract: nnx.State, values: dict[ParamPath, jax.Array]) -> Any:
    """The model of `graphdef` with each parameter of `abstract` replaced by values[path] (consumed)."""
    for p, variable in nnx.to_flat_state(abstract):
        variable.set_value(values.pop(p))
    return nnx.merge(graphdef, abstract)
