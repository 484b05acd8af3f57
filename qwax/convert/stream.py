"""Streaming checkpoint conversion (HF safetensors <-> qwax orbax, HF -> HF) and loading orbax checkpoints.

Everything goes through the `TensorMap`s of qwax.convert.keymap: checkpoint tensor `hf_key` is the
view-transformed slice `param[path][index]` of one qwax parameter. Conversions stream one checkpoint tensor at a
time, and a large tensor in pieces of its leading axis (`READ_BYTES` at most): a piece of a safetensors tensor is
one byte-range read (`CheckpointReader.get_slice`), and the transforms are views (transposes, a squeezed axis),
so a piece of rows maps to a box of the qwax parameter that tensorstore writes without touching the rest of the
stack. Host memory therefore stays near a few pieces, whatever the size of the expert stacks (HF -> orbax), or
one tensor (orbax -> HF, where the safetensors writer takes whole tensors).

`load_orbax(mesh=...)`, like `qwax.load_hf(mesh=...)`, places each parameter through qwax.convert.placement
(`jax.make_array_from_callback`): each device's region is assembled from exactly the rows of the stored arrays it
covers, so a device (and the process feeding it) never holds more than its own shard of a stack.

Safety: every destination is written into a hidden temporary directory and renamed into place when complete
(`atomic_directory`); every written tensor is read back and its shape, dtype and crc32 compared with the
source's; nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwax.config import QwaxConfig
from qwax.convert.hf import resolve_options
from qwax.convert.keymap import CheckpointLayout, TensorMap, hf_shape, slice_shape, tensor_maps
from qwax.convert.orbax_io import HF_FILES_DIR, OrbaxReader, OrbaxWriter, chunk_shape, param_name
from qwax.convert.placement import (
    HFSource,
    abstract_model,
    assemble,
    box,
    compose,
    merge,
    norm_index,
    param_shardings_for,
    place,
    range_dims,
    row_axis,
    row_bounds,
)
from qwax.convert.safetensors_io import INDEX_FILE, CheckpointError, CheckpointReader, atomic_directory, write_checkpoint
from qwax.options import RunOptions, canonical_dtype, split_overrides

Path_ = tuple[Any, ...]
READ_BYTES = 64 << 20  # largest piece of a checkpoint tensor read or written at once
EXTRA_PREFIX = "hf_extra."  # orbax array name of a checkpoint tensor qwax has no parameter for (kept verbatim)
_SMALL_FILE_BYTES = 64 << 20  # non-weight files of a checkpoint (config, tokenizer) copied along


# ---------------------------------------------------------------------------------------------- plans
@dataclass
class _Param:
    path: Path_
    shape: tuple[int, ...]
    model_dtype: np.dtype  # the parameter's dtype in the model the options build
    logical_axes: tuple[Any, ...]
    maps: list[TensorMap] = field(default_factory=list)

    @property
    def name(self) -> str:
        return param_name(self.path)


def _params(cfg: QwaxConfig, options: RunOptions, maps: list[TensorMap]
            ) -> tuple[nnx.GraphDef, nnx.State, dict[Path_, _Param]]:
    """The abstract model of cfg and options, and each of its parameters with the checkpoint tensors mapped to it."""
    graphdef, abstract = abstract_model(cfg, options)
    params: dict[Path_, _Param] = {}
    for p, variable in nnx.to_flat_state(abstract):
        spec = variable.get_value()
        params[p] = _Param(p, tuple(spec.shape), np.dtype(spec.dtype),
                           tuple(variable.get_metadata().get("logical_axes") or ()))
    for m in maps:
        if m.path not in params:
            raise CheckpointError(f"tensor map {m.hf_key!r} points at {param_name(m.path)}, which the model lacks")
        params[m.path].maps.append(m)
    for p in params.values():
        if not p.maps:
            raise CheckpointError(f"qwax parameter {p.name} has no checkpoint tensor mapped to it")
    return graphdef, abstract, params


def _conversion_params(cfg: QwaxConfig, options: RunOptions, maps: list[TensorMap]
                       ) -> tuple[dict[Path_, _Param], set[Path_]]:
    """The parameters, and those the model keeps in float32 whatever param_dtype says (A_log, the GDN gated norm
    weight): with param_dtype bfloat16, they are the float32 ones."""
    _, _, params = _params(cfg, options.replace(param_dtype="bfloat16"), maps)
    return params, {p.path for p in params.values() if p.model_dtype == np.float32}


@dataclass
class _HFPlan:
    cfg: QwaxConfig
    options: RunOptions  # only the parameter layout (scan) matters to a conversion
    layout: CheckpointLayout
    maps: list[TensorMap]
    extras: list[str]  # checkpoint keys qwax has no parameter for, kept verbatim by conversions


def _plan_hf(path: Path, reader: CheckpointReader, options: RunOptions | None = None, **config_kwargs: Any
             ) -> _HFPlan:
    """Config, key layout and tensor maps of a checkpoint, for a parameter layout given by `options`."""
    options = RunOptions() if options is None else options
    cfg = QwaxConfig.from_hf(path, **config_kwargs)
    keys = set(reader.keys())
    if cfg.mtp_num_hidden_layers and not any(k.startswith("mtp.") for k in keys):
        warnings.warn(f"{path}: config asks for {cfg.mtp_num_hidden_layers} MTP layer(s) but the checkpoint has "
                      "no mtp.* tensors (transformers drops them on save); loading without the MTP head.")
        cfg = cfg.replace(mtp_num_hidden_layers=0)
    layout = CheckpointLayout.detect(keys, cfg)
    maps = tensor_maps(cfg, layout, options.uses_scan(cfg))
    missing = [m.hf_key for m in maps if m.hf_key not in keys]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing {len(missing)} tensor(s), first {missing[0]!r}"
                              + (f" (also {missing[1:4]})" if len(missing) > 1 else ""))
    mapped = {m.hf_key for m in maps}
    extras = [k for k in reader.keys() if k not in mapped]
    return _HFPlan(cfg, options, layout, maps, extras)


def _check_shapes(reader: CheckpointReader, params: dict[Path_, _Param]) -> None:
    for p in params.values():
        for m in p.maps:
            want = hf_shape(m, slice_shape(p.shape, m.index))
            got = tuple(reader.shape(m.hf_key))
            if got != want:
                raise CheckpointError(f"{reader.file_of(m.hf_key)}: tensor {m.hf_key!r} has shape {list(got)}, "
                                      f"expected {list(want)}")


# ---------------------------------------------------------------------------------------------- reporting
@dataclass
class ConversionStats:
    tensors: int = 0
    bytes: int = 0  # bytes of checkpoint tensors written
    seconds: float = 0.0
    verify_seconds: float = 0.0
    kept_float32: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        text = (f"{self.tensors} tensors, {self.bytes / 1e9:.3f} GB in {self.seconds:.1f} s "
                f"({self.mb_per_s:.0f} MB/s, of which verification {self.verify_seconds:.1f} s)")
        if self.kept_float32:
            text += f"; kept {len(self.kept_float32)} float32 tensor(s) (A_log, GDN norm) in float32"
        return text


class _Progress:
    """A tqdm bar over bytes, with the tensor count in its postfix (silent when disabled or tqdm is missing)."""

    def __init__(self, total_bytes: int, total_tensors: int, desc: str, enabled: bool):
        self.bar = None
        self.tensors, self.total_tensors = 0, total_tensors
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                            file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def update(self, nbytes: int, tensor_done: bool = False) -> None:
        if tensor_done:
            self.tensors += 1
        if self.bar is not None:
            self.bar.update(nbytes)
            if tensor_done:
                self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------- helpers
def remove_stale_temporaries(dst: str | os.PathLike) -> list[Path]:
    """Deletes `.DST.tmp-PID-*` / `.DST.old-PID-*` directories next to dst left by killed conversions (PID gone)."""
    dst = Path(dst)
    removed = []
    if not dst.parent.is_dir():
        return removed
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(?:tmp|old)-(\d+)-[0-9a-f]{{8}}")
    for entry in dst.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if not match or not entry.is_dir():
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # its writer is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _check_destination(dst: Path, overwrite: bool) -> None:
    remove_stale_temporaries(dst)
    if (dst.exists() or dst.is_symlink()) and not (dst.is_dir() and not any(dst.iterdir())) and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --force (overwrite=True) to replace it")


def _copy_side_files(src_dir: Path, dst_dir: Path, dtype: np.dtype | None) -> None:
    """config.json, tokenizer and other small non-weight files; config's storage dtype follows `dtype`."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(src_dir.iterdir()):
        if not f.is_file() or f.name.endswith(".safetensors") or f.name == INDEX_FILE:
            continue
        if f.name.startswith(".") or f.stat().st_size > _SMALL_FILE_BYTES or f.suffix in (".bin", ".pt", ".pth"):
            continue
        if f.name == "config.json" and dtype is not None:
            config = json.loads(f.read_text())
            for c in (config, config.get("text_config") or {}):
                for key in ("dtype", "torch_dtype"):
                    if key in c:
                        c[key] = dtype.name
            (dst_dir / f.name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copy2(f, dst_dir / f.name)


def _target_dtype(stored: np.dtype, dtype: np.dtype | None, pinned: bool) -> np.dtype:
    """--dtype applies to every tensor, except float32 A_log / GDN norm weights, which stay float32."""
    if dtype is None:
        return np.dtype(stored)
    if pinned and np.dtype(stored) == np.float32:
        return np.dtype(np.float32)
    return dtype


def _output_dtype(dtype: Any) -> np.dtype | None:
    """A converter's `dtype` argument (None: as stored) as a numpy dtype; ValueError naming an unknown one."""
    return None if dtype is None else canonical_dtype(dtype, "dtype")


def _crc(crc: int, array: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)), crc)


def _source_dir(path: Path) -> Path:
    return path if path.is_dir() else path.parent


# ---------------------------------------------------------------------------------------------- HF -> orbax
def convert_hf_to_orbax(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: Any = None,
                        scan_layers: bool = True, overwrite: bool = False, progress: bool = False,
                        **config_overrides: Any) -> ConversionStats:
    """Convert a safetensors checkpoint directory into a qwax orbax checkpoint (see qwax.convert.orbax_io).

    dtype: storage dtype of every parameter, any dtype-like (default: as stored; float32 A_log / GDN norm weights
    stay float32). scan_layers: store the decoder in the scanned layout (parameters stacked per layer group) or
    unscanned. config_overrides: QwaxConfig fields, or other RunOptions fields (which do not change what is
    stored).
    Tensors qwax has no parameter for (vision tower, a tied lm_head) are kept verbatim as `hf_extra.*` arrays.
    """
    src, dst = Path(src), Path(dst)
    dtype = _output_dtype(dtype)
    config_kwargs, option_kwargs = split_overrides(config_overrides)
    options = RunOptions(**dict(option_kwargs, scan_layers=scan_layers))
    _check_destination(dst, overwrite)
    start = time.perf_counter()
    stats = ConversionStats()
    with CheckpointReader(src) as reader:
        plan = _plan_hf(_source_dir(src), reader, options, **config_kwargs)
        cfg = plan.cfg
        params, pinned = _conversion_params(cfg, options, plan.maps)
        _check_shapes(reader, params)

        # One dtype per stored array: its checkpoint tensors must agree unless --dtype casts them.
        array_dtype: dict[str, np.dtype] = {}
        for p in params.values():
            stored = {np.dtype(reader.dtype(m.hf_key)) for m in p.maps}
            if len(stored) > 1 and dtype is None:
                raise CheckpointError(f"{src}: tensors of parameter {p.name} have different dtypes "
                                      f"{sorted(d.name for d in stored)} ({p.maps[0].hf_key!r}, ...); pass --dtype")
            array_dtype[p.name] = _target_dtype(stored.pop(), dtype, p.path in pinned)
            if dtype is not None and array_dtype[p.name] != dtype:
                stats.kept_float32.append(p.name)
        for key in plan.extras:
            array_dtype[EXTRA_PREFIX + key] = _target_dtype(reader.dtype(key), dtype, False)

        by_key = {m.hf_key: m for m in plan.maps}
        owner = {m.hf_key: p for p in params.values() for m in p.maps}
        order = reader.keys_in_file_order()
        total = sum(reader.nbytes(k) for k in order)
        bar = _Progress(total, len(order), f"hf-to-orbax {src.name}", progress)
        tensors_meta: dict[str, dict[str, Any]] = {}
        try:
            with atomic_directory(dst, overwrite=overwrite) as tmp:
                _copy_side_files(_source_dir(src), tmp / HF_FILES_DIR, dtype)
                writer = OrbaxWriter(tmp)
                for p in params.values():
                    m0 = p.maps[0]
                    axis = row_axis(m0, reader.shape(m0.hf_key))
                    ranges = range_dims(norm_index(m0.index, p.shape))
                    units = {d for d, e in enumerate(norm_index(m0.index, p.shape)) if isinstance(e, int)}
                    split = ranges[axis] if axis is not None else None
                    chunks = chunk_shape(p.shape, array_dtype[p.name].itemsize, split, units)
                    writer.create(p.name, p.shape, array_dtype[p.name], chunks)
                for key in plan.extras:
                    shape = tuple(reader.shape(key))
                    name = EXTRA_PREFIX + key
                    writer.create(name, shape, array_dtype[name], chunk_shape(shape, array_dtype[name].itemsize,
                                                                             0 if shape else None, set()))

                for key in order:
                    shape, source_dtype = tuple(reader.shape(key)), np.dtype(reader.dtype(key))
                    if key in by_key:
                        m, p = by_key[key], owner[key]
                        name, nidx, axis = p.name, norm_index(m.index, p.shape), row_axis(m, shape)
                        to_qwax = m.to_qwax
                    else:
                        name, nidx, axis, to_qwax = EXTRA_PREFIX + key, norm_index((), shape), (0 if shape else None), None
                    target = array_dtype[name]
                    crc = stored_crc = 0
                    row_bytes = reader.nbytes(key) // shape[0] if shape and shape[0] else reader.nbytes(key)
                    align = writer.shapes[name][2][range_dims(nidx)[axis]] if axis is not None else 1
                    pieces = row_bounds(shape[0], row_bytes, align, READ_BYTES) if axis is not None else [(0, None)]
                    for r0, r1 in pieces:
                        rows = reader.get(key) if r1 is None else reader.get_slice(key, r0, r1)
                        source_bytes = rows.nbytes
                        rows = rows.astype(target, copy=False)
                        crc = _crc(crc, rows)
                        # The one transpose of the conversion; the stored-layout checksum is verified on read-back.
                        piece = np.ascontiguousarray(to_qwax(rows)) if to_qwax is not None else rows
                        stored_crc = _crc(stored_crc, piece)
                        rows_box = () if r1 is None else box(piece.ndim, axis, r0, r1)
                        writer.write(name, compose(nidx, rows_box), piece)
                        bar.update(source_bytes)
                    bar.update(0, tensor_done=True)
                    tensors_meta[key] = {"array": name, "index": _encode_index(nidx), "shape": list(shape),
                                         "dtype": target.name, "crc32": crc, "stored_crc32": stored_crc}
                    stats.tensors += 1
                    stats.bytes += int(np.prod(shape)) * target.itemsize
                writer.finish(_orbax_metadata(cfg, plan, params, array_dtype, writer, tensors_meta,
                                              {k: tensors_meta[k] for k in reader.keys()}, src))
                verify_start = time.perf_counter()
                _verify_orbax(tmp, cfg, params, tensors_meta)
                stats.verify_seconds = time.perf_counter() - verify_start
        finally:
            bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _encode_index(nidx: list[int | tuple[int, int]]) -> list[Any]:
    return [e if isinstance(e, int) else list(e) for e in nidx]


def _orbax_metadata(cfg: QwaxConfig, plan: _HFPlan, params: dict[Path_, _Param], array_dtype: dict[str, np.dtype],
                    writer: OrbaxWriter, tensors_meta: dict[str, Any], ordered: dict[str, Any],
                    src: Path) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for p in params.values():
        counts[array_dtype[p.name].name] = counts.get(array_dtype[p.name].name, 0) + int(np.prod(p.shape))
    main_dtype = max(counts, key=counts.get)  # the dtype most parameter values are stored in
    arrays = {}
    for name, (shape, dtype_name, chunks) in writer.shapes.items():
        arrays[name] = {"shape": list(shape), "dtype": dtype_name, "chunks": list(chunks)}
    for p in params.values():
        arrays[p.name].update(path=[x for x in p.path], logical_axes=list(p.logical_axes))
    return {
        "scan_layers": plan.options.uses_scan(cfg),  # the stored parameter layout
        "scan_period": cfg.scan_period,
        # What to rebuild the model with: config fields that differ from hf/config.json, and run options.
        "config_overrides": {"mtp_num_hidden_layers": cfg.mtp_num_hidden_layers},
        "run_options": {"scan_layers": plan.options.scan_layers, "param_dtype": main_dtype},
        "hf_layout": dataclasses.asdict(plan.layout),
        "params": arrays,
        "tensors": ordered,
        "extras": list(plan.extras),
        "source": str(src),
    }


def _verify_orbax(directory: Path, cfg: QwaxConfig, params: dict[Path_, _Param], tensors: dict[str, Any]) -> None:
    """Reads every checkpoint tensor back from the written arrays (a fresh tensorstore context, so from disk)
    and compares shape, dtype and crc32 with what was read from the source."""
    reader = OrbaxReader(directory)
    by_key = {m.hf_key: (m, p) for p in params.values() for m in p.maps}
    for key, meta in tensors.items():
        crc, shape = 0, tuple(meta["shape"]) if meta["shape"] and meta["shape"][0] == 0 else None
        mapped = by_key.get(key)
        for piece in _read_hf_tensor_pieces(reader, key, meta, mapped, stored_layout=True):
            crc = _crc(crc, piece)
            if mapped is not None:
                piece = mapped[0].to_hf(piece)
            shape = piece.shape if shape is None else (shape[0] + piece.shape[0],) + tuple(piece.shape[1:])
        if list(shape) != meta["shape"] or crc != meta["stored_crc32"]:
            raise CheckpointError(f"{directory}: verification failed for tensor {key!r}: read back shape "
                                  f"{list(shape)} crc32 {crc:#010x}, wrote {meta['shape']} crc32 "
                                  f"{meta['stored_crc32']:#010x}")


def _read_hf_tensor_pieces(reader: OrbaxReader, key: str, meta: dict[str, Any],
                           mapped: tuple[TensorMap, _Param] | None, stored_layout: bool = False
                           ) -> Iterator[np.ndarray]:
    """Checkpoint tensor `key` read from an orbax checkpoint, as pieces of its leading axis, in checkpoint layout
    (views: to_hf of the stored pieces) or, with `stored_layout`, as the stored pieces themselves."""
    shape = tuple(meta["shape"])
    if mapped is None:
        name, nidx, axis, to_hf = EXTRA_PREFIX + key, norm_index((), shape), (0 if shape else None), None
    else:
        m, p = mapped
        name, nidx, axis, to_hf = p.name, norm_index(m.index, p.shape), row_axis(m, shape), m.to_hf
    if stored_layout:
        to_hf = None
    if axis is None:
        piece = reader.read(name, compose(nidx, ()))
        yield to_hf(piece) if to_hf else piece
        return
    itemsize = np.dtype(jnp.dtype(meta["dtype"])).itemsize
    row_bytes = int(np.prod(shape[1:])) * itemsize
    chunks = reader.params[name]["chunks"]
    align = chunks[range_dims(nidx)[axis]]
    ndim = len(range_dims(nidx))
    for r0, r1 in row_bounds(shape[0], row_bytes, align, READ_BYTES):
        piece = reader.read(name, compose(nidx, box(ndim, axis, r0, r1)))
        yield to_hf(piece) if to_hf else piece


# ---------------------------------------------------------------------------------------------- orbax -> HF
def _recorded(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config overrides, run options) recorded in qwax.json. Checkpoints written before run options were split
    from the config kept both under "config_overrides"; split_overrides tells them apart."""
    config, options = split_overrides(meta["config_overrides"])
    options.update(meta.get("run_options", {}))
    return config, options


def _stored_config(reader: OrbaxReader, **overrides: Any) -> QwaxConfig:
    """The config of the stored model (hf/config.json with the recorded overrides), then `overrides`."""
    kwargs, _ = _recorded(reader.metadata)
    kwargs.update(overrides)
    return QwaxConfig.from_hf(reader.directory / HF_FILES_DIR / "config.json", **kwargs)


def orbax_layout(path: str | os.PathLike) -> CheckpointLayout:
    """The layout (key prefix, expert layouts) of the checkpoint a qwax orbax checkpoint was converted from: pass
    it to `save_hf` to write a model loaded with `load_orbax` back in that layout."""
    return CheckpointLayout(**OrbaxReader(path).metadata["hf_layout"])


def convert_orbax_to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: Any = None,
                        experts: str | None = None, max_shard_bytes: int | None = None, overwrite: bool = False,
                        progress: bool = False) -> ConversionStats:
    """Export a qwax orbax checkpoint as a safetensors checkpoint directory.

    Keys, order and expert layout are those of the checkpoint it was converted from, unless `experts` is
    "fused" ([E, 2I, H] / [E, H, I] stacks) or "per_expert" (mlp.experts.{e}.*_proj.weight). dtype: as for
    convert_hf_to_orbax. Every tensor is compared with the crc32 recorded at conversion (when its bytes are the
    same) and, after writing, read back from the written files and compared again.
    """
    src, dst = Path(src), Path(dst)
    dtype = _output_dtype(dtype)
    _check_destination(dst, overwrite)
    start = time.perf_counter()
    stats = ConversionStats()
    reader = OrbaxReader(src)
    meta = reader.metadata
    cfg = _stored_config(reader)
    options = RunOptions(scan_layers=meta["scan_layers"])
    if options.uses_scan(cfg) != meta["scan_layers"]:
        raise CheckpointError(f"{src}: stored layout scan_layers={meta['scan_layers']} but the config "
                              f"({cfg.num_hidden_layers} layers, scan period {cfg.scan_period}) cannot be scanned")
    stored_layout = CheckpointLayout(**meta["hf_layout"])
    layout = _with_experts(stored_layout, experts)
    maps = tensor_maps(cfg, layout, meta["scan_layers"])
    params, pinned = _conversion_params(cfg, options, maps)
    by_key = {m.hf_key: (m, p) for p in params.values() for m in p.maps}
    recorded = meta["tensors"]
    if layout == stored_layout:
        order = list(recorded)
    else:
        order = [m.hf_key for m in maps] + list(meta["extras"])
    entries: dict[str, dict[str, Any]] = {}
    for key in order:
        if key in by_key:
            m, p = by_key[key]
            shape = hf_shape(m, slice_shape(p.shape, m.index))
            stored = np.dtype(jnp.dtype(meta["params"][p.name]["dtype"]))
            target = _target_dtype(stored, dtype, p.path in pinned)
        else:
            info = meta["params"][EXTRA_PREFIX + key]
            shape, stored = tuple(info["shape"]), np.dtype(jnp.dtype(info["dtype"]))
            target = _target_dtype(stored, dtype, False)
        entries[key] = {"shape": list(shape), "dtype": target.name, "stored": stored.name}
        if dtype is not None and target != dtype:
            stats.kept_float32.append(key)
    total = sum(int(np.prod(e["shape"])) * np.dtype(jnp.dtype(e["dtype"])).itemsize for e in entries.values())
    bar = _Progress(total, len(order), f"orbax-to-hf {src.name}", progress)
    crcs: dict[str, int] = {}

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for key, entry in entries.items():
            target = np.dtype(jnp.dtype(entry["dtype"]))
            out = np.empty(entry["shape"], target)
            row = 0
            crc = 0
            read_meta = {"shape": entry["shape"], "dtype": entry["stored"]}
            for piece in _read_hf_tensor_pieces(reader, key, read_meta, by_key.get(key)):
                if out.ndim:
                    written = out[row:row + piece.shape[0]]
                    row += piece.shape[0]
                else:
                    written = out
                written[...] = piece  # the one transpose (and cast) of the conversion
                crc = _crc(crc, written)
                bar.update(written.nbytes)
            want = recorded.get(key)
            if want is not None and want["dtype"] == target.name and want["shape"] == entry["shape"] \
                    and want["crc32"] != crc:
                raise CheckpointError(f"{src}: tensor {key!r} read back with crc32 {crc:#010x}, but "
                                      f"{want['crc32']:#010x} was recorded when the checkpoint was written")
            crcs[key] = crc
            bar.update(0, tensor_done=True)
            stats.tensors += 1
            stats.bytes += out.nbytes
            yield key, out
            del out

    try:
        with atomic_directory(dst, overwrite=overwrite) as tmp:
            _copy_side_files(src / HF_FILES_DIR, tmp, dtype)
            write_checkpoint(tmp, tensors(), max_shard_bytes=max_shard_bytes)
            verify_start = time.perf_counter()
            _verify_safetensors(tmp, entries, crcs)
            stats.verify_seconds = time.perf_counter() - verify_start
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _with_experts(layout: CheckpointLayout, experts: str | None) -> CheckpointLayout:
    if experts is None:
        return layout
    if experts not in ("fused", "per_expert"):
        raise ValueError(f"experts={experts!r}: expected 'fused' or 'per_expert'")
    fused = experts == "fused"
    return dataclasses.replace(layout, fused_experts=fused, fused_mtp_experts=fused)


def _verify_safetensors(directory: Path, entries: dict[str, dict[str, Any]], crcs: dict[str, int]) -> None:
    with CheckpointReader(directory) as written:
        if set(written.keys()) != set(entries):
            raise CheckpointError(f"{directory}: written keys differ from the source: missing "
                                  f"{sorted(set(entries) - set(written.keys()))[:3]}, unexpected "
                                  f"{sorted(set(written.keys()) - set(entries))[:3]}")
        for key, entry in entries.items():
            shape, dtype = list(written.shape(key)), np.dtype(written.dtype(key)).name
            crc = 0
            if shape:
                row_bytes = written.nbytes(key) // shape[0] if shape[0] else 0
                for r0, r1 in row_bounds(shape[0], row_bytes, 1, READ_BYTES):
                    crc = _crc(crc, written.get_slice(key, r0, r1))
            else:
                crc = _crc(crc, written.get(key))
            if shape != entry["shape"] or dtype != entry["dtype"] or crc != crcs[key]:
                raise CheckpointError(f"{written.file_of(key)}: verification failed for tensor {key!r}: wrote "
                                      f"{entry['dtype']} {entry['shape']} crc32 {crcs[key]:#010x}, read back "
                                      f"{dtype} {shape} crc32 {crc:#010x}")


# ---------------------------------------------------------------------------------------------- HF -> HF
def convert_hf_to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: Any = None,
                     experts: str | None = None, max_shard_bytes: int | None = None, overwrite: bool = False,
                     progress: bool = False) -> ConversionStats:
    """Re-shard (and optionally cast, or change the expert layout of) a safetensors checkpoint.

    Without `dtype` and `experts`, any safetensors checkpoint is copied tensor by tensor, keys and order kept.
    """
    src, dst = Path(src), Path(dst)
    dtype = _output_dtype(dtype)
    _check_destination(dst, overwrite)
    start = time.perf_counter()
    stats = ConversionStats()
    with CheckpointReader(src) as reader:
        keys = reader.keys()
        pinned_keys: set[str] = set()
        plan = None
        if dtype is not None or experts is not None:
            plan = _plan_hf(_source_dir(src), reader)
            params, pinned = _conversion_params(plan.cfg, plan.options, plan.maps)
            _check_shapes(reader, params)
            pinned_keys = {m.hf_key for p in params.values() if p.path in pinned for m in p.maps}
        producers: dict[str, tuple[tuple[int, ...], np.dtype, Callable[[], np.ndarray]]] = {}
        if plan is not None and experts is not None and _with_experts(plan.layout, experts) != plan.layout:
            source = HFSource(reader)
            new_maps = tensor_maps(plan.cfg, _with_experts(plan.layout, experts), plan.options.uses_scan(plan.cfg))
            for m in new_maps:
                p = params[m.path]
                shape = hf_shape(m, slice_shape(p.shape, m.index))
                stored = {np.dtype(reader.dtype(x.hf_key)) for x in p.maps}
                if len(stored) > 1 and dtype is None:
                    raise CheckpointError(f"{src}: tensors of {p.name} have different dtypes; pass --dtype")
                target = _target_dtype(stored.pop(), dtype, m.hf_key in pinned_keys or p.path in pinned)
                producers[m.hf_key] = (shape, target, _assembler(p, m, target, source))
            keys = [m.hf_key for m in new_maps] + plan.extras
        for key in keys:
            if key not in producers:
                target = _target_dtype(reader.dtype(key), dtype, key in pinned_keys)
                if dtype is not None and not np.issubdtype(np.dtype(reader.dtype(key)), np.floating) \
                        and np.dtype(reader.dtype(key)).name != "bfloat16":
                    target = np.dtype(reader.dtype(key))  # integer / bool tensors are never cast
                producers[key] = (tuple(reader.shape(key)), target,
                                  (lambda k=key, t=target: reader.get(k).astype(t, copy=False)))
            if dtype is not None and key in pinned_keys and producers[key][1] != dtype:
                stats.kept_float32.append(key)
        entries = {k: {"shape": list(s), "dtype": t.name} for k, (s, t, _) in producers.items()}
        total = sum(int(np.prod(s)) * t.itemsize for s, t, _ in producers.values())
        bar = _Progress(total, len(keys), f"hf-to-hf {src.name}", progress)
        crcs: dict[str, int] = {}

        def tensors() -> Iterator[tuple[str, np.ndarray]]:
            for key in keys:
                array = producers[key][2]()
                crcs[key] = _crc(0, array)
                bar.update(array.nbytes, tensor_done=True)
                stats.tensors += 1
                stats.bytes += array.nbytes
                yield key, array
                del array

        try:
            with atomic_directory(dst, overwrite=overwrite) as tmp:
                _copy_side_files(_source_dir(src), tmp, dtype)
                write_checkpoint(tmp, tensors(), max_shard_bytes=max_shard_bytes)
                verify_start = time.perf_counter()
                _verify_safetensors(tmp, entries, crcs)
                stats.verify_seconds = time.perf_counter() - verify_start
        finally:
            bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _assembler(p: _Param, m: TensorMap, target: np.dtype, source: HFSource) -> Callable[[], np.ndarray]:
    def build() -> np.ndarray:
        region = tuple(slice(e, e + 1) if isinstance(e, int) else slice(*e) for e in norm_index(m.index, p.shape))
        block = assemble(p.shape, target, p.maps, region,
                         lambda mm, b: source.fetch(mm, b).astype(target, copy=False))
        squeeze = tuple(d for d, e in enumerate(norm_index(m.index, p.shape)) if isinstance(e, int))
        return np.ascontiguousarray(m.to_hf(block.squeeze(axis=squeeze)))
    return build


# ---------------------------------------------------------------------------------------------- loading
def load_orbax(path: str | os.PathLike, mesh: Any = None, rules: Any = None, dtype: Any = "auto",
               param_dtype: Any = None, *, options: RunOptions | None = None, **overrides: Any) -> Any:
    """Load a qwax orbax checkpoint (written by `qwax convert hf-to-orbax`) as a QwaxForCausalLM.

    dtype, param_dtype, options: as for `qwax.load_hf`; "auto" (the default) is the dtype the checkpoint stores
    most parameters in. The recorded parameter layout is honoured: a checkpoint stored scanned loads scanned
    unless `scan_layers=False` is passed (or options say so), and vice versa; a layout change is done region by
    region. overrides: RunOptions fields, or QwaxConfig fields. With `mesh`, each parameter is placed in its
    sharded form (rules as for qwax.sharding: a strategy name or a table), reading only each device's region.
    The checkpoint's key layout, for `save_hf(..., layout=...)`, is `orbax_layout(path)`.
    """
    for value, name in ((dtype, "dtype"), (param_dtype, "param_dtype")):  # the caller's error: before any read
        if value is not None and not (isinstance(value, str) and value.lower() == "auto"):
            canonical_dtype(value, name)
    reader = OrbaxReader(path)
    meta = reader.metadata
    config_kwargs, option_kwargs = split_overrides(overrides)
    _, recorded = _recorded(meta)
    if options is None:  # the recorded layout, unless the caller asks for another
        option_kwargs = {"scan_layers": recorded.get("scan_layers", True), **option_kwargs}
    opts = resolve_options(lambda: jnp.dtype(recorded["param_dtype"]), dtype, param_dtype, options, **option_kwargs)
    cfg = _stored_config(reader, **config_kwargs)
    stored_cfg = _stored_config(reader)
    layout = CheckpointLayout(**meta["hf_layout"])
    stored_maps = {m.hf_key: m for m in tensor_maps(stored_cfg, layout, meta["scan_layers"])}
    maps = tensor_maps(cfg, layout, opts.uses_scan(cfg))
    graphdef, abstract, params = _params(cfg, opts, maps)
    shardings = param_shardings_for(abstract, mesh, rules) if mesh is not None else {}
    same_layout = opts.uses_scan(cfg) == meta["scan_layers"]
    values = {}
    for p in params.values():
        if same_layout:
            def read(region, p=p):
                return reader.read(p.name, tuple(region)).astype(p.model_dtype, copy=False)
        else:
            def fetch(m, piece_box, p=p):
                sm = stored_maps[m.hf_key]
                shape = tuple(reader.params[param_name(sm.path)]["shape"])
                region = compose(norm_index(sm.index, shape), piece_box)
                return reader.read(param_name(sm.path), region).astype(p.model_dtype, copy=False)

            def read(region, p=p, fetch=fetch):
                return assemble(p.shape, p.model_dtype, p.maps, region, fetch)
        values[p.path] = place(p.shape, shardings.get(p.path), read)
    return merge(graphdef, abstract, values)
