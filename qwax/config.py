"""Model configuration: one frozen dataclass for Qwen3-Next, Qwen3.5 (dense) and Qwen3.5-MoE text models.

The field names follow the Hugging Face configs (the contract with checkpoints). `QwaxConfig.from_hf` reads a
`config.json` of any of the supported model types (including the `text_config` of a multimodal Qwen3.5 config) and
`QwaxConfig.to_hf` writes one back. It holds only what a checkpoint's config.json holds, plus properties derived
from it; how a model runs (dtypes, kernels, scan, remat) is `qwax.options.RunOptions`.
"""

from __future__ import annotations

import dataclasses
import os
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
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value qwax cannot run."""
        def bad(key: str, value: Any, expected: str) -> ConfigError:
            return ConfigError(f"config field {key!r} = {value!r}: expected {expected}")

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

        rope = dict(cfg.get("rope_parameters") or {})
        legacy = cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", legacy.get("rope_type", legacy.get("type", "default")))
        if rope_type not in ("default", "mrope"):
            raise ConfigError(f"config field 'rope_parameters.rope_type' = {rope_type!r}: only 'default' is supported")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25))
        mrope_section = rope.get("mrope_section", legacy.get("mrope_section"))
        if mrope_section is None and model_type != "qwen3_next":
            mrope_section = [11, 11, 10]  # transformers' default for Qwen3.5
        mrope_interleaved = rope.get("mrope_interleaved", legacy.get("mrope_interleaved", model_type != "qwen3_next"))

        _reject_run_options(overrides, "QwaxConfig.from_hf")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: cfg[k] for k in names if k in cfg and cfg[k] is not None}
        kwargs.update(
            model_type=model_type, rope_theta=float(theta), partial_rotary_factor=float(partial),
            mrope_section=tuple(mrope_section or ()), mrope_interleaved=bool(mrope_interleaved),
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


def get_preset(name: str, **overrides: Any) -> QwaxConfig:
    """A named preset (see PRESETS), with field overrides."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
