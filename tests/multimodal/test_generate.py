"""Generation with images: greedy equals transformers' generate; sampling follows the seed; stop tokens,
streaming and a device mesh work as for text."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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


@pytest.mark.slow
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


@pytest.mark.slow
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


def _image_prompt(grids, seed):
    rows = [text(3 + i, seed + i) + vision_run(*g) + text(2 + i, seed + 10 + i) for i, g in enumerate(grids)]
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return ids, mask, pixels(grids, seed=seed)


@pytest.mark.slow
def test_sampling_follows_the_seed(checkpoint):
    _, ours = checkpoint
    grids = [(1, 4, 4), (1, 8, 6)]
    ids, mask, pv = _image_prompt(grids, seed=9)
    kw = dict(attention_mask=mask, max_new_tokens=8, pixel_values=pv, image_grid_thw=np.array(grids),
              temperature=1.0, prefill_chunk_size=16)
    a = qwax.generate(ours, ids, seed=1, **kw)
    b = qwax.generate(ours, ids, seed=1, **kw)
    c = qwax.generate(ours, ids, seed=2, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = qwax.generate(ours, ids, **{**kw, "temperature": 0.0})
    np.testing.assert_array_equal(qwax.generate(ours, ids, seed=1, top_k=1, **kw), greedy)


def test_stop_tokens_and_streaming(checkpoint):
    _, ours = checkpoint
    grids = [(1, 4, 4), (1, 8, 6)]
    ids, mask, pv = _image_prompt(grids, seed=11)
    kw = dict(attention_mask=mask, max_new_tokens=8, pixel_values=pv, image_grid_thw=np.array(grids))
    greedy = generate(ours, ids, **kw)[:, ids.shape[1]:]
    stop = int(greedy[0, 2])
    columns = []
    out = generate(ours, ids, eos_token_id=stop, pad_token_id=5, stream=columns.append, **kw)[:, ids.shape[1]:]
    np.testing.assert_array_equal(np.stack(columns, axis=1), out)
    for row, ref in zip(out, greedy):
        hits = np.flatnonzero(ref == stop)
        end = hits[0] + 1 if hits.size else len(ref)
        np.testing.assert_array_equal(row[:end], ref[:end])
        assert (row[end:] == 5).all()


def test_arguments_the_multimodal_path_cannot_honour_raise(checkpoint):
    _, ours = checkpoint
    ids = np.array([text(6, 1)])
    with pytest.raises(ValueError, match="not supported for multimodal"):
        qwax.generate(ours, ids, max_new_tokens=4, speculative="mtp")
    with pytest.raises(ValueError, match="pass mesh= as well"):
        qwax.generate(ours, ids, max_new_tokens=4, rules="fsdp")


MESH_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from flax import nnx
    import qwax
    from qwax.multimodal import MultimodalConfig, QwaxForConditionalGeneration, VisionConfig
    from qwax.sharding.mesh import make_mesh

    assert len(jax.devices()) == 8
    IMAGE, VIDEO, START, END = 250, 251, 252, 253
    text = qwax.get_preset("tiny-moe", initializer_range=0.1)
    vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=8,
                          out_hidden_size=text.hidden_size, num_position_embeddings=36)
    cfg = MultimodalConfig(text=text, vision=vision, model_type="qwen3_5_moe", image_token_id=IMAGE,
                           video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    model = QwaxForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    grids = [(1, 4, 4), (1, 8, 6)]
    rows = [list(rng.integers(0, 200, 3)) + [START] + [IMAGE] * 4 + [END] + list(rng.integers(0, 200, 2)),
            list(rng.integers(0, 200, 5)) + [START] + [IMAGE] * 12 + [END] + list(rng.integers(0, 200, 4))]
    length = max(map(len, rows))
    ids = np.zeros((2, length), np.int32)
    mask = np.zeros((2, length), np.int32)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    pv = rng.normal(size=(sum(t * h * w for t, h, w in grids), 3 * 2 * 8 * 8)).astype(np.float32)
    kw = dict(attention_mask=mask, max_new_tokens=10, pixel_values=pv, image_grid_thw=np.array(grids),
              prefill_chunk_size=16)
    single = qwax.generate(model, ids, **kw)
    for spec, strategy in (("data=2,tensor=4", "fsdp_tp"), ("data=2,fsdp=4", "fsdp")):
        sharded = qwax.generate(model, ids, mesh=make_mesh(spec), rules=strategy, **kw)
        assert np.array_equal(sharded, single), (spec, sharded, single)
    print("OK")
""")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_generation_with_an_image_on_a_2x4_mesh_equals_one_device():
    """Vision tower, fused prefill and decode on the mesh give the single-device greedy tokens."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-c", MESH_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-4000:]
