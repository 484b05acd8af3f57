"""Model configuration: one frozen dataclass for Qwen3-Next, Qwen3.5 (dense) and Qwen3.5-MoE text models.

The field names follow the Hugging Face configs (the contract with checkpoints). `QwaxConfig.from_hf` reads a
`config.json` of any of the supported model types (including the `text_config` of a multimodal Qwen3.5 config) and
`QwaxConfig.to_hf` writes one back. It holds only what a checkpoint's config.json holds, plus properties derived
from it; how a model runs (dtypes, kernels, scan, remat) is `qwax.options.RunOptions`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

from qwax.json_files import read_json_object
from qwax.options import OPTION_NAMES

MODEL_TYPES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
_MULTIMODAL_TYPES = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
LAYER_TYPES = ("linear_attention", "full_attention")

# HF architecture names per model type, for config.json files written by `to_hf`.
_ARCHITECTURES = {
    "qwen3_next": "Qwen3NextForCausalLM",
    "qwen3_5_text": "Qwen3_5ForCausalLM",
    "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
}


class ConfigError(ValueError):
    """A config.json value that qwax cannot represent or does not support."""


def _bad(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"config field {key!r} = {value!r}: expected {expected}")


# ------------------------------------------------------------------------------------------ rope scaling
# rope_type values that mean unscaled RoPE ("mrope" is the legacy Qwen2-VL spelling of it).
UNSCALED_ROPE_TYPES = ("default", "mrope")
# Scaled types and the rope_parameters keys each reads (beyond rope_type / rope_theta / partial_rotary_factor).
ROPE_SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}
REFUSED_ROPE_TYPES = {
    "dynamic": "dynamic NTK recomputes the frequencies from the longest sequence the module has seen so far "
               "(state transformers keeps between calls), which a compiled qwax model cannot reproduce; use 'yarn'",
    "longrope": "LongRoPE needs per-frequency short_factor / long_factor lists, switched by the running sequence "
                "length, which qwax does not implement; use 'yarn'",
}
# Keys every rope_parameters dict may hold whatever its type; they are QwaxConfig fields of their own.
_BASE_ROPE_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved")


def _check_scaled_rope_type(rope_type: Any) -> None:
    """ConfigError naming `rope_type` unless it is one qwax scales (saying why for the ones it refuses)."""
    if rope_type in REFUSED_ROPE_TYPES:
        raise ConfigError(f"config field 'rope_parameters.rope_type' = {rope_type!r} is not supported: "
                          f"{REFUSED_ROPE_TYPES[rope_type]}")
    if rope_type not in ROPE_SCALING_KEYS:
        raise _bad("rope_parameters.rope_type", rope_type,
                   f"one of {list(UNSCALED_ROPE_TYPES + tuple(ROPE_SCALING_KEYS))}")


def _unused_key(key: str, value: Any, rope_type: str) -> ConfigError:
    return ConfigError(f"config field 'rope_parameters.{key}' = {value!r}: rope_type {rope_type!r} has no such "
                       f"key (it reads {list(ROPE_SCALING_KEYS[rope_type])}); remove it or change the type")


def _number(key: str, value: Any, expected: str = "a number", positive: bool = False) -> float:
    """`value` as a float; ConfigError naming `key` for a non-number (bools and strings included) or, with
    `positive`, a number <= 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise _bad(key, value, expected)
    return float(value)


@dataclass(frozen=True)
class RopeScaling:
    """How a long-context checkpoint scales its rotary frequencies: the `rope_parameters` of its config.json
    beyond rope_theta / partial_rotary_factor / M-RoPE, with transformers' defaults. qwax.layers.rope_scaling
    turns it into inverse frequencies and a cos/sin factor (docs/model.md, "Long context").

    linear: every inverse frequency is divided by `factor`.
    yarn: frequencies that turn fewer than `beta_slow` times over `original_max_position_embeddings` positions
      are divided by `factor`, those turning more than `beta_fast` times are kept, a linear ramp blends between;
      cos and sin are multiplied by `attention_factor` (default 0.1 ln(factor) + 1, or the ratio of the mscale
      terms when both `mscale` and `mscale_all_dim` are set). `truncate` rounds the ramp's ends to whole dims.
    llama3: wavelengths longer than original / low_freq_factor are divided by `factor`, shorter than original /
      high_freq_factor kept, and smoothly interpolated in between.
    """

    rope_type: str
    factor: float
    # yarn, llama3: the pretraining context length (QwaxConfig fills in its max_position_embeddings when None).
    original_max_position_embeddings: int | None = None
    # yarn only.
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # llama3 only (required there).
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None

    def __post_init__(self) -> None:
        t = self.rope_type
        _check_scaled_rope_type(t)
        used = ROPE_SCALING_KEYS[t]
        for f in dataclasses.fields(self):
            if f.name not in ("rope_type",) + used and getattr(self, f.name) != f.default:
                raise _unused_key(f.name, getattr(self, f.name), t)

        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("factor", _number("rope_parameters.factor", self.factor,
                              "a number > 0 (the context-length scale factor)", positive=True))
        orig = self.original_max_position_embeddings
        if orig is not None:
            if isinstance(orig, float) and orig.is_integer():
                orig = int(orig)  # 262144.0 from a JSON writer that spells every number as a float
            if isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0:
                raise _bad("rope_parameters.original_max_position_embeddings", orig, "a positive integer")
            put("original_max_position_embeddings", orig)
        if t == "yarn":
            for name in ("beta_fast", "beta_slow"):
                put(name, _number(f"rope_parameters.{name}", getattr(self, name), "a number > 0", positive=True))
            if self.beta_fast < self.beta_slow:
                raise _bad("rope_parameters.beta_fast", self.beta_fast, f">= beta_slow = {self.beta_slow}")
            if self.attention_factor is not None:
                put("attention_factor", _number("rope_parameters.attention_factor", self.attention_factor,
                                                "a number > 0 (the cos/sin multiplier), or null", positive=True))
            for name in ("mscale", "mscale_all_dim"):
                if getattr(self, name) is not None:
                    put(name, _number(f"rope_parameters.{name}", getattr(self, name), "a number, or null"))
            if not isinstance(self.truncate, bool):
                raise _bad("rope_parameters.truncate", self.truncate, "true or false")
        if t == "llama3":
            need = "a number (llama3 needs low_freq_factor and high_freq_factor)"
            low = _number("rope_parameters.low_freq_factor", self.low_freq_factor, need)
            high = _number("rope_parameters.high_freq_factor", self.high_freq_factor, need)
            if high <= low:
                raise _bad("rope_parameters.high_freq_factor", high, f"> low_freq_factor = {low}")
            put("low_freq_factor", low)
            put("high_freq_factor", high)

    @classmethod
    def from_hf(cls, rope: Mapping[str, Any], max_position_embeddings: int,
                original_max_position_embeddings: int | None = None) -> "RopeScaling | None":
        """The scaling a transformers `rope_parameters` dict asks for; None for unscaled RoPE.

        `original_max_position_embeddings` (yarn, llama3) comes from the dict, else `max_position_embeddings`, as in
        transformers; a top-level config field of that name (pass it as `original_max_position_embeddings`) takes
        precedence, as transformers gives it when it builds the model. Keys this type does not read raise.
        """
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in UNSCALED_ROPE_TYPES:
            return None
        _check_scaled_rope_type(rope_type)
        used = ROPE_SCALING_KEYS[rope_type]
        extra = sorted(set(rope) - set(used) - set(_BASE_ROPE_KEYS))
        if extra:
            raise _unused_key(extra[0], rope[extra[0]], rope_type)
        # transformers reads a null beta / attention factor / mscale as absent.
        kwargs = {k: rope[k] for k in used if rope.get(k) is not None}
        if "factor" not in kwargs:
            raise _bad("rope_parameters.factor", rope.get("factor"),
                       f"a number > 0: rope_type {rope_type!r} needs the context-length scale factor")
        if "truncate" in rope and rope["truncate"] is None:
            raise _bad("rope_parameters.truncate", None, "true or false")
        if "original_max_position_embeddings" in used:
            if original_max_position_embeddings is not None:
                kwargs["original_max_position_embeddings"] = original_max_position_embeddings
            kwargs.setdefault("original_max_position_embeddings", max_position_embeddings)
        return cls(rope_type=rope_type, **kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The rope_parameters keys of this scaling (rope_type, factor, and every other field it reads that is not
        at transformers' default)."""
        out: dict[str, Any] = {"rope_type": self.rope_type}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in ROPE_SCALING_KEYS[self.rope_type]:
            value = getattr(self, name)
            if value != defaults[name] or name in ("factor", "original_max_position_embeddings"):
                out[name] = value
        return out


@dataclass(frozen=True)
class QwaxConfig:
    """Architecture of a Qwen3-Next / Qwen3.5 text model: the fields of its HF config.json.

    Layer `i` mixes tokens with Gated DeltaNet when `layer_types[i] == "linear_attention"` and with gated full
    attention when it is `"full_attention"`; its feed-forward is a sparse MoE (with a shared expert) when
    `is_moe_layer(i)`, else a dense SwiGLU MLP of width `intermediate_size`.
    """

    model_type: str = "qwen3_5_moe_text"
    vocab_size: int = 248320
    hidden_size: int = 2048
    num_hidden_layers: int = 40
    layer_types: tuple[str, ...] = ()  # empty: built from full_attention_interval
    full_attention_interval: int = 4
    # Gated full attention.
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    # Gated DeltaNet (linear attention).
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    # Feed-forward: dense SwiGLU width, and the sparse MoE (num_experts == 0 means dense everywhere).
    intermediate_size: int = 0
    num_experts: int = 256
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    # Rotary embedding: only the first `partial_rotary_factor * head_dim` dims of each head rotate.
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, ...] = ()  # Qwen3.5 multimodal sections (T, H, W); empty for Qwen3-Next
    mrope_interleaved: bool = False
    # Long-context frequency scaling (yarn, linear, llama3); None: plain RoPE. A dict is read as rope_parameters.
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    mtp_num_hidden_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            interval = self.full_attention_interval
            types = tuple(
                "full_attention" if (i + 1) % interval == 0 else "linear_attention"
                for i in range(self.num_hidden_layers)
            )
            object.__setattr__(self, "layer_types", types)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        scaling = self.rope_scaling
        if isinstance(scaling, Mapping):
            scaling = RopeScaling.from_hf(scaling, self.max_position_embeddings)
        if (isinstance(scaling, RopeScaling) and scaling.original_max_position_embeddings is None
                and "original_max_position_embeddings" in ROPE_SCALING_KEYS[scaling.rope_type]):
            # As transformers: an unstated pretraining length is the config's own maximum.
            scaling = dataclasses.replace(scaling, original_max_position_embeddings=self.max_position_embeddings)
        object.__setattr__(self, "rope_scaling", scaling)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value qwax cannot run."""
        bad = _bad
        if self.model_type not in MODEL_TYPES:
            raise bad("model_type", self.model_type, f"one of {MODEL_TYPES}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise bad("layer_types", f"<{len(self.layer_types)} entries>", f"{self.num_hidden_layers} entries")
        for t in self.layer_types:
            if t not in LAYER_TYPES:
                raise bad("layer_types", t, f"entries in {LAYER_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_attention_heads", self.num_attention_heads,
                      f"a multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise bad("linear_num_value_heads", self.linear_num_value_heads,
                      f"a multiple of linear_num_key_heads={self.linear_num_key_heads}")
        rot = self.rotary_dim
        if rot % 2 or not 0 < rot <= self.head_dim:
            raise bad("partial_rotary_factor", self.partial_rotary_factor,
                      f"a factor giving an even rotary dim in (0, head_dim={self.head_dim}]")
        if self.mrope_section and sum(self.mrope_section) != rot // 2:
            raise bad("mrope_section", list(self.mrope_section), f"sections summing to rotary_dim/2 = {rot // 2}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise bad("rope_scaling", self.rope_scaling, "a qwax.config.RopeScaling, a rope_parameters dict, or None")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise bad("num_experts_per_tok", self.num_experts_per_tok, f"in [1, num_experts={self.num_experts}]")
        if any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers)) and self.intermediate_size <= 0:
            raise bad("intermediate_size", self.intermediate_size, "> 0 because some layers use a dense MLP")

    # ---------------------------------------------------------- derived sizes
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def gdn_projection_layout(self) -> str:
        """'grouped' (Qwen3-Next in_proj_qkvz / in_proj_ba) or 'flat' (Qwen3.5 in_proj_qkv/z/b/a)."""
        return "grouped" if self.model_type == "qwen3_next" else "flat"

    @property
    def has_moe(self) -> bool:
        """Whether the family uses sparse MoE feed-forwards at all (Qwen3.5 dense models never do)."""
        return self.num_experts > 0 and self.model_type != "qwen3_5_text"

    @property
    def normalise_topk(self) -> bool:
        """Whether the top-k router weights are renormalised to sum to 1: always for Qwen3.5-MoE, as
        `norm_topk_prob` says for Qwen3-Next."""
        return self.norm_topk_prob or self.model_type == "qwen3_5_moe_text"

    @property
    def mtp_ffn(self) -> str:
        """Feed-forward of the MTP layers: the model's MoE when it has one, else its dense MLP."""
        return "moe" if self.has_moe else "dense"

    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder layer i's feed-forward is the sparse MoE (else the dense SwiGLU MLP)."""
        if not self.has_moe:
            return False
        if self.model_type == "qwen3_5_moe_text":
            return True
        return i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @property
    def layer_kinds(self) -> tuple[tuple[str, str], ...]:
        """(mixer, ffn) per layer: mixer in LAYER_TYPES, ffn in ('moe', 'dense')."""
        return tuple(
            (self.layer_types[i], "moe" if self.is_moe_layer(i) else "dense") for i in range(self.num_hidden_layers)
        )

    @property
    def scan_period(self) -> int:
        """Smallest p dividing the depth such that layer kinds repeat with period p (p = depth if none)."""
        kinds, n = self.layer_kinds, self.num_hidden_layers
        for p in range(1, n + 1):
            if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
                return p
        return n

    # ------------------------------------------------------------ parameters
    def param_count(self, include_mtp: bool = False) -> tuple[int, int]:
        """(total, active per token) parameter counts.

        Both include the embedding table and the LM head (counted once when tied); `active` counts the routed
        experts a token actually uses (top-k of E) plus everything dense. MTP layers are excluded unless
        `include_mtp`, matching how the published sizes are quoted (e.g. 397B for Qwen3.5-397B-A17B).
        """
        h = self.hidden_size
        norm = h
        gdn = (h * self.linear_conv_dim + h * self.linear_value_dim + 2 * h * self.linear_num_value_heads
               + self.linear_conv_dim * self.linear_conv_kernel_dim + 2 * self.linear_num_value_heads
               + self.linear_value_head_dim + self.linear_value_dim * h)
        attn = (h * self.num_attention_heads * self.head_dim * 2 + 2 * h * self.num_key_value_heads * self.head_dim
                + self.num_attention_heads * self.head_dim * h + 2 * self.head_dim)
        expert = 3 * h * self.moe_intermediate_size
        shared = 3 * h * self.shared_expert_intermediate_size + h
        moe_total = h * self.num_experts + self.num_experts * expert + shared
        moe_active = h * self.num_experts + self.num_experts_per_tok * expert + shared
        dense = 3 * h * self.intermediate_size

        def layer(mixer: str, ffn: str) -> tuple[int, int]:
            mix = gdn if mixer == "linear_attention" else attn
            total = 2 * norm + mix + (moe_total if ffn == "moe" else dense)
            active = 2 * norm + mix + (moe_active if ffn == "moe" else dense)
            return total, active

        total = active = 0
        for mixer, ffn in self.layer_kinds:
            t, a = layer(mixer, ffn)
            total, active = total + t, active + a
        t, a = layer("full_attention", self.mtp_ffn)
        n_mtp = self.mtp_num_hidden_layers if include_mtp else 0
        mtp_t = n_mtp * (t + 2 * h * h + 3 * norm)
        mtp_a = n_mtp * (a + 2 * h * h + 3 * norm)
        emb = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return total + mtp_t + emb + head + norm, active + mtp_a + emb + head + norm

    # ------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> "QwaxConfig":
        """Read a transformers config (a dict, a config.json path, or a checkpoint directory).

        Accepts model types qwen3_next, qwen3_5_text, qwen3_5_moe_text, and the multimodal qwen3_5 / qwen3_5_moe
        configs (their `text_config` is used). `overrides` replace fields after reading (e.g. num_hidden_layers=2).
        """
        if isinstance(path_or_dict, Mapping):
            cfg = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path}")
            cfg = read_json_object(path, ConfigError)
        model_type = cfg.get("model_type")
        top = cfg
        if model_type in _MULTIMODAL_TYPES:
            text = dict(cfg.get("text_config") or {})
            text.setdefault("model_type", _MULTIMODAL_TYPES[model_type])
            # MTP and tie settings are stored at either level depending on the release.
            for key in ("mtp_num_hidden_layers", "tie_word_embeddings"):
                if key not in text and key in top:
                    text[key] = top[key]
            cfg, model_type = text, text["model_type"]
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"config field 'model_type' = {model_type!r}: expected one of {MODEL_TYPES + tuple(_MULTIMODAL_TYPES)}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config field 'hidden_act' = {cfg['hidden_act']!r}: only 'silu' is supported")
        if cfg.get("attention_bias", False):
            raise ConfigError("config field 'attention_bias' = True: Qwen3.5 attention has no biases")

        rope = _rope_parameters(cfg)
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25))
        mrope_section = rope.get("mrope_section")
        if mrope_section is None and model_type != "qwen3_next":
            mrope_section = [11, 11, 10]  # transformers' default for Qwen3.5
        mrope_interleaved = rope.get("mrope_interleaved", model_type != "qwen3_next")
        max_len = cfg.get("max_position_embeddings", cls.max_position_embeddings)
        scaling = RopeScaling.from_hf(rope, max_len, cfg.get("original_max_position_embeddings"))

        _reject_run_options(overrides, "QwaxConfig.from_hf")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: cfg[k] for k in names if k in cfg and cfg[k] is not None}
        kwargs.update(
            model_type=model_type, rope_theta=float(theta), partial_rotary_factor=float(partial),
            mrope_section=tuple(mrope_section or ()), mrope_interleaved=bool(mrope_interleaved),
            rope_scaling=scaling,
        )
        if model_type == "qwen3_5_text":
            kwargs["num_experts"] = 0
        if "mtp_num_hidden_layers" not in cfg and "num_nextn_predict_layers" in cfg:
            kwargs["mtp_num_hidden_layers"] = cfg["num_nextn_predict_layers"]
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self, dtype: Any = None) -> dict[str, Any]:
        """The transformers config.json dict of the text-only causal LM of this model type; `dtype` (the
        parameters' storage dtype, e.g. "bfloat16") is recorded as transformers' "dtype" when given."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.partial_rotary_factor}
        if self.mrope_section:
            rope.update(mrope_section=list(self.mrope_section), mrope_interleaved=self.mrope_interleaved)
        if self.rope_scaling is not None:
            rope.update(self.rope_scaling.to_hf())
        out: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "layer_types": list(self.layer_types),
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "linear_num_key_heads": self.linear_num_key_heads,
            "linear_num_value_heads": self.linear_num_value_heads,
            "linear_key_head_dim": self.linear_key_head_dim,
            "linear_value_head_dim": self.linear_value_head_dim,
            "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "qwen3_5_text" or self.model_type == "qwen3_next":
            out["intermediate_size"] = self.intermediate_size
        if self.model_type != "qwen3_5_text":
            out.update(
                num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                router_aux_loss_coef=self.router_aux_loss_coef,
            )
        if self.model_type == "qwen3_next":
            out.update(norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=self.decoder_sparse_step,
                       mlp_only_layers=list(self.mlp_only_layers))
        if self.mtp_num_hidden_layers:
            out["mtp_num_hidden_layers"] = self.mtp_num_hidden_layers
        if dtype is not None:
            out["dtype"] = str(dtype)
        return out

    def replace(self, **changes: Any) -> "QwaxConfig":
        """dataclasses.replace, except that a new depth or interval rebuilds layer_types when it followed
        full_attention_interval and was not given."""
        _reject_run_options(changes, "QwaxConfig.replace")
        derived = len(set(self.layer_types)) and self.layer_types == QwaxConfig(
            model_type=self.model_type, num_hidden_layers=self.num_hidden_layers, num_experts=0,
            intermediate_size=1, full_attention_interval=self.full_attention_interval).layer_types
        if derived and "layer_types" not in changes and {"num_hidden_layers", "full_attention_interval"} & set(changes):
            changes["layer_types"] = ()
        return dataclasses.replace(self, **changes)


def _reject_run_options(kwargs: Mapping[str, Any], where: str) -> None:
    run = sorted(OPTION_NAMES & set(kwargs))
    if run:
        raise ConfigError(f"{where}: {run} are run options, not checkpoint config fields: pass "
                          f"qwax.RunOptions({run[0]}=...) to the model (or to load_hf) instead")


def _rope_parameters(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The rope dict transformers builds the rotary embedding from: a non-empty legacy `rope_scaling` replaces
    `rope_parameters` whole (transformers' rule; keys it lacks fall back to the top-level fields and defaults)."""
    rope = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling")
    if legacy:
        if rope and rope != dict(legacy):
            warnings.warn(f"config has both rope_scaling {dict(legacy)} and rope_parameters {rope}: rope_scaling "
                          "replaces rope_parameters, as in transformers (put everything in rope_parameters)",
                          stacklevel=3)
        rope = dict(legacy)
    return rope


def _preset(**kw: Any) -> QwaxConfig:
    return QwaxConfig(**kw)


# Published sizes (from the released config.json files; docs/architecture.md lists them).
_NEXT = dict(model_type="qwen3_next", vocab_size=151936, rope_theta=5_000_000.0, mrope_section=(),
             mrope_interleaved=False, eos_token_id=151645)
_Q35 = dict(vocab_size=248320, rope_theta=10_000_000.0, mrope_section=(11, 11, 10), mrope_interleaved=True,
            mtp_num_hidden_layers=1, eos_token_id=248044)
PRESETS: dict[str, QwaxConfig] = {
    "qwen3-next-80b-a3b": _preset(
        **_NEXT, hidden_size=2048, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2,
        linear_num_key_heads=16, linear_num_value_heads=32, intermediate_size=5120, num_experts=512,
        num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512,
        mtp_num_hidden_layers=1),
    "qwen3.5-397b-a17b": _preset(
        **_Q35, model_type="qwen3_5_moe_text", hidden_size=4096, num_hidden_layers=60, num_attention_heads=32,
        num_key_value_heads=2, linear_num_key_heads=16, linear_num_value_heads=64, num_experts=512,
        num_experts_per_tok=10, moe_intermediate_size=1024, shared_expert_intermediate_size=1024),
    "qwen3.5-122b-a10b": _preset(
        **_Q35, model_type="qwen3_5_moe_text", hidden_size=3072, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=2, linear_num_key_heads=16, linear_num_value_heads=64, num_experts=256,
        num_experts_per_tok=8, moe_intermediate_size=1024, shared_expert_intermediate_size=1024),
    "qwen3.5-35b-a3b": _preset(
        **_Q35, model_type="qwen3_5_moe_text", hidden_size=2048, num_hidden_layers=40, num_attention_heads=16,
        num_key_value_heads=2, linear_num_key_heads=16, linear_num_value_heads=32, num_experts=256,
        num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=512),
    "qwen3.5-27b": _preset(
        **_Q35, model_type="qwen3_5_text", hidden_size=5120, num_hidden_layers=64, num_attention_heads=24,
        num_key_value_heads=4, linear_num_key_heads=16, linear_num_value_heads=48, num_experts=0,
        intermediate_size=17408),
    "qwen3.5-9b": _preset(
        **_Q35, model_type="qwen3_5_text", hidden_size=4096, num_hidden_layers=32, num_attention_heads=16,
        num_key_value_heads=4, linear_num_key_heads=16, linear_num_value_heads=32, num_experts=0,
        intermediate_size=12288),
    "qwen3.5-4b": _preset(
        **_Q35, model_type="qwen3_5_text", hidden_size=2560, num_hidden_layers=32, num_attention_heads=16,
        num_key_value_heads=4, linear_num_key_heads=16, linear_num_value_heads=32, num_experts=0,
        intermediate_size=9216, tie_word_embeddings=True),
    "qwen3.5-0.8b": _preset(
        **_Q35, model_type="qwen3_5_text", hidden_size=1024, num_hidden_layers=24, num_attention_heads=8,
        num_key_value_heads=2, linear_num_key_heads=16, linear_num_value_heads=16, num_experts=0,
        intermediate_size=3584, tie_word_embeddings=True),
    # Tiny shapes for tests and CPU demos (same structure as the real models, small numbers).
    "tiny-moe": _preset(
        model_type="qwen3_5_moe_text", vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, mrope_section=(1, 1, 0), mrope_interleaved=True,
        max_position_embeddings=4096),
    "tiny-dense": _preset(
        model_type="qwen3_5_text", vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, num_experts=0, intermediate_size=128, mrope_section=(1, 1, 0),
        mrope_interleaved=True, max_position_embeddings=4096),
    "tiny-next": _preset(
        model_type="qwen3_next", vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, intermediate_size=64, max_position_embeddings=4096),
}


def rope_overrides(cfg: QwaxConfig, rope_scaling: str | None = None,
                   rope_parameters: str | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The QwaxConfig field overrides (for `QwaxConfig.from_hf` / `qwax.load_hf(path, **overrides)`) that change
    the rotary embedding of `cfg`, a checkpoint's config, without editing its config.json.

    rope_scaling: "TYPE:FACTOR" (e.g. "yarn:4"): that scaling, with original_max_position_embeddings the
      checkpoint's own pretraining length (its original_max_position_embeddings if it is scaled already, else its
      max_position_embeddings).
    rope_parameters: a JSON object (text or dict) merged over the checkpoint's rope_parameters after rope_scaling
      (a null value deletes a key), like vLLM's --hf-overrides; e.g. '{"beta_fast": 16}'.
    A new rope_type starts from the checkpoint's rope_theta, partial_rotary_factor and M-RoPE keys only. With
    scaling, max_position_embeddings becomes factor x the pretraining length; without, the pretraining length.
    Raises ConfigError naming the flag or the rope_parameters field and what was expected.
    """
    hf = cfg.to_hf()
    rope: dict[str, Any] = dict(hf["rope_parameters"])
    scaled = cfg.rope_scaling
    pretrain_len = cfg.max_position_embeddings
    if scaled is not None and scaled.original_max_position_embeddings is not None:
        pretrain_len = scaled.original_max_position_embeddings

    def retype(new_type: Any) -> None:
        if new_type != rope.get("rope_type"):
            for key in [k for k in rope if k not in _BASE_ROPE_KEYS]:
                del rope[key]
            rope["rope_type"] = new_type

    if rope_scaling is not None:
        rope_type, sep, factor_text = str(rope_scaling).partition(":")
        rope_type = rope_type.strip().lower()
        if not sep or not factor_text.strip():
            raise ConfigError(f"--rope-scaling {rope_scaling!r}: expected TYPE:FACTOR, e.g. yarn:4 (types "
                              f"{list(ROPE_SCALING_KEYS)})")
        try:
            factor = float(factor_text)
        except ValueError:
            raise ConfigError(f"--rope-scaling {rope_scaling!r}: the factor {factor_text!r} is not a number "
                              "(expected TYPE:FACTOR, e.g. yarn:4)") from None
        _check_scaled_rope_type(rope_type)
        retype(rope_type)
        rope["factor"] = factor
        if "original_max_position_embeddings" in ROPE_SCALING_KEYS[rope_type]:
            rope["original_max_position_embeddings"] = pretrain_len
    if rope_parameters is not None:
        patch: Any = rope_parameters
        if isinstance(patch, str):
            try:
                patch = json.loads(patch)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--rope-parameters {rope_parameters!r}: not JSON ({e})") from None
        if not isinstance(patch, Mapping):
            raise ConfigError(f"--rope-parameters {rope_parameters!r}: expected a JSON object, e.g. "
                              '\'{"rope_type": "yarn", "factor": 4.0}\'')
        if "rope_type" in patch or "type" in patch:
            retype(patch.get("rope_type", patch.get("type")))
        for key, value in patch.items():
            if value is None:
                rope.pop(key, None)
            elif key != "type":
                rope[key] = value
    new_type = rope.get("rope_type", "default")
    if new_type in ROPE_SCALING_KEYS and "original_max_position_embeddings" in ROPE_SCALING_KEYS[new_type]:
        rope.setdefault("original_max_position_embeddings", pretrain_len)
    hf["rope_parameters"] = rope
    new = QwaxConfig.from_hf(hf)
    if new.rope_scaling is None:
        max_len = pretrain_len
    else:
        base = new.rope_scaling.original_max_position_embeddings or pretrain_len
        max_len = int(new.rope_scaling.factor * base)
    new = new.replace(max_position_embeddings=max_len)
    return {f.name: getattr(new, f.name) for f in dataclasses.fields(QwaxConfig)
            if getattr(new, f.name) != getattr(cfg, f.name)}


def get_preset(name: str, **overrides: Any) -> QwaxConfig:
    """A named preset (see PRESETS), with field overrides."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
