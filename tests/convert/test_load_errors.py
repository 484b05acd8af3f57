"""Bad checkpoints and bad inputs raise errors that name the problem."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import qwax
from qwax.config import ConfigError
from qwax.convert.safetensors_io import CheckpointError, CheckpointReader, write_checkpoint


@pytest.fixture()
def checkpoint(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("qwen3_5_moe_text")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, edit):
    with CheckpointReader(path) as reader:
        tensors = dict(reader.items())
    edit(tensors)
    (path / "model.safetensors").unlink()
    write_checkpoint(path, tensors)


def test_token_ids_outside_the_vocabulary(checkpoint):
    model = qwax.load_hf(checkpoint)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 128\)"):
        model(np.array([[1, 2, 128]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(np.array([[-1, 2]]))


def test_truncated_safetensors_file_names_the_file(checkpoint):
    file = checkpoint / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        qwax.load_hf(checkpoint)


def test_missing_key_is_named(checkpoint):
    key = "model.layers.3.self_attn.k_norm.weight"
    _rewrite(checkpoint, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        qwax.load_hf(checkpoint)


def test_wrong_shape_names_key_expected_and_found(checkpoint):
    key = "model.layers.0.linear_attn.in_proj_z.weight"

    def edit(t):
        t[key] = np.zeros((31, 64), np.float32)

    _rewrite(checkpoint, edit)
    with pytest.raises(CheckpointError, match=r"in_proj_z\.weight.*\[31, 64\].*expected \[32, 64\]"):
        qwax.load_hf(checkpoint)


def test_unknown_model_type(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["model_type"] = "qwen4"
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'qwen4'"):
        qwax.load_hf(checkpoint)


def test_missing_directory():
    with pytest.raises(CheckpointError, match="does not exist"):
        qwax.load_hf("/nonexistent/checkpoint")
