"""Streaming conversion: HF -> orbax -> HF bitwise, scanned <-> unscanned layouts, dtypes, re-sharding."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwax
from qwax.convert import stream
from qwax.convert.safetensors_io import CheckpointError, CheckpointReader
from hf_models import MODEL_TYPES


def _assert_bitwise(a, b):
    with CheckpointReader(a) as x, CheckpointReader(b) as y:
        assert x.keys() == y.keys()
        for key in x.keys():
            assert x.dtype(key) == y.dtype(key) and x.shape(key) == y.shape(key), key
            assert x.get(key).tobytes() == y.get(key).tobytes(), key


def _params(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_hf_to_orbax_to_hf_is_bitwise(model_type, hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint(model_type)
    stats = stream.convert_hf_to_orbax(src, tmp_path / "orbax")
    assert stats.tensors == len(CheckpointReader(src).keys())
    stream.convert_orbax_to_hf(tmp_path / "orbax", tmp_path / "hf")
    _assert_bitwise(src, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_orbax_checkpoint_loads_like_load_hf_and_restores_with_plain_orbax(hf_checkpoint, tmp_path):
    import orbax.checkpoint as ocp

    src, _ = hf_checkpoint("qwen3_5_moe_text")
    stream.convert_hf_to_orbax(src, tmp_path / "orbax")
    expected = _params(qwax.load_hf(src))
    got = _params(stream.load_orbax(tmp_path / "orbax"))
    assert expected.keys() == got.keys()
    for p in expected:
        assert np.array_equal(expected[p], got[p]), p
    restored = ocp.StandardCheckpointer().restore(tmp_path / "orbax")
    gate_up = restored["decoder"]["groups"]["layers"][0]["mlp"]["experts_gate_up"]
    assert np.array_equal(gate_up, expected[("decoder", "groups", "layers", 0, "mlp", "experts_gate_up")])


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_5_moe_text"])
def test_scanned_and_unscanned_layouts_round_trip_exactly_and_the_recorded_layout_is_honoured(
        model_type, hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint(model_type)
    stream.convert_hf_to_orbax(src, tmp_path / "scanned", scan_layers=True)
    stream.convert_hf_to_orbax(src, tmp_path / "unscanned", scan_layers=False)
    assert json.loads((tmp_path / "scanned" / "qwax.json").read_text())["scan_layers"] is True
    assert json.loads((tmp_path / "unscanned" / "qwax.json").read_text())["scan_layers"] is False
    scanned, unscanned = stream.load_orbax(tmp_path / "scanned"), stream.load_orbax(tmp_path / "unscanned")
    assert scanned.options.uses_scan(scanned.config)
    assert not unscanned.options.uses_scan(unscanned.config)

    for scan in (True, False):
        expected = _params(qwax.load_hf(src, scan_layers=scan))
        for stored in ("scanned", "unscanned"):  # same layout and a layout change on load
            got = _params(stream.load_orbax(tmp_path / stored, scan_layers=scan))
            assert expected.keys() == got.keys()
            for p in expected:
                assert np.array_equal(expected[p], got[p]), (stored, scan, p)
    stream.convert_orbax_to_hf(tmp_path / "unscanned", tmp_path / "hf")
    _assert_bitwise(src, tmp_path / "hf")


def test_dtype_casts_everything_but_float32_A_log_and_gdn_norm(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("qwen3_5_moe_text")
    stats = stream.convert_hf_to_orbax(src, tmp_path / "orbax", dtype="bfloat16")
    assert stats.kept_float32  # reported, not silent
    meta = json.loads((tmp_path / "orbax" / "qwax.json").read_text())
    for name, info in meta["params"].items():
        pinned = name.endswith("linear_attn.A_log") or name.endswith("linear_attn.norm.weight")
        assert info["dtype"] == ("float32" if pinned else "bfloat16"), name
    stream.convert_orbax_to_hf(tmp_path / "orbax", tmp_path / "hf")
    with CheckpointReader(src) as a, CheckpointReader(tmp_path / "hf") as b:
        for key in a.keys():
            pinned = key.endswith("linear_attn.A_log") or key.endswith("linear_attn.norm.weight")
            assert np.dtype(b.dtype(key)).name == ("float32" if pinned else "bfloat16"), key
            want = a.get(key) if pinned else a.get(key).astype(b.dtype(key))
            assert want.tobytes() == b.get(key).tobytes(), key
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    model = stream.load_orbax(tmp_path / "orbax")  # dtype "auto": what the checkpoint stores
    assert model.options.param_dtype == np.dtype(jnp.bfloat16) and model.options.dtype == np.dtype(jnp.bfloat16)
    assert stream.load_orbax(tmp_path / "orbax", dtype=np.float32).options.param_dtype == np.float32


def test_hf_to_hf_reshards_and_changes_the_expert_layout_exactly(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("qwen3_5_moe_text")  # transformers saves these experts per expert
    stream.convert_hf_to_hf(src, tmp_path / "sharded", max_shard_bytes=100_000)
    assert len(json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    _assert_bitwise(src, tmp_path / "sharded")

    stream.convert_hf_to_hf(src, tmp_path / "fused", experts="fused")
    with CheckpointReader(tmp_path / "fused") as fused, CheckpointReader(src) as per_expert:
        assert "model.layers.0.mlp.experts.gate_up_proj" in fused
        inter = 32
        stack = fused.get("model.layers.0.mlp.experts.gate_up_proj")
        assert np.array_equal(stack[3, :inter], per_expert.get("model.layers.0.mlp.experts.3.gate_proj.weight"))
        assert np.array_equal(stack[3, inter:], per_expert.get("model.layers.0.mlp.experts.3.up_proj.weight"))
    stream.convert_hf_to_hf(tmp_path / "fused", tmp_path / "back", experts="per_expert")
    with CheckpointReader(src) as a, CheckpointReader(tmp_path / "back") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert a.get(key).tobytes() == b.get(key).tobytes(), key
    # orbax export can change the expert layout too
    stream.convert_hf_to_orbax(src, tmp_path / "orbax")
    stream.convert_orbax_to_hf(tmp_path / "orbax", tmp_path / "fused2", experts="fused")
    _assert_bitwise(tmp_path / "fused", tmp_path / "fused2")


def test_tensors_qwax_does_not_use_are_kept_verbatim(hf_checkpoint, tmp_path):
    from qwax.convert.safetensors_io import write_checkpoint

    src, _ = hf_checkpoint("qwen3_5_text")
    with CheckpointReader(src) as reader:
        tensors = dict(reader.items())
    tensors["model.visual.blocks.0.attn.qkv.weight"] = np.arange(12, dtype=np.float32).reshape(3, 4)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text((src / "config.json").read_text())
    write_checkpoint(tmp_path / "src", tensors)
    with pytest.warns(UserWarning, match="ignoring 1 tensor"):
        qwax.load_hf(tmp_path / "src")
    stream.convert_hf_to_orbax(tmp_path / "src", tmp_path / "orbax")
    stream.convert_orbax_to_hf(tmp_path / "orbax", tmp_path / "hf")
    _assert_bitwise(tmp_path / "src", tmp_path / "hf")


def test_corrupted_orbax_data_is_detected_on_export(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("qwen3_5_text")
    stream.convert_hf_to_orbax(src, tmp_path / "orbax")
    data = max((tmp_path / "orbax" / "d").iterdir(), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        stream.convert_orbax_to_hf(tmp_path / "orbax", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_get_slice_reads_leading_axis_rows(hf_checkpoint):
    src, _ = hf_checkpoint("qwen3_5_text")
    with CheckpointReader(src) as reader:
        key = "model.embed_tokens.weight"
        full = reader.get(key)
        assert np.array_equal(reader.get_slice(key, 5, 17), full[5:17])
        assert reader.get_slice(key, 3, 3).shape == (0, full.shape[1])
        with pytest.raises(CheckpointError, match="out of range"):
            reader.get_slice(key, 0, full.shape[0] + 1)
