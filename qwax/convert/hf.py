"""Hugging Face checkpoints <-> qwax parameters: key names and layouts (shared/spec/ARCHITECTURE.md section 10).

Every checkpoint tensor maps to a slice of one qwax parameter through a `TensorMap`: the qwax path, the index of
the slice (layer group of a scanned stack, expert, gate or up half) and a pair of exact, inverse layout transforms
(transposes of torch's [out, in] Linear weights, the conv1d's singleton axis). Nothing is computed on the values,
so a load followed by a save is bitwise.

`load_hf` reads one tensor at a time and fills one parameter at a time, so peak host memory stays near the model
size plus one tensor; `save_hf` writes a directory that transformers' `from_pretrained` loads with no missing or
unexpected keys, in the layout of the model type's published checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwax.config import QwaxConfig
from qwax.convert.safetensors_io import CheckpointError, CheckpointReader, atomic_directory, write_checkpoint
from qwax.layers.vision import VisionConfig
from qwax.model import QwaxForCausalLM
from qwax.multimodal.config import MultimodalConfig, is_multimodal_config
from qwax.multimodal.model import QwaxForConditionalGeneration

Path = tuple[Any, ...]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


def _squeeze_conv(x: np.ndarray) -> np.ndarray:  # torch Conv1d weight [C, 1, K] -> [C, K]
    return x[:, 0, :]


def _expand_conv(x: np.ndarray) -> np.ndarray:
    return x[:, None, :]


@dataclass(frozen=True)
class TensorMap:
    """Checkpoint key `hf_key` holds `to_hf(param[path][index])`; loading does `param[path][index] = to_qwax(t)`."""

    hf_key: str
    path: Path
    index: tuple[Any, ...]
    to_qwax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


_LINEAR = (_transpose, _transpose)
_SAME = (_identity, _identity)


def _layer_maps(cfg: QwaxConfig, mixer: str, ffn: str, fused_experts: bool) -> Iterator[tuple[str, Path, tuple, tuple]]:
    """(hf suffix, qwax local path, extra index, (to_qwax, to_hf)) of one decoder layer."""
    yield "input_layernorm.weight", ("input_layernorm", "weight"), (), _SAME
    yield "post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), (), _SAME
    if mixer == "linear_attention":
        names = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
        if cfg.gdn_projection_layout == "grouped":
            names = ("in_proj_qkvz", "in_proj_ba")
        for name in (*names, "out_proj"):
            yield f"linear_attn.{name}.weight", ("linear_attn", name, "kernel"), (), _LINEAR
        yield "linear_attn.conv1d.weight", ("linear_attn", "conv1d"), (), (_squeeze_conv, _expand_conv)
        yield "linear_attn.A_log", ("linear_attn", "A_log"), (), _SAME
        yield "linear_attn.dt_bias", ("linear_attn", "dt_bias"), (), _SAME
        yield "linear_attn.norm.weight", ("linear_attn", "norm", "weight"), (), _SAME
    else:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"self_attn.{name}.weight", ("self_attn", name, "kernel"), (), _LINEAR
        for name in ("q_norm", "k_norm"):
            yield f"self_attn.{name}.weight", ("self_attn", name, "weight"), (), _SAME
    if ffn == "dense":
        for name in ("gate_proj", "up_proj", "down_proj"):
            yield f"mlp.{name}.weight", ("mlp", name, "kernel"), (), _LINEAR
        return
    yield "mlp.gate.weight", ("mlp", "gate", "kernel"), (), _LINEAR
    for name in ("gate_proj", "up_proj", "down_proj"):
        yield f"mlp.shared_expert.{name}.weight", ("mlp", "shared_expert", name, "kernel"), (), _LINEAR
    yield "mlp.shared_expert_gate.weight", ("mlp", "shared_expert_gate", "kernel"), (), _LINEAR
    if fused_experts:
        yield "mlp.experts.gate_up_proj", ("mlp", "experts_gate_up"), (), _LINEAR
        yield "mlp.experts.down_proj", ("mlp", "experts_down"), (), _LINEAR
        return
    inter = cfg.moe_intermediate_size
    for e in range(cfg.num_experts):
        full = slice(None)
        yield f"mlp.experts.{e}.gate_proj.weight", ("mlp", "experts_gate_up"), (e, full, slice(0, inter)), _LINEAR
        yield f"mlp.experts.{e}.up_proj.weight", ("mlp", "experts_gate_up"), (e, full, slice(inter, 2 * inter)), _LINEAR
        yield f"mlp.experts.{e}.down_proj.weight", ("mlp", "experts_down"), (e,), _LINEAR


@dataclass(frozen=True)
class CheckpointLayout:
    """How a checkpoint spells things that qwax holds one way: key prefix of the text model and expert layouts."""

    prefix: str = "model."  # "model.language_model." in multimodal Qwen3.5 checkpoints
    fused_experts: bool = True
    fused_mtp_experts: bool = False

    @classmethod
    def default_for(cls, cfg: QwaxConfig) -> "CheckpointLayout":
        """The layout of the model type's published checkpoints (Qwen3-Next per expert, Qwen3.5 fused)."""
        return cls(prefix="model.", fused_experts=cfg.model_type != "qwen3_next", fused_mtp_experts=False)

    @classmethod
    def detect(cls, keys: set[str], cfg: QwaxConfig) -> "CheckpointLayout":
        prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in keys) else "model."
        fused = any(k.endswith("mlp.experts.gate_up_proj") and not k.startswith("mtp.") for k in keys)
        if not any(".mlp.experts." in k and not k.startswith("mtp.") for k in keys):
            fused = cls.default_for(cfg).fused_experts
        fused_mtp = any(k.startswith("mtp.") and k.endswith("mlp.experts.gate_up_proj") for k in keys)
        return cls(prefix=prefix, fused_experts=fused, fused_mtp_experts=fused_mtp)


def tensor_maps(cfg: QwaxConfig, layout: CheckpointLayout, scanned: bool) -> list[TensorMap]:
    """Every checkpoint tensor of a model with this config, in checkpoint order."""
    p = layout.prefix
    maps = [TensorMap(f"{p}embed_tokens.weight", ("embed_tokens",), (), *_SAME)]
    period = cfg.scan_period
    for i, (mixer, ffn) in enumerate(cfg.layer_kinds):
        if scanned:
            base, group = ("decoder", "groups", "layers", i % period), (i // period,)
        else:
            base, group = ("decoder", "layers", i), ()
        for suffix, local, index, (to_q, to_h) in _layer_maps(cfg, mixer, ffn, layout.fused_experts):
            maps.append(TensorMap(f"{p}layers.{i}.{suffix}", base + local, group + index, to_q, to_h))
    maps.append(TensorMap(f"{p}norm.weight", ("norm", "weight"), (), *_SAME))
    if not cfg.tie_word_embeddings:
        maps.append(TensorMap("lm_head.weight", ("lm_head", "kernel"), (), *_LINEAR))
    if cfg.mtp_num_hidden_layers:
        for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            maps.append(TensorMap(f"mtp.{name}.weight", ("mtp", name, "weight"), (), *_SAME))
        maps.append(TensorMap("mtp.fc.weight", ("mtp", "fc", "kernel"), (), *_LINEAR))
        ffn = "moe" if cfg.num_experts and cfg.model_type != "qwen3_5_text" else "dense"
        for j in range(cfg.mtp_num_hidden_layers):
            for suffix, local, index, (to_q, to_h) in _layer_maps(cfg, "full_attention", ffn,
                                                                  layout.fused_mtp_experts):
                maps.append(TensorMap(f"mtp.layers.{j}.{suffix}", ("mtp", "block", "layers", j) + local, index, to_q, to_h))
    return maps


def vision_tensor_maps(cfg: VisionConfig, prefix: str = "model.visual.") -> list[TensorMap]:
    """Every tensor of the vision tower (qwax paths under `visual`). The Conv3d patch embedding
    [D, C, T, P, P] is held as a Linear kernel [C*T*P*P, D] (a reshape and a transpose, both exact)."""
    d = cfg.hidden_size
    conv_shape = (d, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    conv = (lambda x: x.reshape(d, -1).T, lambda x: x.T.reshape(conv_shape))
    maps = [TensorMap(f"{prefix}patch_embed.proj.weight", ("visual", "patch_embed", "kernel"), (), *conv),
            TensorMap(f"{prefix}patch_embed.proj.bias", ("visual", "patch_embed", "bias"), (), *_SAME),
            TensorMap(f"{prefix}pos_embed.weight", ("visual", "pos_embed"), (), *_SAME)]

    def dense(key: str, path: Path) -> list[TensorMap]:
        return [TensorMap(f"{key}.weight", path + ("kernel",), (), *_LINEAR),
                TensorMap(f"{key}.bias", path + ("bias",), (), *_SAME)]

    def norm(key: str, path: Path) -> list[TensorMap]:
        return [TensorMap(f"{key}.{name}", path + (name,), (), *_SAME) for name in ("weight", "bias")]

    for i in range(cfg.depth):
        key, path = f"{prefix}blocks.{i}", ("visual", "blocks", i)
        maps += norm(f"{key}.norm1", path + ("norm1",)) + norm(f"{key}.norm2", path + ("norm2",))
        maps += dense(f"{key}.attn.qkv", path + ("attn", "qkv")) + dense(f"{key}.attn.proj", path + ("attn", "proj"))
        maps += dense(f"{key}.mlp.linear_fc1", path + ("mlp", "linear_fc1"))
        maps += dense(f"{key}.mlp.linear_fc2", path + ("mlp", "linear_fc2"))
    maps += norm(f"{prefix}merger.norm", ("visual", "merger", "norm"))
    maps += dense(f"{prefix}merger.linear_fc1", ("visual", "merger", "linear_fc1"))
    maps += dense(f"{prefix}merger.linear_fc2", ("visual", "merger", "linear_fc2"))
    return maps


def multimodal_tensor_maps(cfg: MultimodalConfig, layout: CheckpointLayout, scanned: bool) -> list[TensorMap]:
    """Every tensor of a multimodal checkpoint: the text model under `language_model` (keys with the layout's
    prefix, normally model.language_model.; lm_head and mtp.* at the top level) and the tower under model.visual."""
    text = [dataclasses.replace(m, path=("language_model",) + m.path) for m in tensor_maps(cfg.text, layout, scanned)]
    return text + vision_tensor_maps(cfg.vision)


def _hf_shape(m: TensorMap, slice_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Checkpoint shape of a slice: apply the (view-only) transform to a zero-stride stand-in."""
    return tuple(m.to_hf(np.broadcast_to(np.zeros((), np.float32), slice_shape)).shape)


def _slice_shape(shape: tuple[int, ...], index: tuple[Any, ...]) -> tuple[int, ...]:
    return np.broadcast_to(np.zeros((), np.float32), shape)[index].shape


def _abstract_model(cfg: QwaxConfig | MultimodalConfig) -> tuple[nnx.GraphDef, nnx.State]:
    cls = QwaxForConditionalGeneration if isinstance(cfg, MultimodalConfig) else QwaxForCausalLM
    abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def load_hf(path: str | os.PathLike, dtype: str = "float32", param_dtype: str | None = None, *,
            text_only: bool = False, mesh: jax.sharding.Mesh | None = None, rules: Any = None,
            **config_overrides: Any) -> QwaxForCausalLM | QwaxForConditionalGeneration:
    """Load a transformers checkpoint directory (config.json + safetensors, single file or sharded with index).

    A multimodal Qwen3.5 checkpoint (model_type qwen3_5 / qwen3_5_moe with a vision_config) loads as a
    QwaxForConditionalGeneration (vision tower + text model) unless `text_only`, which loads its text model alone
    as a QwaxForCausalLM and ignores model.visual.*.
    dtype: compute dtype; param_dtype: storage dtype of the parameters (default: dtype). A_log and the GDN norm
    weight stay float32. config_overrides replace QwaxConfig fields (e.g. scan_layers=False, gdn_impl="xla").
    mesh, rules: place every parameter directly in its sharded form (rules: a qwax.sharding strategy name or rule
    table, default "fsdp"); each device's shard is read from only the checkpoint rows it covers, so no host or
    device holds a whole expert stack (qwax.convert.stream.place_from_hf).
    Raises CheckpointError naming the key for missing tensors, wrong shapes or corrupt files.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    overrides = dict(dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides)
    multimodal = not text_only and is_multimodal_config(path)
    mm_cfg = MultimodalConfig.from_hf(path, **overrides) if multimodal else None
    cfg = mm_cfg.text if multimodal else QwaxConfig.from_hf(path, **overrides)
    with CheckpointReader(path) as reader:
        keys = set(reader.keys())
        if cfg.mtp_num_hidden_layers and not any(k.startswith("mtp.") for k in keys):
            warnings.warn(f"{path}: config asks for {cfg.mtp_num_hidden_layers} MTP layer(s) but the checkpoint has "
                          "no mtp.* tensors (transformers drops them on save); loading without the MTP head.")
            cfg = cfg.replace(mtp_num_hidden_layers=0)
        layout = CheckpointLayout.detect(keys, cfg)
        if multimodal:
            mm_cfg = mm_cfg.replace(text=cfg)
            graphdef, abstract = _abstract_model(mm_cfg)
            maps = multimodal_tensor_maps(mm_cfg, layout, cfg.uses_scan)
        else:
            graphdef, abstract = _abstract_model(cfg)
            maps = tensor_maps(cfg, layout, cfg.uses_scan)
        missing = [m.hf_key for m in maps if m.hf_key not in keys]
        if missing:
            raise CheckpointError(f"{path}: checkpoint is missing {len(missing)} tensor(s), first {missing[0]!r}"
                                  + (f" (also {missing[1:4]})" if len(missing) > 1 else ""))
        used = {m.hf_key for m in maps}
        if cfg.tie_word_embeddings:
            used.add("lm_head.weight")  # a tied head is sometimes saved too; it equals the embedding
        extra = sorted(k for k in keys - used)
        if extra:
            warnings.warn(f"{path}: ignoring {len(extra)} tensor(s) qwax does not use, e.g. {extra[:3]}")

        by_path: dict[Path, list[TensorMap]] = {}
        for m in maps:
            by_path.setdefault(m.path, []).append(m)
        flat = nnx.to_flat_state(abstract)
        if mesh is not None:
            from qwax.convert.stream import HFSource, param_shardings_for, place_from_hf
            shardings, source = param_shardings_for(abstract, mesh, rules), HFSource(reader)
        values: dict[Path, jax.Array] = {}
        for p, variable in flat:
            spec = variable.get_value()
            if p not in by_path:
                raise CheckpointError(f"qwax parameter {'.'.join(map(str, p))} has no checkpoint tensor mapped to it")
            for m in by_path[p]:
                want = _hf_shape(m, _slice_shape(spec.shape, m.index))
                got = tuple(reader.shape(m.hf_key))
                if got != want:
                    raise CheckpointError(f"{path}: tensor {m.hf_key!r} has shape {list(got)}, expected {list(want)}")
            if mesh is not None:
                values[p] = place_from_hf(tuple(spec.shape), np.dtype(spec.dtype), by_path[p], shardings[p], source)
                continue
            buf = np.zeros(spec.shape, np.dtype(spec.dtype))
            filled = 0
            for m in by_path[p]:
                want = _hf_shape(m, _slice_shape(spec.shape, m.index))
                buf[m.index] = m.to_qwax(reader.get(m.hf_key)).astype(buf.dtype)
                filled += int(np.prod(want))
            if filled != buf.size:
                raise CheckpointError(f"qwax parameter {'.'.join(map(str, p))}: checkpoint tensors cover {filled} "
                                      f"of {buf.size} values")
            values[p] = jnp.asarray(buf)
            del buf
    for p, variable in flat:
        variable.set_value(values.pop(p))
    model = nnx.merge(graphdef, abstract)
    model.hf_layout = layout
    return model


def hf_tensors(model: QwaxForCausalLM | QwaxForConditionalGeneration, layout: CheckpointLayout | None = None
               ) -> Iterator[tuple[str, np.ndarray]]:
    """(checkpoint key, numpy array) for every tensor of `model`, one parameter converted at a time.

    Default layout: the model type's published one for the main experts (text keys under model.language_model.
    for a multimodal model); MTP experts as the checkpoint the model was loaded from stored them (Qwen3.5 per
    expert, Qwen3.6 fused).
    """
    multimodal = isinstance(model, QwaxForConditionalGeneration)
    cfg = model.config.text if multimodal else model.config
    if layout is None:
        loaded = getattr(model, "hf_layout", None)
        fused_mtp = loaded.fused_mtp_experts if loaded is not None else False
        layout = dataclasses.replace(CheckpointLayout.default_for(cfg), fused_mtp_experts=fused_mtp,
                                     prefix="model.language_model." if multimodal else "model.")
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    by_path: dict[Path, list[TensorMap]] = {}
    maps = multimodal_tensor_maps(model.config, layout, cfg.uses_scan) if multimodal else tensor_maps(
        cfg, layout, cfg.uses_scan)
    for m in maps:
        by_path.setdefault(m.path, []).append(m)
    for p, group in by_path.items():
        variable = state[p]
        array = np.asarray(variable.get_value())
        for m in group:
            yield m.hf_key, np.ascontiguousarray(m.to_hf(array[m.index]))


def save_hf(model: QwaxForCausalLM | QwaxForConditionalGeneration, path: str | os.PathLike, *, max_shard_bytes: int | None = None,
            overwrite: bool = False, extra_files: Callable[[str], None] | None = None) -> None:
    """Write `model` as a transformers checkpoint directory (config.json + safetensors).

    The directory is assembled under a temporary name and renamed into place only when complete; with
    `overwrite`, an existing `path` stays whole until then. `extra_files(tmp_dir)` may add files (a tokenizer)
    that must appear together with the weights. Experts are written as the model type's published checkpoints
    store them (Qwen3-Next per expert, Qwen3.5 fused); MTP weights are kept, in the layout they were loaded in.
    """
    with atomic_directory(os.fspath(path), overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model.config.to_hf(), f, indent=2)
        write_checkpoint(tmp, hf_tensors(model), max_shard_bytes=max_shard_bytes)
        if extra_files is not None:
            extra_files(os.fspath(tmp))
