"""Hugging Face checkpoint keys <-> qwax parameter paths: the mapping every loader, saver and converter uses.

Every checkpoint tensor maps to a slice of one qwax parameter through a `TensorMap`: the qwax path, the index of
the slice (layer group of a scanned stack, expert, gate or up half) and a pair of exact, inverse layout transforms
(transposes of torch's [out, in] Linear weights, the conv1d's singleton axis, the vision patch embedding's
reshape). Nothing is computed on the values, so a load followed by a save is bitwise. The key names and layouts
are those of transformers' Qwen3-Next / Qwen3.5 / Qwen3.5-MoE checkpoints (docs/architecture.md).

A checkpoint spells some things more than one way (a key prefix, fused or per-expert routed experts, for the
main layers and the MTP head separately); `CheckpointLayout` records which, and `tensor_maps` gives every key for a
config and a layout. This module depends only on the configs (and the safetensors reader, to detect a
checkpoint's layout), so the loaders (hf.py), the converters (stream.py)
and the tools that write synthetic checkpoints share it without depending on each other.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from qwax.config import QwaxConfig
from qwax.convert.safetensors_io import CheckpointReader
from qwax.layers.vision import VisionConfig
from qwax.multimodal.config import MultimodalConfig

__all__ = ["TensorMap", "CheckpointLayout", "tensor_maps", "vision_tensor_maps", "multimodal_tensor_maps",
           "model_tensor_maps", "hf_shape", "slice_shape", "ParamPath"]

ParamPath = tuple[Any, ...]  # a qwax parameter's path in nnx.to_flat_state, e.g. ("decoder", "layers", 0, ...)
TEXT_PREFIX = "model."
MULTIMODAL_TEXT_PREFIX = "model.language_model."


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:  # torch Linear weight [out, in] <-> qwax kernel [in, out]
    return np.swapaxes(x, -1, -2)


def _squeeze_conv(x: np.ndarray) -> np.ndarray:  # torch Conv1d weight [C, 1, K] -> [C, K]
    return x[:, 0, :]


def _expand_conv(x: np.ndarray) -> np.ndarray:  # [C, K] -> torch Conv1d weight [C, 1, K]
    return x[:, None, :]


@dataclass(frozen=True)
class TensorMap:
    """Checkpoint key `hf_key` holds `to_hf(param[path][index])`; loading does `param[path][index] = to_qwax(t)`.

    Both transforms are views (transposes, an added or dropped singleton axis) or exact reshapes, and each is
    the other's inverse.
    """

    hf_key: str
    path: ParamPath
    index: tuple[Any, ...]
    to_qwax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


_LINEAR = (_transpose, _transpose)
_SAME = (_identity, _identity)


def _layer_maps(cfg: QwaxConfig, mixer: str, ffn: str, fused_experts: bool
                ) -> Iterator[tuple[str, ParamPath, tuple, tuple]]:
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
        # [E, 2I, H] (gate rows then up rows) and [E, H, I]: qwax holds the transposes [E, H, 2I], [E, I, H].
        yield "mlp.experts.gate_up_proj", ("mlp", "experts_gate_up"), (), _LINEAR
        yield "mlp.experts.down_proj", ("mlp", "experts_down"), (), _LINEAR
        return
    inter = cfg.moe_intermediate_size
    for e in range(cfg.num_experts):
        full = slice(None)
        yield f"mlp.experts.{e}.gate_proj.weight", ("mlp", "experts_gate_up"), (e, full, slice(0, inter)), _LINEAR
        yield f"mlp.experts.{e}.up_proj.weight", ("mlp", "experts_gate_up"), (e, full, slice(inter, 2 * inter)), _LINEAR
        yield f"mlp.experts.{e}.down_proj.weight", ("mlp", "experts_down"), (e,), _LINEAR


def _text_config(cfg: QwaxConfig | MultimodalConfig) -> QwaxConfig:
    return cfg.text if isinstance(cfg, MultimodalConfig) else cfg


@dataclass(frozen=True)
class CheckpointLayout:
    """How a checkpoint spells what qwax holds one way.

    prefix: key prefix of the text model's decoder ("model.", or "model.language_model." in multimodal Qwen3.5
    checkpoints; lm_head.* and mtp.* are top-level either way). fused_experts: routed experts of the decoder
    stored as [E, 2I, H] / [E, H, I] stacks (Qwen3.5 releases) rather than per expert (Qwen3-Next, and what
    transformers' save_pretrained writes); fused_mtp_experts: the same for the MTP layer's experts (per expert in
    Qwen3.5, fused in Qwen3.6).
    """

    prefix: str = TEXT_PREFIX
    fused_experts: bool = True
    fused_mtp_experts: bool = False

    @classmethod
    def default_for(cls, cfg: QwaxConfig | MultimodalConfig) -> "CheckpointLayout":
        """The layout of the model type's published checkpoints: Qwen3-Next per expert, Qwen3.5 fused, MTP
        experts per expert; text keys under model.language_model. for a multimodal model."""
        text = _text_config(cfg)
        prefix = MULTIMODAL_TEXT_PREFIX if isinstance(cfg, MultimodalConfig) else TEXT_PREFIX
        return cls(prefix=prefix, fused_experts=text.model_type != "qwen3_next", fused_mtp_experts=False)

    @classmethod
    def detect(cls, keys: set[str] | list[str], cfg: QwaxConfig | MultimodalConfig) -> "CheckpointLayout":
        """The layout of a checkpoint holding tensors `keys`; what the keys cannot tell (a model without routed
        experts) comes from `default_for(cfg)`."""
        keys = set(keys)
        default = cls.default_for(cfg)
        prefix = MULTIMODAL_TEXT_PREFIX if any(k.startswith(MULTIMODAL_TEXT_PREFIX) for k in keys) else TEXT_PREFIX
        main = [k for k in keys if ".mlp.experts." in k and not k.startswith("mtp.")]
        fused = any(k.endswith("mlp.experts.gate_up_proj") for k in main) if main else default.fused_experts
        fused_mtp = any(k.startswith("mtp.") and k.endswith("mlp.experts.gate_up_proj") for k in keys)
        return cls(prefix=prefix, fused_experts=fused, fused_mtp_experts=fused_mtp)

    @classmethod
    def of_checkpoint(cls, path: str | os.PathLike) -> "CheckpointLayout":
        """The layout of the safetensors checkpoint directory `path` (its config.json and tensor names).

        Pass it to `save_hf` / `hf_tensors` to write a model back in the layout it was loaded from (e.g. a
        Qwen3.6 checkpoint's fused MTP experts), since a loaded model does not remember where it came from.
        """
        cfg = QwaxConfig.from_hf(path)
        with CheckpointReader(path) as reader:
            return cls.detect(reader.keys(), cfg)


def tensor_maps(cfg: QwaxConfig, layout: CheckpointLayout, scanned: bool) -> list[TensorMap]:
    """Every checkpoint tensor of a text model with this config, in checkpoint order.

    scanned: the model stores repeating layer groups stacked (`RunOptions.uses_scan(cfg)`): layer i is then
    slice i // scan_period of group layer i % scan_period.
    """
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
        for j in range(cfg.mtp_num_hidden_layers):
            for suffix, local, index, (to_q, to_h) in _layer_maps(cfg, "full_attention", cfg.mtp_ffn,
                                                                  layout.fused_mtp_experts):
                maps.append(TensorMap(f"mtp.layers.{j}.{suffix}", ("mtp", "block", "layers", j) + local, index,
                                      to_q, to_h))
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

    def dense(key: str, path: ParamPath) -> list[TensorMap]:
        return [TensorMap(f"{key}.weight", path + ("kernel",), (), *_LINEAR),
                TensorMap(f"{key}.bias", path + ("bias",), (), *_SAME)]

    def norm(key: str, path: ParamPath) -> list[TensorMap]:
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


def model_tensor_maps(cfg: QwaxConfig | MultimodalConfig, layout: CheckpointLayout, scanned: bool) -> list[TensorMap]:
    """`multimodal_tensor_maps` for a MultimodalConfig, `tensor_maps` for a QwaxConfig."""
    if isinstance(cfg, MultimodalConfig):
        return multimodal_tensor_maps(cfg, layout, scanned)
    return tensor_maps(cfg, layout, scanned)


def _stand_in(shape: tuple[int, ...]) -> np.ndarray:
    # A zero-stride array of any shape costs nothing, and the transforms are views, so applying them to it
    # computes shapes without touching data.
    return np.broadcast_to(np.zeros((), np.float32), shape)


def hf_shape(m: TensorMap, qwax_slice_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Checkpoint shape of tensor `m.hf_key`, from the shape of the qwax slice `param[m.path][m.index]`."""
    return tuple(m.to_hf(_stand_in(qwax_slice_shape)).shape)


def slice_shape(shape: tuple[int, ...], index: tuple[Any, ...]) -> tuple[int, ...]:
    """Shape of `param[index]` for a parameter of `shape` (index as in TensorMap: ints and slices)."""
    return _stand_in(shape)[index].shape
