"""The tiny HF reference models are valid, deterministic and exercise every weight."""

import json
import shutil

import numpy as np
import pytest

from hf_models import MODEL_TYPES, hf_logits, interleaved_mrope_section, make_hf_model, random_ids

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_tiny_model_runs_forward_with_and_without_padding(hf_checkpoint, model_type):
    path, model = hf_checkpoint(model_type)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == model_type
    assert config["layer_types"].count("full_attention") == 2 and len(config["layer_types"]) == 8
    assert config["linear_key_head_dim"] != config["linear_value_head_dim"]

    ids = random_ids(2, 10)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    for logits in (hf_logits(model, ids), hf_logits(model, ids, mask)):
        assert logits.shape == (2, 10, 128) and logits.dtype == np.float32
        assert np.isfinite(logits).all()
        assert logits.std() > 0.1  # activations are O(1), so a wrong weight is visible


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_parameter_is_moved_off_its_default_init(hf_checkpoint, model_type):
    _, model = hf_checkpoint(model_type)
    for name, p in model.named_parameters():
        p = p.detach()
        assert p.std() > 0 or p.numel() == 1, name
        if p.ndim == 1:
            assert not torch.all(p == 0) and not torch.all(p == 1), name


def test_same_seed_gives_same_weights_and_other_seed_differs():
    ids = random_ids(1, 6)
    a = hf_logits(make_hf_model("qwen3_5_text", num_hidden_layers=4), ids)
    b = hf_logits(make_hf_model("qwen3_5_text", num_hidden_layers=4), ids)
    c = hf_logits(make_hf_model("qwen3_5_text", num_hidden_layers=4, seed=1), ids)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_saved_checkpoint_reloads_to_the_same_logits(hf_checkpoint):
    path, model = hf_checkpoint("qwen3_next")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    ids = random_ids(2, 9)
    # Bit-equal weights; only BLAS accumulation order may differ with the loaded tensors' memory layout.
    np.testing.assert_allclose(hf_logits(reloaded.eval(), ids), hf_logits(model, ids), rtol=1e-5, atol=1e-5)


def test_interleaved_mrope_section_matches_the_published_split():
    assert interleaved_mrope_section(64) == [11, 11, 10]
    assert interleaved_mrope_section(4) == [1, 1, 0]
    assert sum(interleaved_mrope_section(8)) == 4


@pytest.mark.parametrize(
    "name, text_class, layers, full",
    [("qwen3_next_80b_a3b", "Qwen3NextConfig", 48, 12), ("qwen3_5_397b_a17b", "Qwen3_5MoeTextConfig", 60, 15)],
)
def test_published_configs_load_in_transformers(tmp_path, name, text_class, layers, full):
    data = __import__("pathlib").Path(__file__).parent / "data" / f"{name}_config.json"
    shutil.copy(data, tmp_path / "config.json")
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    text = getattr(config, "text_config", config)
    assert type(text).__name__ == text_class
    assert text.num_hidden_layers == layers and text.layer_types.count("full_attention") == full
    assert text.rope_parameters["partial_rotary_factor"] == 0.25
