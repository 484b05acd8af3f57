"""PEFT adapter directories both ways: qwax adapters -> save_peft -> peft in PyTorch gives qwax's logits, and an
adapter made by peft -> load_peft gives peft's logits; plus what load_peft refuses."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import qwax
from qwax.convert.peft import CONFIG_FILE, WEIGHTS_FILE, PeftError
from qwax.convert.safetensors_io import CheckpointReader, write_checkpoint
from qwax.layers.lora import DEFAULT_TARGETS
from qwax.layers.vision import VisionConfig
from qwax.lora import lora_config_of, lora_modules
from hf_models import hf_logits, random_ids

IDS = random_ids(2, 24, seed=5)
TOL = 1e-4


def randomise_b(model, scale: float = 0.05) -> None:
    for i, adapter in enumerate(lora_modules(model).values()):
        shape = adapter.lora_b.get_value().shape
        adapter.lora_b.set_value(scale * jax.random.normal(jax.random.key(100 + i), shape))


def qwax_logits(model) -> np.ndarray:
    return np.asarray(model(IDS).logits)


def torch_adapter(hf_model, path, seed: int = 0, **lora_kwargs):
    """An adapter made by peft on `hf_model` (wrapped in place) with random nonzero lora_B, saved to `path`;
    returns the PeftModel."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(hf_model, LoraConfig(**lora_kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    peft_model.save_pretrained(path)
    return peft_model


def peft_logits(base_path, adapter_path) -> np.ndarray:
    """Logits of transformers' model of `base_path` with the PEFT adapter at `adapter_path`."""
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(base_path, dtype="float32").eval()
    return hf_logits(PeftModel.from_pretrained(base, adapter_path).eval(), IDS)


# ------------------------------------------------------------------------------------------- qwax -> peft
@pytest.mark.slow
@pytest.mark.parametrize("model_type, targets, scan", [
    ("qwen3_5_text", DEFAULT_TARGETS, True),
    ("qwen3_5_moe_text", DEFAULT_TARGETS, True),
    ("qwen3_5_moe_text", DEFAULT_TARGETS + ("experts",), True),
    ("qwen3_5_moe_text", ("q_proj", "in_proj_z", "experts"), False),
    ("qwen3_next", DEFAULT_TARGETS + ("experts",), True),
])
def test_save_peft_gives_peft_the_qwax_logits(model_type, targets, scan, hf_checkpoint, tmp_path):
    base_path, _ = hf_checkpoint(model_type)
    model = qwax.load_hf(base_path, scan_layers=scan)
    qwax.apply_lora(model, qwax.LoRAConfig(rank=4, alpha=8, targets=targets))
    randomise_b(model)
    ours = qwax_logits(model)
    out = qwax.save_peft(model, tmp_path / "adapter", base_model_name_or_path="tiny/base")
    assert sorted(os.listdir(out)) == [CONFIG_FILE, WEIGHTS_FILE]
    config = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == "tiny/base" and config["peft_type"] == "LORA"
    if "experts" in targets:
        assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    theirs = peft_logits(base_path, out)
    err = np.abs(ours - theirs).max()
    assert np.abs(ours - qwax_logits(qwax.load_hf(base_path))).max() > 0.05  # the adapter matters
    assert err <= TOL, f"{model_type} {targets[-1]}: qwax LoRA vs peft max |diff| {err:.2e}"


# ------------------------------------------------------------------------------------------- peft -> qwax
PEFT_CASES = {
    "dense-rslora": ("qwen3_5_text", dict(r=4, lora_alpha=8, use_rslora=True,
                                          target_modules=["q_proj", "v_proj", "in_proj_qkv", "out_proj", "up_proj"])),
    "moe-experts-patterns": ("qwen3_5_moe_text", dict(
        r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "in_proj_b", "gate_proj", "down_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3, "down_proj": 5})),
    "moe-rslora-experts": ("qwen3_5_moe_text", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj"],
                                                    target_parameters=["mlp.experts.down_proj"])),
    "next-experts": ("qwen3_next", dict(r=4, lora_alpha=16, target_modules=["in_proj_qkvz", "in_proj_ba", "v_proj"],
                                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])),
    # Qwen3-Next: peft reads bare gate_proj / up_proj / down_proj as transformers v4's per-expert projections and
    # also adapts the fused expert stacks, gate_up with rank 2r and alpha 2 alpha.
    "next-v4-names": ("qwen3_next", dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_load_peft_gives_the_peft_logits(case, tmp_path):
    from hf_models import make_hf_model

    model_type, lora_kwargs = PEFT_CASES[case]
    base_path, adapter_path = tmp_path / "base", tmp_path / "adapter"
    peft_model = torch_adapter(make_hf_model(model_type, base_path), adapter_path, **lora_kwargs)
    expected = hf_logits(peft_model, IDS)
    for scan in (True, False):
        model = qwax.load_peft(qwax.load_hf(base_path, scan_layers=scan), adapter_path)
        config = lora_config_of(model)
        assert config.rank == lora_kwargs["r"] and config.use_rslora == lora_kwargs.get("use_rslora", False)
        err = np.abs(qwax_logits(model) - expected).max()
        assert err <= TOL, f"{case} scan={scan}: load_peft vs peft max |diff| {err:.2e}"
    # And back: save_peft of the loaded adapter (rank / alpha patterns included) is the same adapter to peft.
    again = qwax.save_peft(model, tmp_path / "again")
    err = np.abs(peft_logits(base_path, again) - expected).max()
    assert err <= TOL, f"{case}: load_peft -> save_peft -> peft max |diff| {err:.2e}"


# ------------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(a base checkpoint written by save_hf, a qwax-written adapter on every default target and the experts,
    the adapted model). No torch: (GDN, attention) x 2 layers, H=64, GDN qkv width 128, 8 experts of width 32."""
    cfg = qwax.get_preset("tiny-moe", num_hidden_layers=4, full_attention_interval=2)
    base_path = tmp_path_factory.mktemp("peft") / "base"
    qwax.save_hf(qwax.QwaxForCausalLM(cfg, rngs=nnx.Rngs(0)), base_path)
    model = qwax.apply_lora(qwax.load_hf(base_path), qwax.LoRAConfig(rank=4, alpha=8,
                                                                      targets=DEFAULT_TARGETS + ("experts",)))
    randomise_b(model)
    return base_path, qwax.save_peft(model, base_path.parent / "adapter"), model


def _variant(saved_dir, tmp_path, config_changes=None, tensors=None):
    """A copy of the adapter directory with config fields replaced and tensors edited (tensors(dict) -> dict)."""
    config = json.loads(open(os.path.join(saved_dir, CONFIG_FILE)).read())
    config.update(config_changes or {})
    with CheckpointReader(os.path.join(saved_dir, WEIGHTS_FILE)) as reader:
        arrays = {k: reader.get(k) for k in reader.keys()}
    if tensors is not None:
        arrays = tensors(arrays)
    out = tmp_path / "variant"
    write_checkpoint(out, arrays)
    os.replace(out / "model.safetensors", out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(config))
    return out


@pytest.mark.slow
def test_a_qwax_adapter_loads_back_exactly(saved):
    base_path, adapter, original = saved
    model = qwax.load_peft(qwax.load_hf(base_path), adapter)
    # The loaded config names the targets the keys hold (this model has no grouped GDN in_proj_qkvz / ba).
    assert lora_config_of(model) == lora_config_of(original).__class__(
        rank=4, alpha=8, targets=tuple(t for t in DEFAULT_TARGETS + ("experts",) if t not in ("in_proj_qkvz",
                                                                                              "in_proj_ba")))
    ours, theirs = lora_modules(model), lora_modules(original)
    assert ours.keys() == theirs.keys()
    for key, a in ours.items():
        assert a.rank == theirs[key].rank and a.scaling == theirs[key].scaling
        np.testing.assert_array_equal(np.asarray(a.lora_a.get_value()), np.asarray(theirs[key].lora_a.get_value()))
        np.testing.assert_array_equal(np.asarray(a.lora_b.get_value()), np.asarray(theirs[key].lora_b.get_value()))
    with CheckpointReader(os.path.join(adapter, WEIGHTS_FILE)) as reader:
        # Both expert stacks of one module: gate_up is the inner ParamWrapper (base_layer), down the outer one.
        assert reader.shape("base_model.model.model.layers.3.mlp.experts.base_layer.lora_A.weight") == (4 * 8, 64)
        assert reader.shape("base_model.model.model.layers.3.mlp.experts.base_layer.lora_B.weight") == (64, 4 * 8)
        assert reader.shape("base_model.model.model.layers.3.mlp.experts.lora_A.weight") == (4 * 8, 32)
        assert reader.shape("base_model.model.model.layers.3.mlp.experts.lora_B.weight") == (64, 4 * 8)
        assert reader.shape("base_model.model.model.layers.0.linear_attn.in_proj_qkv.lora_A.weight") == (4, 64)


@pytest.mark.parametrize("changes, match", [
    (dict(use_dora=True), "use_dora=True"),
    (dict(bias="all"), "bias='all'"),
    (dict(lora_bias=True), "lora_bias=True"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out=True"),
    (dict(peft_type="IA3"), "peft_type='IA3'"),
    (dict(lora_dropout=0.1), "'experts' needs dropout=0"),
])
def test_load_peft_refuses_what_qwax_cannot_represent(saved, tmp_path, changes, match):
    base_path, adapter, _ = saved
    with pytest.raises(PeftError, match=match):
        qwax.load_peft(qwax.load_hf(base_path), _variant(adapter, tmp_path, changes))


def test_load_peft_refuses_unknown_keys_and_bad_shapes(saved, tmp_path):
    base_path, adapter, _ = saved
    base = qwax.load_hf(base_path)

    def add_lm_head(arrays):
        return arrays | {"base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32),
                         "base_model.model.lm_head.lora_B.weight": np.zeros((256, 4), np.float32)}

    with pytest.raises(PeftError, match="'base_model.model.lm_head.lora_A.weight' maps to no qwax module"):
        qwax.load_peft(base, _variant(adapter, tmp_path / "a", tensors=add_lm_head))
    key = "base_model.model.model.layers.0.linear_attn.in_proj_qkv.lora_B.weight"

    def bad_shape(arrays):
        return arrays | {key: np.zeros((127, 4), np.float32)}

    with pytest.raises(PeftError, match=rf"{key}' has shape \[127, 4\], expected \[128, 4\]"):
        qwax.load_peft(base, _variant(adapter, tmp_path / "b", tensors=bad_shape))

    def drop_b(arrays):
        return {k: v for k, v in arrays.items() if k != key}

    with pytest.raises(PeftError, match="has no matching lora_B"):
        qwax.load_peft(base, _variant(adapter, tmp_path / "c", tensors=drop_b))

    def dora(arrays):
        return arrays | {"base_model.model.model.layers.0.linear_attn.in_proj_qkv.lora_magnitude_vector":
                         np.ones((128,), np.float32)}

    with pytest.raises(PeftError, match="lora_magnitude_vector"):
        qwax.load_peft(base, _variant(adapter, tmp_path / "d", tensors=dora))

    def bad_experts(arrays):
        k = "base_model.model.model.layers.3.mlp.experts.lora_A.weight"
        return arrays | {k: np.zeros((4 * 8, 31), np.float32)}

    with pytest.raises(PeftError, match="match no expert stack"):
        qwax.load_peft(base, _variant(adapter, tmp_path / "e", tensors=bad_experts))


def test_ranks_differing_within_a_stacked_group_need_the_unrolled_layout(saved, tmp_path):
    """Layers 0 and 2 share a slot of the scanned stack: different ranks there load only unrolled."""
    base_path, adapter, _ = saved
    prefix = "base_model.model.model.layers.2.linear_attn.in_proj_qkv"

    def rank_2(arrays):
        return arrays | {f"{prefix}.lora_A.weight": arrays[f"{prefix}.lora_A.weight"][:2],
                         f"{prefix}.lora_B.weight": arrays[f"{prefix}.lora_B.weight"][:, :2]}

    variant = _variant(adapter, tmp_path, {"rank_pattern": {"model.layers.2.linear_attn.in_proj_qkv": 2}}, rank_2)
    with pytest.raises(PeftError, match="ranks differ within one stacked layer group"):
        qwax.load_peft(qwax.load_hf(base_path), variant)
    model = qwax.load_peft(qwax.load_hf(base_path, scan_layers=False), variant)
    assert model.decoder.layers[2].linear_attn.in_proj_qkv.lora.rank == 2
    # save_peft writes the odd rank back as a rank_pattern entry.
    config = json.loads(open(os.path.join(qwax.save_peft(model, tmp_path / "out"), CONFIG_FILE)).read())
    assert config["rank_pattern"] == {"model.layers.2.linear_attn.in_proj_qkv": 2}


def test_other_errors(saved, tmp_path):
    base_path, adapter, _ = saved
    model = qwax.load_peft(qwax.load_hf(base_path), adapter)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        qwax.load_peft(model, adapter)
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        qwax.save_peft(qwax.load_hf(base_path), tmp_path / "x")
    with pytest.raises(FileExistsError):
        qwax.save_peft(model, adapter)
    qwax.save_peft(model, adapter, overwrite=True)
    with pytest.raises(PeftError, match="no adapter_config.json"):
        qwax.load_peft(qwax.load_hf(base_path), tmp_path)
    # An adapter covering some layers only (peft's layers_to_transform) loads only unrolled.
    partial = _variant(adapter, tmp_path / "p", tensors=lambda a: {k: v for k, v in a.items() if ".layers.2." not in k})
    with pytest.raises(PeftError, match="scan_layers=False"):
        qwax.load_peft(qwax.load_hf(base_path), partial)
    unrolled = qwax.load_peft(qwax.load_hf(base_path, scan_layers=False), partial)
    assert unrolled.decoder.layers[2].linear_attn.in_proj_qkv.lora is None
    assert unrolled.decoder.layers[0].linear_attn.in_proj_qkv.lora is not None


def test_multimodal_adapters_use_the_language_model_names_and_load_into_the_text_model(tmp_path):
    vision = VisionConfig(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=8,
                          out_hidden_size=64, num_position_embeddings=36)
    text = qwax.get_preset("tiny-dense", num_hidden_layers=4, full_attention_interval=2)
    cfg = qwax.MultimodalConfig(text=text, vision=vision, image_token_id=250, video_token_id=251,
                                vision_start_token_id=252, vision_end_token_id=253)
    model = qwax.apply_lora(qwax.QwaxForConditionalGeneration(cfg, rngs=nnx.Rngs(0)),
                            qwax.LoRAConfig(rank=2, alpha=4, targets=("q_proj", "in_proj_a")))
    randomise_b(model)
    path = qwax.save_peft(model, tmp_path / "adapter")
    with CheckpointReader(os.path.join(path, WEIGHTS_FILE)) as reader:
        assert all(k.startswith("base_model.model.model.language_model.layers.") for k in reader.keys())
    loaded = qwax.load_peft(qwax.QwaxForCausalLM(text, rngs=nnx.Rngs(1)), path)
    ours = lora_modules(loaded)
    theirs = {(path[1:], part): a for (path, part), a in lora_modules(model).items()}
    assert ours.keys() == theirs.keys()
    for key, a in ours.items():
        np.testing.assert_array_equal(np.asarray(a.lora_b.get_value()), np.asarray(theirs[key].lora_b.get_value()))
