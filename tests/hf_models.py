"""Tiny random Hugging Face reference models, the oracle for qwax's parity and conversion tests.

Each model is a real `transformers` class built on the CPU in float32 from a fixed seed, small enough to run in
well under a second, and saved with `save_pretrained` so tests exercise the same files a Hub checkpoint has.
Shapes are chosen to catch layout bugs: linear key and value head dims differ (dk=16, dv=8), value heads are
a multiple of key heads (r=2), and 2 of the 8 layers are full attention.

transformers' own init leaves zero-centred norm weights at 0, the gated norm at 1 and dt_bias at 1, which
would let a converter that drops or mislabels them pass; every parameter is therefore perturbed after
construction, and the decay parameters are re-drawn so the recurrence neither forgets everything at once
nor never forgets.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MODEL_TYPES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=8,
    full_attention_interval=4,  # layers 3 and 7 are full attention, the other 6 are Gated DeltaNet
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    # Larger than HF's 0.02 so activations are O(1) and a wrong weight moves the logits well above fp32 noise.
    initializer_range=0.1,
)
_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
_DEFAULTS = {
    "qwen3_next": dict(_COMMON, **_MOE, norm_topk_prob=True, rope_theta=5_000_000.0),
    "qwen3_5_text": dict(_COMMON, intermediate_size=96, rope_theta=10_000_000.0),
    "qwen3_5_moe_text": dict(_COMMON, **_MOE, rope_theta=10_000_000.0),
}


def interleaved_mrope_section(rotary_dim: int) -> list[int]:
    """[T, H, W] frequency counts for interleaved M-RoPE: frequency j goes to axis j % 3 ([11, 11, 10] for 64)."""
    half = rotary_dim // 2
    return [len(range(axis, half, 3)) for axis in range(3)]


def hf_config(model_type: str, **overrides):
    """The transformers text config for a tiny model; ``overrides`` replace any default field."""
    import transformers

    if model_type not in _DEFAULTS:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {MODEL_TYPES}")
    fields = dict(_DEFAULTS[model_type], **overrides)
    partial = fields.pop("partial_rotary_factor", 0.25)
    rope = {"rope_type": "default", "rope_theta": fields.pop("rope_theta"), "partial_rotary_factor": partial}
    rotary_dim = int(fields["head_dim"] * partial)
    if rotary_dim % 2:
        raise ValueError(f"head_dim {fields['head_dim']} * partial_rotary_factor {partial} = {rotary_dim} must be even")
    if model_type != "qwen3_next":
        rope.update(mrope_section=interleaved_mrope_section(rotary_dim), mrope_interleaved=True)
    rope.update(fields.pop("rope_parameters", {}))
    config_class = {
        "qwen3_next": transformers.Qwen3NextConfig,
        "qwen3_5_text": transformers.Qwen3_5TextConfig,
        "qwen3_5_moe_text": transformers.Qwen3_5MoeTextConfig,
    }[model_type]
    config = config_class(rope_parameters=rope, **fields)
    config._attn_implementation = "eager"
    config.dtype = "float32"
    return config


def _perturb(model, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if name.endswith("A_log"):
                # A in [0.05, 1] with softplus(dt_bias) ~ 0.7 gives per-step decays exp(g) of roughly 0.5..0.97.
                p.copy_(torch.empty(p.shape).uniform_(0.05, 1.0, generator=generator).log())
            elif name.endswith("dt_bias"):
                p.copy_(0.5 * noise)
            elif p.ndim == 1:  # norm weights: zero-centred ones start at 0, the GDN gated norm at 1
                p.add_(0.1 * noise)
            else:
                p.add_(0.02 * noise)


def make_hf_model(model_type: str, path: str | os.PathLike | None = None, *, seed: int = 0, **overrides):
    """Builds a tiny random float32 ``*ForCausalLM`` on the CPU and, if ``path`` is given, saves it there.

    ``model_type`` is one of ``MODEL_TYPES``: ``qwen3_next`` -> ``Qwen3NextForCausalLM``, ``qwen3_5_text`` ->
    ``Qwen3_5ForCausalLM`` (dense MLP), ``qwen3_5_moe_text`` -> ``Qwen3_5MoeForCausalLM``. ``overrides`` replace
    config fields (e.g. ``num_hidden_layers=4``, ``rope_theta=1e4``, ``partial_rotary_factor=0.5``). The same
    arguments give the same weights. Returns the model in eval mode.
    """
    import torch
    import transformers

    config = hf_config(model_type, **overrides)
    model_class = {
        "qwen3_next": transformers.Qwen3NextForCausalLM,
        "qwen3_5_text": transformers.Qwen3_5ForCausalLM,
        "qwen3_5_moe_text": transformers.Qwen3_5MoeForCausalLM,
    }[model_type]
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    _perturb(model, seed)
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
    return model


def hf_logits(model, input_ids, attention_mask=None) -> np.ndarray:
    """Float32 logits [B, L, V] of a transformers causal LM for integer ``input_ids`` [B, L] (numpy or torch)."""
    import torch

    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.logits.to(torch.float32).numpy()


def hf_logits_float64(model, input_ids, attention_mask=None) -> np.ndarray:
    """Logits [B, L, V] of a float64 copy of a transformers causal LM, as float32: the exact reference for
    comparing a float32 implementation (transformers' own float32 forward carries rounding errors of the same
    order as the tolerances, ~1e-4 on left-padded rows).

    Each row runs alone over its real (attention_mask 1) tokens, with the position ids transformers gives them
    in the left-padded batch; padding positions get zeros. transformers' masked float64 path produces NaN, and
    padding never influences real tokens in these models, so this is what the padded batch computes.
    """
    import copy

    import torch

    ids = np.asarray(input_ids)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    exact = copy.deepcopy(model).to(torch.float64)
    if hasattr(exact, "set_experts_implementation"):
        exact.set_experts_implementation("eager")  # torch's grouped_mm has no float64 kernel
    out = np.zeros((*ids.shape, model.config.vocab_size), np.float32)
    with torch.no_grad():
        for row in range(ids.shape[0]):
            real = np.flatnonzero(mask[row])
            logits = exact(input_ids=torch.as_tensor(ids[row, real][None], dtype=torch.long),
                           position_ids=torch.as_tensor(real[None], dtype=torch.long), use_cache=False).logits
            out[row, real] = logits[0].numpy()
    return out


def random_ids(batch: int, length: int, vocab_size: int = 128, seed: int = 0) -> np.ndarray:
    """Deterministic int32 token ids [batch, length]."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=(batch, length), dtype=np.int32)

