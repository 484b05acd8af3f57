"""QwaxConfig: reading published config.json files, presets, parameter counts, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flax import nnx

import jax
import qwax
from qwax.config import PRESETS, ConfigError, QwaxConfig

DATA = Path(__file__).parent / "data"


def test_reads_qwen3_next_80b_config():
    cfg = QwaxConfig.from_hf(DATA / "qwen3_next_80b_a3b_config.json")
    assert cfg.model_type == "qwen3_next" and cfg.gdn_projection_layout == "grouped"
    assert cfg.layer_types.count("full_attention") == 12 and cfg.layer_types[3] == "full_attention"
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.rope_theta, cfg.rotary_dim) == (512, 10, 5e6, 64)
    assert cfg.linear_conv_dim == 8192 and not cfg.mrope_section


def test_reads_qwen3_5_397b_multimodal_config():
    cfg = QwaxConfig.from_hf(DATA / "qwen3_5_397b_a17b_config.json")
    assert cfg.model_type == "qwen3_5_moe_text" and cfg.gdn_projection_layout == "flat"
    assert cfg.layer_types.count("linear_attention") == 45
    assert cfg.mrope_section == (11, 11, 10) and cfg.mrope_interleaved and cfg.rope_theta == 1e7
    assert cfg.mtp_num_hidden_layers == 1 and cfg.linear_conv_dim == 12288


@pytest.mark.parametrize("name, total, active, active_tol", [
    ("qwen3.5-397b-a17b", 397e9, 17e9, 0.025),
    ("qwen3-next-80b-a3b", 80e9, 3e9, None),
])
def test_param_count_of_published_sizes(name, total, active, active_tol):
    path = DATA / ("qwen3_5_397b_a17b_config.json" if "397" in name else "qwen3_next_80b_a3b_config.json")
    got_total, got_active = QwaxConfig.from_hf(path).param_count()
    assert abs(got_total / total - 1) < 0.02, got_total
    if active_tol is not None:
        assert abs(got_active / active - 1) < active_tol, got_active
    # Qwen3-Next-80B-A3B activates 3.87B per token counting embeddings (3.25B without): "A3B" is a rounding.
    assert got_active < got_total / 10


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense", "tiny-next"])
def test_param_count_equals_the_model(name):
    cfg = PRESETS[name].replace(mtp_num_hidden_layers=1)
    model = nnx.eval_shape(lambda: qwax.QwaxForCausalLM(cfg, rngs=nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert cfg.param_count(include_mtp=True)[0] == n


def test_to_hf_round_trips_through_from_hf():
    for name in ("qwen3.5-397b-a17b", "qwen3-next-80b-a3b", "qwen3.5-27b"):
        cfg = PRESETS[name]
        again = QwaxConfig.from_hf(cfg.to_hf())
        assert again.replace(param_dtype=cfg.param_dtype) == cfg, name


@pytest.mark.parametrize("patch, message", [
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "rope_type"),
    ({"layer_types": ["sliding_attention"] * 48}, "layer_types"),
    ({"num_key_value_heads": 3}, "num_attention_heads"),
])
def test_unsupported_values_name_the_field(patch, message):
    cfg = json.loads((DATA / "qwen3_next_80b_a3b_config.json").read_text())
    cfg.update(patch)
    with pytest.raises(ConfigError, match=message):
        QwaxConfig.from_hf(cfg)
