"""Image / video preprocessing and placeholder expansion equal transformers' Qwen3.5 processors."""

from __future__ import annotations

import numpy as np
import pytest

from qwax.multimodal.processor import (IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, VisionProcessor,
                                       expand_placeholders, frame_timestamps, smart_resize)

CONFIG = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
          "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 64 * 64, "longest_edge": 320 * 320}}


def _image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_images_of_several_sizes_and_aspect_ratios_match_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hf = Qwen2VLImageProcessorPil(**CONFIG)
    ours = VisionProcessor.from_dict(CONFIG)
    # Upscaled (small), downscaled (large), square, tall, wide, already a multiple of 32.
    images = [_image(h, w, i) for i, (h, w) in enumerate([(20, 30), (37, 53), (64, 64), (300, 120), (90, 410),
                                                         (512, 512), (96, 160)])]
    ref = hf(images, return_tensors="np")
    got = ours.preprocess_images(images)
    np.testing.assert_array_equal(got["image_grid_thw"], ref["image_grid_thw"])
    assert got["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(got["pixel_values"], ref["pixel_values"])


def test_pil_and_grayscale_inputs_match_transformers():
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hf = Qwen2VLImageProcessorPil(**CONFIG)
    ours = VisionProcessor.from_dict(CONFIG)
    images = [Image.fromarray(_image(45, 70, 9)), Image.fromarray(_image(50, 50, 10)[..., 0], mode="L")]
    ref = hf(images, return_tensors="np")
    got = ours.preprocess_images(images)
    np.testing.assert_array_equal(got["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_array_equal(got["pixel_values"], ref["pixel_values"])


@pytest.mark.parametrize("frames, h, w", [(4, 64, 96), (5, 40, 30), (8, 300, 200)])
def test_video_resize_rule_and_patch_order_match_transformers(frames, h, w):
    pytest.importorskip("torchvision", reason="transformers' video processor needs torchvision")
    import torch
    from transformers.models.qwen3_vl import video_processing_qwen3_vl as ref_mod

    proc = VisionProcessor.video_defaults()
    ref_size = ref_mod.smart_resize(frames, h, w, temporal_factor=2, factor=32, min_pixels=proc.min_pixels,
                                    max_pixels=proc.max_pixels)
    assert smart_resize(h, w, 32, proc.min_pixels, proc.max_pixels, num_frames=frames) == ref_size
    # Frames already at the target size: no resampling, so the whole pipeline must be bitwise equal.
    rh, rw = ref_size
    video = np.random.default_rng(frames).integers(0, 256, size=(frames, rh, rw, 3), dtype=np.uint8)
    got = proc.preprocess_videos([video])
    x = (video.astype(np.float64) / 255).astype(np.float32)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    tensor = torch.as_tensor(np.moveaxis(x, -1, 1)[None])
    patches, gt, gh, gw = ref_mod.Qwen3VLVideoProcessor.patchify(None, tensor, patch_size=16, merge_size=2,
                                                                  temporal_patch_size=2)
    np.testing.assert_array_equal(got["video_grid_thw"], [[gt, gh, gw]])
    np.testing.assert_array_equal(got["pixel_values_videos"], patches[0].numpy())


def test_video_of_repeated_frames_equals_its_images():
    """A video [A, A, B, B] is the image rows of A then of B (the image path is checked against transformers)."""
    proc = VisionProcessor.from_dict(CONFIG)
    a, b = _image(64, 96, 1), _image(64, 96, 2)
    video = proc.preprocess_videos([np.stack([a, a, b, b])])
    images = proc.preprocess_images([a, b])
    np.testing.assert_array_equal(video["video_grid_thw"], [[2, 4, 6]])
    np.testing.assert_array_equal(video["pixel_values_videos"], images["pixel_values"])
    odd = proc.preprocess_videos([np.stack([a, a, b])])  # padded with the last frame
    np.testing.assert_array_equal(odd["pixel_values_videos"], images["pixel_values"])


def test_timestamps_match_transformers():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    for indices, fps in (([0, 12, 24, 36], 24.0), ([0, 15, 30, 45, 60], 30.0), ([3, 7], 2.0)):
        assert frame_timestamps(indices, fps) == Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, 2)


def test_placeholders_expand_to_the_feature_count():
    texts = [f"a {IMAGE_PAD} b {VIDEO_PAD}", f"{IMAGE_PAD}"]
    out = expand_placeholders(texts, image_grid_thw=[[1, 4, 6], [1, 2, 2]], video_grid_thw=[[2, 4, 4]],
                              video_timestamps=[[0.25, 1.25]])
    frame = f"{VISION_START}{VIDEO_PAD * 4}{VISION_END}"
    assert out[0] == f"a {IMAGE_PAD * 6} b <0.2 seconds>{frame}<1.2 seconds>{frame}"
    assert out[1] == IMAGE_PAD
    with pytest.raises(ValueError, match="holds 1 <\\|image_pad\\|> placeholder\\(s\\) but 2 image"):
        expand_placeholders([IMAGE_PAD], image_grid_thw=[[1, 2, 2], [1, 2, 2]])
