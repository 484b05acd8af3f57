"""Long-context rope scaling (yarn, linear, llama3) against transformers: logits of the three text model types at
several times the original context, prefill + decode, the Qwen3.5 rotary embedding with multimodal positions, the
inverse frequencies themselves, config parsing / round trips / refusals, and the CLI flags.

Every expected value comes from transformers (its models, its config classes, its ROPE_INIT_FUNCTIONS)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwax
from qwax.cli import build_parser, main
from qwax.config import PRESETS, ConfigError, QwaxConfig, RopeScaling
from qwax.inference import decode_step, init_cache, prefill
from qwax.inference.cli import rope_config_overrides
from qwax.layers.rope_scaling import rope_frequencies
from qwax.layers.rotary import rotary_cos_sin
from hf_models import MODEL_TYPES, hf_config, hf_logits, random_ids

# A Gated DeltaNet layer, then a full-attention layer; head_dim 16 x 0.5 = 8 rotary dims (4 frequencies), so the
# scaled frequencies move the logits well above float32 noise.
SMALL = dict(num_hidden_layers=2, full_attention_interval=2, partial_rotary_factor=0.5)
# (factor, original_max_position_embeddings, sequence length): 4x to 8x the original context.
YARN_CASES = [(2.0, 32, 128), (4.0, 16, 96), (8.0, 16, 128)]
TOL = 1e-4  # float32 against transformers' float32 forward: measured 5e-6 .. 2e-5; a wrong frequency is O(0.1)


def _config_class(model_type: str):
    import transformers

    return {"qwen3_next": transformers.Qwen3NextConfig, "qwen3_5_text": transformers.Qwen3_5TextConfig,
            "qwen3_5_moe_text": transformers.Qwen3_5MoeTextConfig}[model_type]


def _hf_rope(config) -> tuple[np.ndarray, float]:
    """transformers' (inv_freq, attention_scaling) for a config, as its text rotary embedding computes them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scale = ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](config)
    return inv_freq.numpy(), scale


def _padded_batch(length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """ids [3, L] and a left-padding mask: rows of L, L - 7 and L / 2 real tokens."""
    ids = random_ids(3, length, seed=seed)
    mask = np.ones_like(ids)
    mask[1, :7] = 0
    mask[2, : length // 2] = 0
    return ids, mask


def _logits_error(path, hf_model, length: int, seed: int = 0, **overrides) -> float:
    """Max |qwax - transformers| over the real tokens of a left-padded batch of `length` tokens (qwax eager: each
    config would compile a whole forward, which takes longer here than running it op by op)."""
    model = qwax.load_hf(path, **overrides)
    ids, mask = _padded_batch(length, seed)
    got = np.asarray(model(ids, attention_mask=mask).logits)
    expected = hf_logits(hf_model, ids, mask)
    return float(np.abs(got - expected)[mask.astype(bool)].max())


def _yarn(factor: float, original: int, **extra) -> dict:
    return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original, **extra}


# ------------------------------------------------------------------------------------------- logits parity
@pytest.mark.parametrize("factor, original, length", YARN_CASES)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_yarn_logits_match_transformers(model_type, factor, original, length, hf_checkpoint):
    path, hf_model = hf_checkpoint(model_type, **SMALL, rope_parameters=_yarn(factor, original))
    cfg = QwaxConfig.from_hf(path)
    assert cfg.rope_scaling == RopeScaling("yarn", factor, original_max_position_embeddings=original)
    err = _logits_error(path, hf_model, length, seed=int(factor))
    print(f"\n{model_type} yarn factor {factor} original {original} L={length}: max |diff| {err:.2e}")
    assert err <= TOL, f"{model_type} yarn x{factor}: max |diff| {err:.2e}"


# Non-default YaRN knobs, on rope_theta 1e4 and every dim rotating, so that the ramp has fractional weights.
YARN_VARIANTS = [
    ("qwen3_5_moe_text", 192, _yarn(4.0, 48, beta_fast=2.0, beta_slow=0.25, mscale=1.0, mscale_all_dim=0.5,
                                    truncate=False)),
    ("qwen3_next", 128, _yarn(4.0, 32, beta_fast=8.0, beta_slow=0.5, attention_factor=1.25)),
    # Equal mscales (DeepSeek's setting): an attention factor of exactly 1, not the default 0.1 ln 3 + 1.
    ("qwen3_5_text", 128, _yarn(3.0, 32, beta_fast=4.0, beta_slow=0.125, mscale=0.707, mscale_all_dim=0.707,
                                truncate=False)),
]


@pytest.mark.parametrize("model_type, length, rope", YARN_VARIANTS, ids=[v[0] for v in YARN_VARIANTS])
def test_yarn_with_non_default_parameters_matches_transformers(model_type, length, rope, hf_checkpoint):
    path, hf_model = hf_checkpoint(model_type, **dict(SMALL, partial_rotary_factor=1.0), rope_theta=1e4,
                                   rope_parameters=rope)
    inv_freq, _ = _hf_rope(hf_model.config)
    dim = hf_model.config.head_dim
    ratio = inv_freq / 1e4 ** (-np.arange(0, dim, 2) / dim)  # 1: kept, 1 / factor: interpolated
    assert np.any((ratio > 1 / rope["factor"] + 1e-3) & (ratio < 1 - 1e-3)), ratio  # some pair is blended
    err = _logits_error(path, hf_model, length, seed=5)
    print(f"\n{model_type} yarn {rope}: max |diff| {err:.2e}")
    assert err <= TOL, f"{model_type} {rope}: max |diff| {err:.2e}"


SCALED = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 16,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


@pytest.mark.parametrize("rope_type", sorted(SCALED))
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_linear_and_llama3_logits_match_transformers(model_type, rope_type, hf_checkpoint):
    path, hf_model = hf_checkpoint(model_type, **SMALL, rope_parameters=SCALED[rope_type])
    assert QwaxConfig.from_hf(path).rope_scaling.rope_type == rope_type
    err = _logits_error(path, hf_model, 96, seed=3)
    print(f"\n{model_type} {rope_type} x4: max |diff| {err:.2e}")
    assert err <= TOL, f"{model_type} {rope_type}: max |diff| {err:.2e}"


@pytest.mark.parametrize("rope_type", ["yarn", "linear", "llama3"])
def test_scaling_changes_the_logits(rope_type, hf_checkpoint):
    """The same weights with plain RoPE (or, for YaRN, its frequencies without the attention factor) are far from
    transformers' scaled logits: the parity tests above can fail."""
    rope = _yarn(4.0, 16) if rope_type == "yarn" else SCALED[rope_type]
    path, hf_model = hf_checkpoint("qwen3_5_text", **SMALL, rope_parameters=rope)
    assert _logits_error(path, hf_model, 96, seed=4, rope_scaling=None) > 0.1
    if rope_type == "yarn":
        no_factor = RopeScaling("yarn", 4.0, original_max_position_embeddings=16, attention_factor=1.0)
        assert _logits_error(path, hf_model, 96, seed=4, rope_scaling=no_factor) > 0.05


@pytest.mark.slow  # 10-25 s here: compiles the chunked prefill and the decode step
def test_prefill_then_decode_with_yarn_equals_the_full_forward(hf_checkpoint):
    """Prompt and decoded positions run past original_max_position_embeddings (16); one row is left-padded."""
    path, _ = hf_checkpoint("qwen3_5_moe_text", **SMALL, rope_parameters=_yarn(4.0, 16))
    model = qwax.load_hf(path)
    cfg, opts = model.config, model.options
    prompt, steps = 40, 6
    ids = random_ids(2, prompt + steps, seed=9)
    mask = np.ones_like(ids)
    mask[1, :9] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # each row counts its real tokens, as the cache does
    full = np.asarray(model(ids, attention_mask=mask, position_ids=positions).logits)
    graphdef, params = nnx.split(model)
    logits, cache = prefill(graphdef, params, init_cache(cfg, opts, 2, 128), ids[:, :prompt], mask[:, :prompt], 16)
    np.testing.assert_allclose(np.asarray(logits), full[:, prompt - 1], atol=1e-4)
    for t in range(steps):
        logits, cache = decode_step(graphdef, params, cache, jnp.asarray(ids[:, prompt + t]))
        np.testing.assert_allclose(np.asarray(logits), full[:, prompt + t], atol=1e-4, err_msg=f"step {t}")
    assert int(cache.position[0]) == prompt + steps > 2 * 16


# ---------------------------------------------------------------------------------- rotary embedding itself
def _mm_positions(batch: int, length: int) -> np.ndarray:
    """[3, B, L] (T, H, W) positions shaped like a prompt with an image: text, a 6 x 8 grid, text again."""
    rows = np.zeros((3, batch, length), np.int64)
    for b in range(batch):
        start, pos, t = 10 + 7 * b, 0, 0
        for t in range(length):
            if start <= t < start + 48:
                k = t - start
                rows[:, b, t] = (pos, pos + k // 8, pos + k % 8)
                if k == 47:
                    pos += 8
            else:
                rows[:, b, t] = pos
                pos += 1
        rows[:, b] += 200 * b  # the second row starts further on
    return rows


@pytest.mark.parametrize("rope", [_yarn(4.0, 64), _yarn(8.0, 32, beta_fast=8.0, truncate=False),
                                  {"rope_type": "linear", "factor": 2.0}], ids=["yarn4", "yarn8", "linear2"])
def test_multimodal_cos_sin_match_transformers(rope):
    """Qwen3.5's rotary embedding called with [3, B, L] positions (and with [B, L] text positions)."""
    import torch
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    config = _config_class("qwen3_5_text")(
        head_dim=256, hidden_size=512, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_section": [11, 11, 10], "mrope_interleaved": True, **rope})
    cfg = QwaxConfig.from_hf(config.to_dict())
    embedding = Qwen3_5TextRotaryEmbedding(config)
    x = torch.zeros(1, dtype=torch.float32)
    positions = _mm_positions(2, 120)
    assert positions.max() > 4 * 64
    for pos in (positions, positions[0]):
        with torch.no_grad():
            want_cos, want_sin = embedding(x, torch.as_tensor(pos))
        cos, sin = rotary_cos_sin(jnp.asarray(pos, jnp.int32), cfg, jnp.float32)
        assert cos.shape == tuple(want_cos.shape) == (2, 120, 64)
        np.testing.assert_allclose(np.asarray(cos), want_cos.numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(np.asarray(sin), want_sin.numpy(), atol=1e-6, rtol=0)
    if rope["rope_type"] == "yarn":
        assert embedding.attention_scaling > 1.05  # the factor is really being checked


@pytest.mark.parametrize("theta", [1e4, 5e6, 1e7])
@pytest.mark.parametrize("rotary_dim", [8, 64, 256])
@pytest.mark.parametrize("rope", [
    _yarn(4.0, 262144), _yarn(8.0, 16), _yarn(40.0, 4096, mscale=1.0, mscale_all_dim=0.707, beta_fast=8.0),
    _yarn(3.0, 4096, beta_fast=16.0, beta_slow=2.0, truncate=False), _yarn(4.0, 8192, attention_factor=1.3),
    {"rope_type": "linear", "factor": 3.0},
    {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0},
    {"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": 100, "low_freq_factor": 0.5,
     "high_freq_factor": 3.0},
])
def test_inverse_frequencies_and_attention_factor_match_transformers(rope, theta, rotary_dim):
    config = _config_class("qwen3_next")(head_dim=rotary_dim, partial_rotary_factor=1.0, max_position_embeddings=10**6,
                                         rope_parameters=dict(rope, rope_theta=theta))
    want_inv, want_scale = _hf_rope(config)
    cfg = QwaxConfig.from_hf(config.to_dict())
    inv, scale = rope_frequencies(cfg.rope_theta, cfg.rotary_dim, cfg.rope_scaling)
    assert inv.dtype == np.float32 and scale == want_scale
    if rotary_dim <= 64:
        np.testing.assert_array_equal(inv, want_inv)  # bit for bit (torch's float32 pow is exact at these sizes)
    else:  # torch's vectorised float32 pow is 1 ulp off for an odd frequency of long heads; ours is exact
        np.testing.assert_allclose(inv, want_inv, rtol=3e-7, atol=0)


# ------------------------------------------------------------------------------------------------- config
def _qwen35_1m_dict() -> dict:
    """The Qwen3.5-9B config.json with the published 1M-token recipe (vLLM's max_position_embeddings)."""
    text = PRESETS["qwen3.5-9b"].to_hf()
    text["rope_parameters"].update(rope_type="yarn", factor=4.0, original_max_position_embeddings=262144)
    text["max_position_embeddings"] = 1010000
    return text


def test_the_published_1m_recipe_loads_and_round_trips():
    import transformers

    cfg = QwaxConfig.from_hf(_qwen35_1m_dict())
    assert cfg.rope_scaling == RopeScaling("yarn", 4.0, original_max_position_embeddings=262144)
    assert (cfg.max_position_embeddings, cfg.rope_theta, cfg.rotary_dim, cfg.mrope_section, cfg.mrope_interleaved) \
        == (1010000, 1e7, 64, (11, 11, 10), True)
    assert QwaxConfig.from_hf(cfg.to_hf()) == cfg
    assert hash(cfg) == hash(QwaxConfig.from_hf(cfg.to_hf()))
    # transformers' own classes accept what qwax writes, and compute the same rope from it.
    written = cfg.to_hf()
    hf_text = transformers.Qwen3_5TextConfig(**{k: v for k, v in written.items() if k != "architectures"})
    assert {k: hf_text.rope_parameters[k] for k in ("rope_type", "factor", "original_max_position_embeddings")} \
        == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}
    want_inv, want_scale = _hf_rope(hf_text)
    inv, scale = rope_frequencies(cfg.rope_theta, cfg.rotary_dim, cfg.rope_scaling)
    np.testing.assert_array_equal(inv, want_inv)
    assert scale == want_scale == pytest.approx(0.1 * np.log(4.0) + 1)
    # The multimodal form: transformers' Qwen3_5Config with the recipe in its text_config.
    mm = transformers.Qwen3_5Config(text_config=_qwen35_1m_dict()).to_dict()
    assert QwaxConfig.from_hf(mm).rope_scaling == cfg.rope_scaling
    # The legacy spelling (rope_scaling beside top-level rope_theta) reads the same, as transformers reads it.
    legacy = _qwen35_1m_dict()
    rope = legacy.pop("rope_parameters")
    legacy.update(rope_theta=rope.pop("rope_theta"), partial_rotary_factor=rope.pop("partial_rotary_factor"),
                  rope_scaling=rope)
    assert QwaxConfig.from_hf(legacy) == cfg
    assert transformers.Qwen3_5TextConfig(**legacy).rope_parameters == hf_text.rope_parameters


@pytest.mark.parametrize("rope", [_yarn(2.0, 32), _yarn(4.0, 64, beta_fast=8.0, mscale=1.0, mscale_all_dim=0.5,
                                                          truncate=False, attention_factor=None),
                                  SCALED["linear"], SCALED["llama3"]])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_to_hf_round_trips_and_transformers_reads_the_same_rope(model_type, rope):
    cfg = QwaxConfig.from_hf(hf_config(model_type, **SMALL, rope_parameters=rope).to_dict())
    assert cfg.rope_scaling is not None and QwaxConfig.from_hf(cfg.to_hf()) == cfg
    written = {k: v for k, v in cfg.to_hf().items() if k != "architectures"}
    reread = _config_class(model_type)(**written)
    np.testing.assert_array_equal(_hf_rope(reread)[0], _hf_rope(hf_config(model_type, **SMALL,
                                                                           rope_parameters=rope))[0])
    assert _hf_rope(reread)[1] == rope_frequencies(cfg.rope_theta, cfg.rotary_dim, cfg.rope_scaling)[1]


def test_yarn_without_original_length_uses_max_position_embeddings_as_transformers():
    import transformers

    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e7}
    hf = transformers.Qwen3_5TextConfig(rope_parameters=dict(rope), max_position_embeddings=300)
    cfg = QwaxConfig.from_hf({"model_type": "qwen3_5_text", "rope_parameters": rope, "max_position_embeddings": 300,
                              "intermediate_size": 64})
    assert cfg.rope_scaling.original_max_position_embeddings == hf.rope_parameters["original_max_position_embeddings"]
    # A top-level original_max_position_embeddings wins when transformers builds the rotary embedding.
    top = transformers.Qwen3_5TextConfig(rope_parameters=dict(rope), max_position_embeddings=300,
                                         original_max_position_embeddings=50)
    written = top.to_dict()
    assert written["rope_parameters"]["original_max_position_embeddings"] == 300
    assert written["original_max_position_embeddings"] == 50
    want_inv, _ = _hf_rope(top)
    cfg = QwaxConfig.from_hf(written)
    assert cfg.rope_scaling.original_max_position_embeddings == 50
    np.testing.assert_array_equal(rope_frequencies(cfg.rope_theta, cfg.rotary_dim, cfg.rope_scaling)[0], want_inv)


@pytest.mark.parametrize("rope_type, extra, why", [
    ("dynamic", {"factor": 2.0}, "longest sequence"),
    ("longrope", {"short_factor": [1.0] * 32, "long_factor": [2.0] * 32, "original_max_position_embeddings": 4096},
     "short_factor / long_factor"),
])
def test_dynamic_and_longrope_are_refused_by_name(rope_type, extra, why):
    cfg = PRESETS["qwen3.5-9b"].to_hf()
    cfg["rope_parameters"].update(rope_type=rope_type, **extra)
    with pytest.raises(ConfigError, match=rf"'rope_parameters.rope_type' = '{rope_type}' is not supported: .*{why}"):
        QwaxConfig.from_hf(cfg)
    with pytest.raises(ConfigError, match=f"'{rope_type}' is not supported"):
        RopeScaling(rope_type, 2.0)


@pytest.mark.parametrize("patch, message", [
    ({"factor": 0}, r"'rope_parameters.factor' = 0: expected a number > 0"),
    ({"factor": -2.0}, r"'rope_parameters.factor' = -2.0: expected a number > 0"),
    ({"factor": None}, r"'rope_parameters.factor' = None: expected a number > 0"),
    ({"factor": "4"}, r"'rope_parameters.factor' = '4': expected a number"),
    ({"factor": True}, r"'rope_parameters.factor' = True: expected a number"),
    ({"beta_fast": "fast"}, r"'rope_parameters.beta_fast' = 'fast': expected a number > 0"),
    ({"beta_fast": 0.5}, r"'rope_parameters.beta_fast' = 0.5: expected >= beta_slow"),
    ({"attention_factor": -1.0}, r"'rope_parameters.attention_factor' = -1.0: expected a number > 0"),
    ({"mscale": [1]}, r"'rope_parameters.mscale' = \[1\]: expected a number"),
    ({"truncate": "yes"}, r"'rope_parameters.truncate' = 'yes': expected true or false"),
    ({"truncate": None}, r"'rope_parameters.truncate' = None: expected true or false"),
    ({"original_max_position_embeddings": -5}, r"'rope_parameters.original_max_position_embeddings' = -5"),
    ({"original_max_position_embeddings": 1.5}, r"'rope_parameters.original_max_position_embeddings' = 1.5"),
    ({"low_freq_factor": 1.0}, r"'rope_parameters.low_freq_factor' = 1.0: rope_type 'yarn' has no such key"),
    ({"beta_fst": 3}, r"'rope_parameters.beta_fst' = 3: rope_type 'yarn' has no such key"),
    ({"rope_type": "ntk"}, r"'rope_parameters.rope_type' = 'ntk': expected one of"),
    ({"rope_type": "llama3"}, r"'rope_parameters.low_freq_factor' = None: expected a number"),
    ({"rope_type": "linear"}, r"'rope_parameters.original_max_position_embeddings' = 4096: rope_type 'linear' has "
                              "no such key"),
])
def test_bad_rope_fields_name_the_field_the_value_and_what_was_expected(patch, message):
    cfg = PRESETS["qwen3.5-9b"].to_hf()
    cfg["rope_parameters"].update(rope_type="yarn", factor=4.0, original_max_position_embeddings=4096)
    cfg["rope_parameters"].update(patch)
    with pytest.raises(ConfigError, match=message):
        QwaxConfig.from_hf(cfg)


def test_llama3_needs_its_frequency_factors():
    base = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    with pytest.raises(ConfigError, match=r"'rope_parameters.low_freq_factor' = None: expected a number"):
        QwaxConfig.from_hf(dict(PRESETS["tiny-next"].to_hf(), rope_parameters=base))
    with pytest.raises(ConfigError, match=r"'rope_parameters.high_freq_factor' = 1.0: expected > low_freq_factor"):
        QwaxConfig.from_hf(dict(PRESETS["tiny-next"].to_hf(),
                                rope_parameters=dict(base, low_freq_factor=1.0, high_freq_factor=1.0)))


def test_config_takes_a_rope_parameters_dict_and_stays_hashable():
    cfg = qwax.get_preset("tiny-dense", rope_scaling={"rope_type": "yarn", "factor": 4})
    assert cfg.rope_scaling == RopeScaling("yarn", 4.0, original_max_position_embeddings=4096)
    assert isinstance(cfg.rope_scaling.factor, float) and hash(cfg) == hash(cfg.replace())
    with pytest.raises(ConfigError, match="'rope_scaling' = 4"):
        qwax.get_preset("tiny-dense", rope_scaling=4)


# ---------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def checkpoint_config(tmp_path):
    """A directory holding only the Qwen3.5-9B config.json (262,144 native positions): all the flags read."""
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["qwen3.5-9b"].to_hf()))
    return tmp_path


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["serve"], ["chat"]])
def test_rope_flags_give_the_expected_config(command, checkpoint_config):
    parse = build_parser().parse_args
    base = [command[0], "--checkpoint", str(checkpoint_config), *command[1:]]
    assert rope_config_overrides(parse(base)) == {}

    cfg = QwaxConfig.from_hf(checkpoint_config, **rope_config_overrides(parse(base + ["--rope-scaling", "yarn:4"])))
    assert cfg.rope_scaling == RopeScaling("yarn", 4.0, original_max_position_embeddings=262144)
    assert cfg.max_position_embeddings == 4 * 262144 and cfg.rope_theta == 1e7 and cfg.mrope_section == (11, 11, 10)
    # The same rope as the published recipe written into config.json, as transformers computes it.
    import transformers

    recipe = transformers.Qwen3_5TextConfig(**{k: v for k, v in _qwen35_1m_dict().items() if k != "architectures"})
    np.testing.assert_array_equal(rope_frequencies(cfg.rope_theta, cfg.rotary_dim, cfg.rope_scaling)[0],
                                  _hf_rope(recipe)[0])

    args = parse(base + ["--rope-scaling", "yarn:8", "--rope-parameters", '{"beta_fast": 16, "truncate": false}'])
    cfg = QwaxConfig.from_hf(checkpoint_config, **rope_config_overrides(args))
    assert cfg.rope_scaling == RopeScaling("yarn", 8.0, original_max_position_embeddings=262144, beta_fast=16.0,
                                           truncate=False)
    assert cfg.max_position_embeddings == 8 * 262144

    args = parse(base + ["--rope-parameters", json.dumps(SCALED["llama3"])])
    cfg = QwaxConfig.from_hf(checkpoint_config, **rope_config_overrides(args))
    assert cfg.rope_scaling == RopeScaling("llama3", 4.0, original_max_position_embeddings=16, low_freq_factor=1.0,
                                           high_freq_factor=4.0)
    assert cfg.max_position_embeddings == 64


def test_rope_flags_on_an_already_scaled_checkpoint(tmp_path):
    """The pretraining length stays the checkpoint's original one; '{"rope_type": "default"}' turns scaling off."""
    (tmp_path / "config.json").write_text(json.dumps(_qwen35_1m_dict()))
    parse = build_parser().parse_args
    args = parse(["serve", "--checkpoint", str(tmp_path), "--rope-scaling", "yarn:2"])
    cfg = QwaxConfig.from_hf(tmp_path, **rope_config_overrides(args))
    assert cfg.rope_scaling == RopeScaling("yarn", 2.0, original_max_position_embeddings=262144)
    assert cfg.max_position_embeddings == 2 * 262144
    args = parse(["serve", "--checkpoint", str(tmp_path), "--rope-parameters", '{"rope_type": "default"}'])
    cfg = QwaxConfig.from_hf(tmp_path, **rope_config_overrides(args))
    assert cfg.rope_scaling is None and cfg.max_position_embeddings == 262144
    assert cfg == PRESETS["qwen3.5-9b"]


@pytest.mark.parametrize("flags, message", [
    (["--rope-scaling", "yarn"], "--rope-scaling 'yarn': expected TYPE:FACTOR, e.g. yarn:4"),
    (["--rope-scaling", "yarn:four"], "the factor 'four' is not a number"),
    (["--rope-scaling", "ntk:2"], "'rope_parameters.rope_type' = 'ntk': expected one of"),
    (["--rope-scaling", "dynamic:2"], "'dynamic' is not supported: dynamic NTK"),
    (["--rope-scaling", "yarn:0"], "'rope_parameters.factor' = 0.0: expected a number > 0"),
    (["--rope-scaling", "llama3:8"], "'rope_parameters.low_freq_factor' = None"),
    (["--rope-parameters", "{oops"], "--rope-parameters '{oops': not JSON"),
    (["--rope-parameters", "[4]"], "expected a JSON object"),
    (["--rope-scaling", "yarn:4", "--rope-parameters", '{"beta_fst": 1}'], "'rope_parameters.beta_fst' = 1"),
])
@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["serve"], ["chat"]])
def test_bad_rope_flags_fail_before_loading_with_a_clear_message(command, flags, message, checkpoint_config,
                                                                 capsys):
    # The directory has no weights and no tokenizer: the flags are checked first.
    argv = [command[0], "--checkpoint", str(checkpoint_config), *command[1:], *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"qwax {command[0]}: " in err and message in err, err
