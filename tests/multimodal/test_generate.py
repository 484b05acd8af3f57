"""Greedy generation with images equals transformers' generate."""

from __future__ import annotations

import numpy as np
import pytest

import qwax
from qwax.multimodal.generate import generate
from hf_mm import IMAGE, VIDEO, make_mm_model, pixels, text, vision_run


def _hf_generate(hf, ids, mask, pv, grids, new_tokens):
    import torch

    ids_t = torch.as_tensor(ids, dtype=torch.long)
    types = torch.zeros_like(ids_t, dtype=torch.int32)
    types[ids_t == IMAGE] = 1
    types[ids_t == VIDEO] = 2
    with torch.no_grad():
        out = hf.generate(input_ids=ids_t, attention_mask=torch.as_tensor(mask, dtype=torch.long),
                          mm_token_type_ids=types, pixel_values=torch.as_tensor(pv),
                          image_grid_thw=torch.as_tensor(np.asarray(grids), dtype=torch.long),
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out.numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mm_gen")
    hf = make_mm_model("qwen3_5", path, seed=3)
    return hf, qwax.load_hf(path)


def test_greedy_generation_with_an_image_matches_transformers(checkpoint):
    hf, ours = checkpoint
    grids = [(1, 8, 6)]
    ids = np.array([text(6, 1) + vision_run(*grids[0]) + text(4, 2)])
    mask = np.ones_like(ids)
    pv = pixels(grids, seed=7)
    ref = _hf_generate(hf, ids, mask, pv, grids, 16)
    got = qwax.generate(ours, ids, max_new_tokens=16, pixel_values=pv, image_grid_thw=np.array(grids))
    assert got.shape == (1, ids.shape[1] + 16)
    np.testing.assert_array_equal(got, ref)


def test_greedy_generation_of_a_padded_batch_matches_transformers(checkpoint):
    hf, ours = checkpoint
    grids = [(1, 4, 4), (1, 8, 6)]
    rows = [text(3, 3) + vision_run(*grids[0]) + text(2, 4), text(5, 5) + vision_run(*grids[1]) + text(4, 6)]
    length = max(map(len, rows))
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    pv = pixels(grids, seed=8)
    ref = _hf_generate(hf, ids, mask, pv, grids, 8)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=8, pixel_values=pv,
                   image_grid_thw=np.array(grids), prefill_chunk_size=16)
    np.testing.assert_array_equal(got, ref)
