"""load_hf / load_orbax dtypes ("auto" keeps what the checkpoint stores), run-option overrides, and checkpoint
layouts passed explicitly: loading leaves the model's graph exactly as its config and options build it."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwax
from qwax import QwaxConfig, QwaxForCausalLM, RunOptions
from qwax.convert import stream
from qwax.convert.hf import CheckpointLayout, hf_tensors, stored_dtype
from qwax.convert.safetensors_io import CheckpointReader
from hf_models import make_hf_model

MODEL_TYPE = "qwen3_5_moe_text"  # Gated DeltaNet (float32-only A_log and norm weight) and routed experts
BF16 = np.dtype(jnp.bfloat16)
F32 = np.dtype(np.float32)


def _float32_only(path) -> bool:
    """A_log and the GDN gated-norm weight, which qwax keeps in float32 whatever the dtypes say."""
    return path[-1] == "A_log" or path[-3:] == ("linear_attn", "norm", "weight")


def _param_dtypes(model) -> dict:
    return {p: np.dtype(v.get_value().dtype) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_dtypes(model, expected: np.dtype) -> None:
    dtypes = _param_dtypes(model)
    assert any(_float32_only(p) for p in dtypes)
    for p, dtype in dtypes.items():
        assert dtype == (F32 if _float32_only(p) else expected), (p, dtype)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """The tiny transformers model saved by save_pretrained in bfloat16 (A_log included: `.to()` casts all)."""
    import torch

    path = tmp_path_factory.mktemp("bf16") / "ckpt"
    make_hf_model(MODEL_TYPE).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype, expected", [(jnp.bfloat16, BF16), (np.float32, F32), ("bf16", BF16),
                                             ("bfloat16", BF16), ("fp32", F32)],
                         ids=["jnp.bfloat16", "np.float32", "bf16", "bfloat16", "fp32"])
def test_any_dtype_like_is_accepted(hf_checkpoint, dtype, expected):
    src, _ = hf_checkpoint(MODEL_TYPE)
    model = qwax.load_hf(src, dtype=dtype)
    assert model.options.dtype == expected and model.options.param_dtype == expected
    _assert_dtypes(model, expected)


def test_auto_keeps_the_stored_dtype(hf_checkpoint, bf16_checkpoint):
    f32_src, _ = hf_checkpoint(MODEL_TYPE)
    with CheckpointReader(bf16_checkpoint) as reader:
        assert stored_dtype(reader) == BF16
    for path, expected in ((bf16_checkpoint, BF16), (f32_src, F32)):
        model = qwax.load_hf(path)
        assert model.options.dtype == expected and model.options.param_dtype == expected, path
        _assert_dtypes(model, expected)


def test_auto_reads_the_tensors_not_config_json(bf16_checkpoint, tmp_path):
    stale = tmp_path / "stale"
    shutil.copytree(bf16_checkpoint, stale)
    config = json.loads((stale / "config.json").read_text())
    config["dtype"] = "float32"  # wrong: the tensors are bf16
    (stale / "config.json").write_text(json.dumps(config))
    _assert_dtypes(qwax.load_hf(stale), BF16)


def test_param_dtype_apart_from_the_compute_dtype(bf16_checkpoint):
    model = qwax.load_hf(bf16_checkpoint, dtype="bf16", param_dtype=np.float32)
    assert model.options.dtype == BF16 and model.options.param_dtype == F32
    _assert_dtypes(model, F32)
    model = qwax.load_hf(bf16_checkpoint, dtype=np.float32, param_dtype="auto")  # "auto": the stored dtype
    assert model.options.dtype == F32 and model.options.param_dtype == BF16


@pytest.mark.parametrize("kwargs, name", [({"dtype": "float8"}, "float8"), ({"dtype": "int4"}, "int4"),
                                          ({"param_dtype": "int4"}, "int4"), ({"dtype": np.int32}, "int32")])
def test_unknown_dtype_raises_naming_it(hf_checkpoint, kwargs, name):
    src, _ = hf_checkpoint(MODEL_TYPE)
    with pytest.raises(ValueError, match=name) as info:
        qwax.load_hf(src, **kwargs)
    assert "float32" in str(info.value)  # says what it accepts
    with pytest.raises(ValueError, match=name):
        qwax.load_hf("/nonexistent/checkpoint", **kwargs)  # checked before anything is read


def test_run_option_overrides_and_options(bf16_checkpoint):
    model = qwax.load_hf(bf16_checkpoint, scan_layers=False, gdn_impl="xla")
    assert model.options == RunOptions(dtype=BF16, scan_layers=False, gdn_impl="xla")
    # A given RunOptions is taken as it is (float32 here), except for what is passed explicitly.
    assert qwax.load_hf(bf16_checkpoint, options=RunOptions(scan_layers=False)).options == RunOptions(
        scan_layers=False)
    model = qwax.load_hf(bf16_checkpoint, "bf16", options=RunOptions(moe_impl="xla"), remat="full")
    assert model.options == RunOptions(dtype=BF16, moe_impl="xla", remat="full")


@pytest.mark.parametrize("options", [RunOptions(), RunOptions(dtype="bf16", scan_layers=False)],
                         ids=["default", "bf16-unscanned"])
def test_loading_does_not_change_the_graph(hf_checkpoint, tmp_path, options):
    src, _ = hf_checkpoint(MODEL_TYPE)
    cfg = QwaxConfig.from_hf(src)
    built = nnx.graphdef(nnx.eval_shape(lambda: QwaxForCausalLM(cfg, options, rngs=nnx.Rngs(0))))
    assert nnx.graphdef(qwax.load_hf(src, options=options)) == built
    stream.convert_hf_to_orbax(src, tmp_path / "orbax")
    assert nnx.graphdef(stream.load_orbax(tmp_path / "orbax", options=options)) == built


@pytest.mark.slow
def test_a_layout_passed_explicitly_survives_a_round_trip(hf_checkpoint, tmp_path):
    """A Qwen3.6-style checkpoint (MTP experts fused) written back as it was stored, by passing its layout."""
    src, _ = hf_checkpoint(MODEL_TYPE)
    cfg = QwaxConfig.from_hf(src, mtp_num_hidden_layers=1, initializer_range=0.1)
    fused_mtp = CheckpointLayout(fused_experts=True, fused_mtp_experts=True)
    qwax.save_hf(QwaxForCausalLM(cfg, rngs=nnx.Rngs(3)), tmp_path / "src", layout=fused_mtp)
    assert CheckpointLayout.of_checkpoint(tmp_path / "src") == fused_mtp

    model = qwax.load_hf(tmp_path / "src")
    assert not hasattr(model, "hf_layout")
    qwax.save_hf(model, tmp_path / "default")  # the published layout: MTP experts per expert
    with CheckpointReader(tmp_path / "default") as reader:
        assert "mtp.layers.0.mlp.experts.0.gate_proj.weight" in reader
        assert "mtp.layers.0.mlp.experts.gate_up_proj" not in reader
    qwax.save_hf(model, tmp_path / "kept", layout=CheckpointLayout.of_checkpoint(tmp_path / "src"))
    with CheckpointReader(tmp_path / "src") as a, CheckpointReader(tmp_path / "kept") as b:
        assert a.keys() == b.keys()
        for key in a.keys():
            assert a.dtype(key) == b.dtype(key) and a.get(key).tobytes() == b.get(key).tobytes(), key

    stream.convert_hf_to_orbax(tmp_path / "src", tmp_path / "orbax")
    assert stream.orbax_layout(tmp_path / "orbax") == fused_mtp
    keys = [k for k, _ in hf_tensors(stream.load_orbax(tmp_path / "orbax"), stream.orbax_layout(tmp_path / "orbax"))]
    assert "mtp.layers.0.mlp.experts.gate_up_proj" in keys


def test_layout_of_a_transformers_checkpoint(hf_checkpoint):
    src, _ = hf_checkpoint(MODEL_TYPE)  # save_pretrained writes experts per expert
    assert CheckpointLayout.of_checkpoint(src) == CheckpointLayout(prefix="model.", fused_experts=False)


def test_saved_config_records_the_parameters_dtype(bf16_checkpoint, tmp_path):
    qwax.save_hf(qwax.load_hf(bf16_checkpoint), tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    _assert_dtypes(qwax.load_hf(tmp_path / "bf16"), BF16)
    qwax.save_hf(qwax.load_hf(bf16_checkpoint, dtype=np.float32), tmp_path / "f32")
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
