"""QwaxConfig: reading published config.json files, presets, parameter counts, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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
        assert QwaxConfig.from_hf(cfg.to_hf()) == cfg, name
        assert QwaxConfig.from_hf(cfg.to_hf(dtype="bfloat16")) == cfg, name  # the storage dtype is not config


def test_run_options_are_not_config_fields():
    with pytest.raises(ConfigError, match=r"'dtype'.*RunOptions"):
        qwax.get_preset("tiny-moe", dtype="bfloat16")
    with pytest.raises(ConfigError, match="remat"):
        PRESETS["tiny-moe"].replace(remat="full")
    with pytest.raises(ConfigError, match="scan_layers"):
        QwaxConfig.from_hf(PRESETS["tiny-moe"].to_hf(), scan_layers=False)


@pytest.mark.parametrize("spelling", [jnp.bfloat16, np.dtype("bfloat16"), "bfloat16", "bf16", "BF16", "torch.bfloat16"])
def test_run_options_accept_any_dtype_like(spelling):
    opts = qwax.RunOptions(dtype=spelling)
    assert opts.dtype == jnp.bfloat16 and opts.param_dtype == jnp.bfloat16
    assert qwax.RunOptions(dtype=np.float32, param_dtype="f32").param_dtype == np.float32


@pytest.mark.parametrize("bad", ["float8", "int4", np.int32, "bf17"])
def test_unknown_dtypes_raise_naming_them(bad):
    with pytest.raises(ValueError, match=f"dtype={bad!r}"):
        qwax.RunOptions(dtype=bad)
    with pytest.raises(ValueError, match="param_dtype"):
        qwax.RunOptions(param_dtype=bad)


def test_bad_run_options_name_the_option():
    for field, value in (("gdn_impl", "cuda"), ("moe_impl", "fast"), ("remat", "some"), ("gdn_chunk_size", 0)):
        with pytest.raises(ValueError, match=field):
            qwax.RunOptions(**{field: value})


@pytest.mark.parametrize("patch, message", [
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "'rope_parameters.factor' = None"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "'rope_parameters.rope_type' = 'dynamic'"),
    ({"layer_types": ["sliding_attention"] * 48}, "layer_types"),
    ({"num_key_value_heads": 3}, "num_attention_heads"),
])
def test_unsupported_values_name_the_field(patch, message):
    cfg = json.loads((DATA / "qwen3_next_80b_a3b_config.json").read_text())
    cfg.update(patch)
    with pytest.raises(ConfigError, match=message):
        QwaxConfig.from_hf(cfg)
