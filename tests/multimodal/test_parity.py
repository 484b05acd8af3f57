"""Multimodal logits, positions and checkpoints equal transformers' Qwen3_5(Moe)ForConditionalGeneration."""

from __future__ import annotations

import numpy as np
import pytest

import qwax
from qwax.convert.safetensors_io import CheckpointReader
from qwax.multimodal import QwaxForConditionalGeneration, rope_index
from hf_mm import END, IMAGE, START, VIDEO, hf_forward, make_mm_model, pixels, text, vision_run

MODEL_TYPES = ("qwen3_5", "qwen3_5_moe")
TOL = 1e-4


@pytest.fixture(scope="module")
def mm_checkpoint(tmp_path_factory):
    """model_type -> (path, transformers model, qwax model), built once per module."""
    cache = {}

    def build(model_type):
        if model_type not in cache:
            path = tmp_path_factory.mktemp(f"mm_{model_type}")
            hf = make_mm_model(model_type, path)
            cache[model_type] = (path, hf, qwax.load_hf(path))
        return cache[model_type]

    return build


def _compare(hf, ours, ids, mask=None, **vision):
    ref = hf_forward(hf, ids, mask, **vision)
    arrays = {k: np.asarray(v) for k, v in vision.items()}
    got = np.asarray(ours(np.asarray(ids), attention_mask=mask, **arrays).logits)
    valid = np.ones(np.shape(ids), bool) if mask is None else np.asarray(mask, bool)
    err = np.abs(got - ref)[valid].max()
    assert err <= TOL, f"max |qwax - transformers| = {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_one_image_logits_match_transformers(model_type, mm_checkpoint):
    _, hf, ours = mm_checkpoint(model_type)
    assert isinstance(ours, QwaxForConditionalGeneration)
    grids = [(1, 8, 6)]
    ids = np.array([text(5, 1) + vision_run(*grids[0]) + text(7, 2)])
    _compare(hf, ours, ids, pixel_values=pixels(grids), image_grid_thw=grids)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_two_images_of_different_sizes_in_one_prompt(model_type, mm_checkpoint):
    _, hf, ours = mm_checkpoint(model_type)
    grids = [(1, 4, 8), (1, 6, 4)]
    ids = np.array([text(3, 3) + vision_run(*grids[0]) + text(4, 4) + vision_run(*grids[1]) + text(5, 5)])
    _compare(hf, ours, ids, pixel_values=pixels(grids, seed=1), image_grid_thw=grids)


def _video_prompt(grid, seed):
    """Text, then per temporal patch a timestamp (as a few text tokens) and its placeholder run, then text."""
    t, h, w = grid
    ids = text(4, seed)
    for frame in range(t):
        ids += text(3, seed + 10 + frame) + vision_run(1, h, w, VIDEO)
    return ids + text(4, seed + 1)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_video_of_four_frames(model_type, mm_checkpoint):
    _, hf, ours = mm_checkpoint(model_type)
    grids = [(2, 6, 4)]  # 4 frames = 2 temporal patches of 2 frames
    ids = np.array([_video_prompt(grids[0], 6)])
    _compare(hf, ours, ids, pixel_values_videos=pixels(grids, seed=2), video_grid_thw=grids)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_batch_of_two_prompts_with_padding(model_type, mm_checkpoint):
    _, hf, ours = mm_checkpoint(model_type)
    grids = [(1, 4, 4), (1, 6, 8)]
    rows = [text(2, 7) + vision_run(*grids[0]) + text(3, 8),
            text(4, 9) + vision_run(*grids[1]) + text(6, 10)]
    length = max(map(len, rows))
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for i, row in enumerate(rows):  # left padding, as for generation
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    _compare(hf, ours, ids, mask, pixel_values=pixels(grids, seed=3), image_grid_thw=grids)


def test_image_and_video_in_one_prompt(mm_checkpoint):
    _, hf, ours = mm_checkpoint("qwen3_5")
    image, video = [(1, 4, 6)], [(2, 4, 4)]
    ids = np.array([text(3, 11) + vision_run(*image[0]) + _video_prompt(video[0], 12)])
    _compare(hf, ours, ids, pixel_values=pixels(image, seed=4), image_grid_thw=image,
             pixel_values_videos=pixels(video, seed=5), video_grid_thw=video)


def test_rope_index_matches_transformers(mm_checkpoint):
    import torch

    _, hf, _ = mm_checkpoint("qwen3_5")
    image, video = [(1, 4, 8), (1, 6, 4)], [(3, 4, 6)]
    rows = [text(2, 1) + vision_run(*image[0]) + text(3, 2) + _video_prompt(video[0], 3),
            text(5, 4) + vision_run(*image[1]) + text(2, 5)]
    length = max(map(len, rows))
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    types = np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))
    ref_pos, ref_delta = hf.model.get_rope_index(
        torch.as_tensor(ids), torch.as_tensor(types, dtype=torch.int32), torch.as_tensor(image),
        torch.as_tensor(video), torch.as_tensor(mask))
    pos, delta = rope_index(ids, mask, image, video, image_token_id=IMAGE, video_token_id=VIDEO)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy()[:, 0])


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_roundtrip_is_bitwise_with_no_missing_or_unexpected_keys(model_type, mm_checkpoint, tmp_path):
    import transformers

    src, hf, ours = mm_checkpoint(model_type)
    qwax.save_hf(ours, tmp_path / "out")
    cls = {"qwen3_5": transformers.Qwen3_5ForConditionalGeneration,
           "qwen3_5_moe": transformers.Qwen3_5MoeForConditionalGeneration}[model_type]
    reloaded, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True, dtype="float32")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    original, again = hf.state_dict(), reloaded.state_dict()
    assert set(original) == set(again)
    for key, tensor in original.items():
        assert np.array_equal(tensor.numpy(), again[key].numpy()), key
    with CheckpointReader(tmp_path / "out") as reader:
        keys = set(reader.keys())
    assert any(k.startswith("model.visual.") for k in keys)
    assert any(k.startswith("model.language_model.") for k in keys)


def test_text_only_load_keeps_the_language_model(mm_checkpoint):
    src, hf, ours = mm_checkpoint("qwen3_5")
    with pytest.warns(UserWarning, match="ignoring"):
        text_model = qwax.load_hf(src, text_only=True)
    assert isinstance(text_model, qwax.QwaxForCausalLM)
    ids = np.array([text(9, 20)])
    np.testing.assert_array_equal(np.asarray(text_model(ids).logits), np.asarray(ours(ids).logits))


def test_placeholder_count_mismatch_raises(mm_checkpoint):
    _, _, ours = mm_checkpoint("qwen3_5")
    grids = [(1, 8, 6)]
    ids = np.array([text(3, 1) + [START] + [IMAGE] * 11 + [END]])  # 12 features, 11 placeholders
    with pytest.raises(ValueError, match="11 image placeholder token.*gives 12 image feature"):
        ours(ids, pixel_values=pixels(grids), image_grid_thw=np.array(grids))
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(np.array([text(3, 1) + vision_run(1, 4, 4)]))


@pytest.mark.parametrize("grid, match", [
    ([(1, 7, 6)], r"image_grid_thw\[0\] = \[1, 7, 6\].*multiples of the spatial merge size 2"),
    ([(0, 8, 6)], r"t >= 1"),
    ([[1, 8]], r"\[num_items, 3\]"),
])
def test_malformed_grid_raises(grid, match, mm_checkpoint):
    _, _, ours = mm_checkpoint("qwen3_5")
    ids = np.array([text(3, 1) + vision_run(1, 8, 6)])
    with pytest.raises(ValueError, match=match):
        ours(ids, pixel_values=pixels([(1, 8, 6)]), image_grid_thw=np.array(grid))


def test_pixel_rows_must_match_the_grid(mm_checkpoint):
    _, _, ours = mm_checkpoint("qwen3_5")
    ids = np.array([text(3, 1) + vision_run(1, 8, 6)])
    with pytest.raises(ValueError, match=r"pixel_values has shape \(40, 384\), expected \(48, 384\)"):
        ours(ids, pixel_values=pixels([(1, 8, 5)]), image_grid_thw=np.array([(1, 8, 6)]))


def test_placeholder_run_longer_than_its_grid_raises():
    ids = np.array([[1, START] + [IMAGE] * 5 + [END]])
    with pytest.raises(ValueError, match="has 5 tokens but its grid"):
        rope_index(ids, None, [(1, 4, 4)], None, image_token_id=IMAGE, video_token_id=VIDEO)
