"""transformers checkpoint -> qwax.load_hf -> qwax.save_hf -> transformers, bitwise; sharded checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest

import qwax
from qwax.convert.safetensors_io import CheckpointReader
from hf_models import MODEL_TYPES, hf_logits, random_ids


def _reload(model_type, path):
    import transformers

    cls = {"qwen3_next": transformers.Qwen3NextForCausalLM, "qwen3_5_text": transformers.Qwen3_5ForCausalLM,
           "qwen3_5_moe_text": transformers.Qwen3_5MoeForCausalLM}[model_type]
    return cls.from_pretrained(path, output_loading_info=True, dtype="float32")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_roundtrip_is_bitwise_with_no_missing_or_unexpected_keys(model_type, hf_checkpoint, tmp_path):
    src, hf_model = hf_checkpoint(model_type)
    qwax.save_hf(qwax.load_hf(src), tmp_path / "out")
    reloaded, info = _reload(model_type, tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    original = hf_model.state_dict()
    again = reloaded.state_dict()
    assert set(original) == set(again)
    for key, tensor in original.items():
        assert np.array_equal(tensor.numpy(), again[key].numpy()), key


def test_saved_experts_use_the_published_layout(hf_checkpoint, tmp_path):
    for model_type, fused in (("qwen3_next", False), ("qwen3_5_moe_text", True)):
        src, _ = hf_checkpoint(model_type)
        qwax.save_hf(qwax.load_hf(src), tmp_path / model_type)
        with CheckpointReader(tmp_path / model_type) as reader:
            keys = set(reader.keys())
        assert ("model.layers.0.mlp.experts.gate_up_proj" in keys) == fused
        assert ("model.layers.0.mlp.experts.0.gate_proj.weight" in keys) == (not fused)


@pytest.mark.parametrize("model_type", ["qwen3_5_moe_text"])
def test_sharded_checkpoints_load_and_save(model_type, hf_checkpoint, tmp_path):
    _, hf_model = hf_checkpoint(model_type)
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = qwax.load_hf(tmp_path / "sharded")
    ids = random_ids(1, 20, seed=5)
    np.testing.assert_allclose(np.asarray(model(ids).logits), hf_logits(hf_model, ids), atol=1e-4)

    qwax.save_hf(model, tmp_path / "resharded", max_shard_bytes=100_000)
    assert (tmp_path / "resharded" / "model.safetensors.index.json").exists()
    reloaded, info = _reload(model_type, tmp_path / "resharded")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # Same weights; the reloaded model runs sdpa attention instead of eager, hence a float tolerance.
    np.testing.assert_allclose(hf_logits(reloaded, ids), hf_logits(hf_model, ids), atol=1e-5)


def test_save_refuses_to_overwrite(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("qwen3_5_text")
    model = qwax.load_hf(src)
    qwax.save_hf(model, tmp_path / "out")
    with pytest.raises(FileExistsError):
        qwax.save_hf(model, tmp_path / "out")
    qwax.save_hf(model, tmp_path / "out", overwrite=True)
