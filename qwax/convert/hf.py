"""Hugging Face checkpoints <-> qwax models: `load_hf`, `save_hf`, `hf_tensors`.

The key names and layouts are those of qwax.convert.keymap (re-exported here): every checkpoint tensor maps to a
view-transformed slice of one qwax parameter, and nothing is computed on the values, so a load followed by a save
is bitwise.

`load_hf` reads one tensor (or, on a mesh, each device's rows of one tensor) at a time and fills one parameter at
a time, so peak host memory stays near the model size plus one tensor; `save_hf` writes a directory that
transformers' `from_pretrained` loads with no missing or unexpected keys, in the layout of the model type's
published checkpoints unless told another. A loaded model is exactly the model its config and options build: it
does not remember the checkpoint's layout (`CheckpointLayout.of_checkpoint(path)` reads it back).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwax.config import QwaxConfig
from qwax.convert.keymap import (
    CheckpointLayout,
    ParamPath,
    TensorMap,
    hf_shape,
    model_tensor_maps,
    multimodal_tensor_maps,
    slice_shape,
    tensor_maps,
    vision_tensor_maps,
)
from qwax.convert.placement import HFSource, abstract_model, merge, param_shardings_for, place_from_hf
from qwax.convert.safetensors_io import CheckpointError, CheckpointReader, atomic_directory, write_checkpoint
from qwax.layers.lora import LoRAParam
from qwax.model import QwaxForCausalLM
from qwax.multimodal.config import MultimodalConfig, is_multimodal_config
from qwax.multimodal.model import QwaxForConditionalGeneration
from qwax.options import SUPPORTED_DTYPES, RunOptions, canonical_dtype, split_overrides

__all__ = ["load_hf", "save_hf", "hf_tensors", "stored_dtype", "resolve_options", "CheckpointLayout", "TensorMap",
           "tensor_maps", "vision_tensor_maps", "multimodal_tensor_maps", "hf_shape", "slice_shape"]

Model = QwaxForCausalLM | QwaxForConditionalGeneration


def _dtype_arg(value: Any, name: str) -> np.dtype | None:
    """A dtype argument as a numpy dtype, None for "auto"; ValueError naming `name` and an unknown value."""
    if isinstance(value, str) and value.lower() == "auto":
        return None
    return canonical_dtype(value, name)


def most_common_dtype(dtypes_and_sizes: Iterable[tuple[Any, int]]) -> np.dtype | None:
    """The floating dtype holding the most values among (dtype, element count) pairs (None: no floating ones)."""
    counts: Counter[np.dtype] = Counter()
    for dtype, size in dtypes_and_sizes:
        if jnp.issubdtype(dtype, jnp.floating):  # numpy's own issubdtype does not know bfloat16 or fp8
            counts[np.dtype(dtype)] += size
    return max(counts, key=counts.__getitem__) if counts else None


def stored_dtype(reader: CheckpointReader) -> np.dtype:
    """The dtype a safetensors checkpoint stores its weights in: the floating dtype of most of its values.

    Decided from the tensors, not from config.json's "dtype", which checkpoints do not always keep in step; the
    few float32-only tensors of a bf16 checkpoint (A_log, the GDN norm weight) do not move the majority.
    """
    dtype = most_common_dtype((reader.dtype(k), math.prod(reader.shape(k))) for k in reader.keys())
    if dtype is None:
        raise CheckpointError(f"{reader.path}: no floating-point tensors, so no stored dtype to load in")
    return dtype


def resolve_options(stored: Callable[[], Any], dtype: Any = "auto", param_dtype: Any = None,
                    options: RunOptions | None = None, **option_kwargs: Any) -> RunOptions:
    """The RunOptions a loader builds its model with.

    dtype / param_dtype: any dtype-like (jnp.bfloat16, np.float32, "bf16", ...) or "auto": `stored()`, the
    dtype the checkpoint holds its weights in (called only when needed); param_dtype None means the resolved
    dtype. Without `options`, dtype "auto" gives a bf16 checkpoint bf16 parameters and compute, an f32 one f32.
    A given `options` is taken as it is, except for the dtypes passed explicitly (not "auto" / None) and
    `option_kwargs` (RunOptions fields), which replace its fields.
    Raises ValueError naming an unknown dtype, or a stored dtype qwax does not compute in.
    """
    explicit = _dtype_arg(dtype, "dtype")
    explicit_param = None if param_dtype is None else _dtype_arg(param_dtype, "param_dtype")

    def held() -> np.dtype:
        value = np.dtype(stored())
        if value.name not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype='auto': the checkpoint stores its weights in {value.name}, which qwax does not "
                             f"compute in; pass dtype= one of {SUPPORTED_DTYPES}")
        return value

    param_auto = param_dtype is not None and explicit_param is None
    if options is None:
        compute = held() if explicit is None else explicit
        param = explicit_param if explicit_param is not None else (held() if param_auto else compute)
        return RunOptions(dtype=compute, param_dtype=param, **option_kwargs)
    changes: dict[str, Any] = dict(option_kwargs)
    if explicit is not None:
        changes.update(dtype=explicit, param_dtype=explicit)
    if param_auto:
        changes["param_dtype"] = held()
    if explicit_param is not None:
        changes["param_dtype"] = explicit_param
    return options.replace(**changes) if changes else options


def load_hf(path: str | os.PathLike, dtype: Any = "auto", param_dtype: Any = None, *, text_only: bool = False,
            mesh: jax.sharding.Mesh | None = None, rules: Any = None, options: RunOptions | None = None,
            **overrides: Any) -> Model:
    """Load a transformers checkpoint directory (config.json + safetensors, single file or sharded with index).

    A multimodal Qwen3.5 checkpoint (model_type qwen3_5 / qwen3_5_moe with a vision_config) loads as a
    QwaxForConditionalGeneration (vision tower + text model) unless `text_only`, which loads its text model alone
    as a QwaxForCausalLM and ignores model.visual.*.

    dtype: compute dtype, any dtype-like (jnp.bfloat16, np.float32, "bf16", "bfloat16") or "auto" (default):
    the dtype the checkpoint's tensors are stored in. param_dtype: storage dtype of the parameters (None: the
    resolved dtype). A_log and the GDN norm weight stay float32 whatever these say.
    options: the RunOptions to build with, taken as given except for an explicit dtype / param_dtype (without
    it, RunOptions() with the dtypes above). overrides: RunOptions fields (scan_layers=False, gdn_impl="xla",
    ...) replace the options'; any other name replaces a QwaxConfig field (num_hidden_layers=2, ...).
    mesh, rules: place every parameter directly in its sharded form (rules: a qwax.sharding strategy name or rule
    table, default "fsdp"); each device's shard is read from only the checkpoint rows it covers, so no host or
    device holds a whole expert stack.
    Raises CheckpointError naming the key for missing tensors, wrong shapes or corrupt files, and ValueError
    naming an unknown dtype.
    """
    path = os.fspath(path)
    config_kwargs, option_kwargs = split_overrides(overrides)
    # An unknown dtype is the caller's error, not the checkpoint's: say so before reading anything.
    _dtype_arg(dtype, "dtype")
    if param_dtype is not None:
        _dtype_arg(param_dtype, "param_dtype")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    multimodal = not text_only and is_multimodal_config(path)
    mm_cfg = MultimodalConfig.from_hf(path, **config_kwargs) if multimodal else None
    cfg = mm_cfg.text if multimodal else QwaxConfig.from_hf(path, **config_kwargs)
    with CheckpointReader(path) as reader:
        keys = set(reader.keys())
        if cfg.mtp_num_hidden_layers and not any(k.startswith("mtp.") for k in keys):
            warnings.warn(f"{path}: config asks for {cfg.mtp_num_hidden_layers} MTP layer(s) but the checkpoint has "
                          "no mtp.* tensors (transformers drops them on save); loading without the MTP head.")
            cfg = cfg.replace(mtp_num_hidden_layers=0)
        opts = resolve_options(lambda: stored_dtype(reader), dtype, param_dtype, options, **option_kwargs)
        model_cfg: QwaxConfig | MultimodalConfig = mm_cfg.replace(text=cfg) if multimodal else cfg
        layout = CheckpointLayout.detect(keys, model_cfg)
        graphdef, abstract = abstract_model(model_cfg, opts)
        maps = model_tensor_maps(model_cfg, layout, opts.uses_scan(cfg))
        missing = [m.hf_key for m in maps if m.hf_key not in keys]
        if missing:
            raise CheckpointError(f"{path}: checkpoint is missing {len(missing)} tensor(s), first {missing[0]!r}"
                                  + (f" (also {missing[1:4]})" if len(missing) > 1 else ""))
        used = {m.hf_key for m in maps}
        if cfg.tie_word_embeddings:
            used.add("lm_head.weight")  # a tied head is sometimes saved too; it equals the embedding
        extra = sorted(keys - used)
        if extra:
            warnings.warn(f"{path}: ignoring {len(extra)} tensor(s) qwax does not use, e.g. {extra[:3]}")

        by_path: dict[ParamPath, list[TensorMap]] = {}
        for m in maps:
            by_path.setdefault(m.path, []).append(m)
        flat = nnx.to_flat_state(abstract)
        shardings = param_shardings_for(abstract, mesh, rules) if mesh is not None else {}
        source = HFSource(reader)
        values: dict[ParamPath, jax.Array] = {}
        for p, variable in flat:
            spec = variable.get_value()
            if p not in by_path:
                raise CheckpointError(f"qwax parameter {'.'.join(map(str, p))} has no checkpoint tensor mapped to it")
            for m in by_path[p]:
                want = hf_shape(m, slice_shape(spec.shape, m.index))
                got = tuple(reader.shape(m.hf_key))
                if got != want:
                    raise CheckpointError(f"{reader.file_of(m.hf_key)}: tensor {m.hf_key!r} has shape {list(got)}, "
                                          f"expected {list(want)}")
            values[p] = place_from_hf(tuple(spec.shape), np.dtype(spec.dtype), by_path[p], shardings.get(p), source)
    return merge(graphdef, abstract, values)


def hf_tensors(model: Model, layout: CheckpointLayout | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(checkpoint key, numpy array in the checkpoint's [out, in] layout) for every tensor of `model`, one
    parameter converted at a time.

    layout: key prefix and expert layouts to write (default: `CheckpointLayout.default_for(model.config)`, the
    model type's published layout: text keys under model.language_model. for a multimodal model, MTP experts
    per expert). To write a model back as the checkpoint it came from stored it, pass
    `CheckpointLayout.of_checkpoint(that_path)`.
    """
    multimodal = isinstance(model, QwaxForConditionalGeneration)
    text_cfg = model.config.text if multimodal else model.config
    if layout is None:
        layout = CheckpointLayout.default_for(model.config)
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    by_path: dict[ParamPath, list[TensorMap]] = {}
    for m in model_tensor_maps(model.config, layout, model.options.uses_scan(text_cfg)):
        by_path.setdefault(m.path, []).append(m)
    for p, group in by_path.items():
        if p not in state:
            raise CheckpointError(f"tensor map {group[0].hf_key!r} points at qwax parameter "
                                  f"{'.'.join(map(str, p))}, which the model lacks")
        array = np.asarray(state[p].get_value())
        for m in group:
            yield m.hf_key, np.ascontiguousarray(m.to_hf(array[m.index]))


def _hf_config(model: Model) -> dict[str, Any]:
    """config.json of `model`, its "dtype" the one most of its parameter values are held in."""
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    dtype = most_common_dtype((v.get_value().dtype, math.prod(v.get_value().shape)) for _, v in params)
    name = np.dtype(dtype).name if dtype is not None else None
    if isinstance(model.config, MultimodalConfig):
        config = model.config.to_hf()
        if name is not None:
            config["dtype"] = name
            config["text_config"]["dtype"] = name
        return config
    return model.config.to_hf(dtype=name)


def save_hf(model: Model, path: str | os.PathLike, *, layout: CheckpointLayout | None = None,
            max_shard_bytes: int | None = None, overwrite: bool = False,
            extra_files: Callable[[str], None] | None = None) -> None:
    """Write `model` as a transformers checkpoint directory (config.json + safetensors), tensors in the dtypes
    the model holds them in.

    The directory is assembled under a temporary name and renamed into place only when complete; with
    `overwrite`, an existing `path` stays whole until then. `extra_files(tmp_dir)` may add files (a tokenizer)
    that must appear together with the weights. layout: as for `hf_tensors` (default: the model type's
    published layout, e.g. Qwen3-Next per expert, Qwen3.5 fused); MTP weights are written when the model has
    an MTP head. A model with LoRA adapters is refused (a checkpoint has no place for them): save
    `qwax.merge_lora(model)`, and the adapters with `qwax.save_peft`.
    """
    if nnx.to_flat_state(nnx.state(model, LoRAParam)):
        raise ValueError("save_hf: the model has LoRA adapters, which a Hugging Face checkpoint cannot hold; save "
                         "qwax.merge_lora(model) for the merged weights, and qwax.save_peft(model, dir) for the "
                         "adapters")
    with atomic_directory(os.fspath(path), overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(_hf_config(model), f, indent=2)
        write_checkpoint(tmp, hf_tensors(model, layout), max_shard_bytes=max_shard_bytes)
        if extra_files is not None:
            extra_files(os.fspath(tmp))
