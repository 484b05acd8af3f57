"""Generation with the hybrid cache: token parity with transformers' generate, and cache exactness."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwax
from qwax.inference import init_cache, prefill
from qwax.inference.generate import decode_step
from hf_models import MODEL_TYPES, random_ids


def _hf_generate(hf_model, ids, mask, new):
    import torch

    with torch.no_grad():
        out = hf_model.generate(torch.as_tensor(ids, dtype=torch.long),
                                attention_mask=torch.as_tensor(mask, dtype=torch.long), max_new_tokens=new,
                                do_sample=False, pad_token_id=0, eos_token_id=None)
    return out.numpy()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_greedy_generate_matches_transformers(model_type, hf_checkpoint):
    path, hf_model = hf_checkpoint(model_type)
    model = qwax.load_hf(path)
    single = random_ids(1, 23, seed=7)
    np.testing.assert_array_equal(
        qwax.generate(model, single, max_new_tokens=32), _hf_generate(hf_model, single, np.ones_like(single), 32))
    batch = random_ids(3, 70, seed=8)
    mask = np.ones_like(batch)
    mask[1, :9] = 0
    mask[2, :40] = 0  # prompts of 70, 61 and 30 tokens, left-padded
    ours = qwax.generate(model, batch, attention_mask=mask, max_new_tokens=32)
    np.testing.assert_array_equal(ours, _hf_generate(hf_model, batch, mask, 32))


@pytest.fixture(scope="module")
def moe_model(hf_checkpoint):
    path, _ = hf_checkpoint("qwen3_5_moe_text")
    return qwax.load_hf(path)


def test_prefill_then_decode_equals_full_forward(moe_model):
    cfg = moe_model.config
    prompt, steps = 70, 6  # the prompt crosses the 64-token chunk boundary of the delta rule
    ids = random_ids(2, prompt + steps, seed=9)
    full = np.asarray(moe_model(ids).logits)
    graphdef, params = nnx.split(moe_model)
    cache = init_cache(cfg, 2, 256)
    logits, cache = prefill(graphdef, params, cache, ids[:, :prompt], np.ones((2, prompt), np.int32), 32)
    np.testing.assert_allclose(np.asarray(logits), full[:, prompt - 1], atol=1e-4)
    for t in range(steps):
        logits, cache = decode_step(graphdef, params, cache, jnp.asarray(ids[:, prompt + t]))
        np.testing.assert_allclose(np.asarray(logits), full[:, prompt + t], atol=1e-4, err_msg=f"step {t}")


def test_prefill_in_two_chunks_gives_the_same_cache(moe_model):
    cfg = moe_model.config
    ids = random_ids(2, 96, seed=10)
    mask = np.ones_like(ids)
    mask[0, :11] = 0
    graphdef, params = nnx.split(moe_model)
    one_logits, one = prefill(graphdef, params, init_cache(cfg, 2, 256), ids, mask, 96)
    two_logits, two = prefill(graphdef, params, init_cache(cfg, 2, 256), ids, mask, 48)
    # fp32 reassociation only (the delta rule's chunk boundaries move); a lost or doubled token is O(1).
    np.testing.assert_allclose(np.asarray(one_logits), np.asarray(two_logits), atol=1e-4)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_left_padding_never_enters_the_gdn_state(moe_model):
    """A padded row's cache equals the cache of the same prompt run alone without padding."""
    cfg = moe_model.config
    ids = random_ids(1, 40, seed=12)
    graphdef, params = nnx.split(moe_model)
    padded = np.concatenate([np.full((1, 24), 5, np.int32), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 24), np.int32), np.ones((1, 40), np.int32)], axis=1)
    _, a = prefill(graphdef, params, init_cache(cfg, 1, 256), padded, mask, 64)
    _, b = prefill(graphdef, params, init_cache(cfg, 1, 256), ids, np.ones_like(ids), 64)
    for layer_a, layer_b in zip(a.layers, b.layers):
        if hasattr(layer_a, "recurrent"):
            np.testing.assert_allclose(np.asarray(layer_a.recurrent), np.asarray(layer_b.recurrent), atol=1e-5)


def test_sampling_controls(moe_model):
    ids = random_ids(2, 12, seed=13)
    greedy = qwax.generate(moe_model, ids, max_new_tokens=8)
    np.testing.assert_array_equal(qwax.generate(moe_model, ids, max_new_tokens=8, temperature=0.7, top_k=1), greedy)
    np.testing.assert_array_equal(qwax.generate(moe_model, ids, max_new_tokens=8, temperature=0.7, top_p=1e-6),
                                  greedy)
    a = qwax.generate(moe_model, ids, max_new_tokens=8, temperature=1.0, seed=3)
    b = qwax.generate(moe_model, ids, max_new_tokens=8, temperature=1.0, seed=3)
    c = qwax.generate(moe_model, ids, max_new_tokens=8, temperature=1.0, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_stop_tokens_and_streaming(moe_model):
    ids = random_ids(2, 12, seed=14)
    greedy = qwax.generate(moe_model, ids, max_new_tokens=10)
    stop = int(greedy[0, 12 + 2])  # row 0 produces this token third
    columns = []
    out = qwax.generate(moe_model, ids, max_new_tokens=10, eos_token_id=stop, pad_token_id=0,
                        stream=columns.append)
    np.testing.assert_array_equal(np.stack(columns, axis=1), out[:, 12:])
    first = int(np.argmax(greedy[0, 12:] == stop))
    assert out[0, 12 + first] == stop and (out[0, 13 + first:] == 0).all()
    row1 = greedy[1, 12:12 + out.shape[1] - 12]
    if stop not in row1:
        np.testing.assert_array_equal(out[1, 12:], row1)


def test_prompt_longer_than_the_maximum_length(moe_model):
    ids = random_ids(1, 500, seed=1)
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        qwax.generate(moe_model, ids, max_new_tokens=20)
