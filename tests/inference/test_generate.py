"""Generation with the hybrid cache: token parity with transformers' generate, and cache exactness."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwax
from qwax.inference import decode_step, init_cache, prefill
from hf_models import MODEL_TYPES, random_ids


def _hf_generate(hf_model, ids, mask, new):
    import torch

    with torch.no_grad():
        out = hf_model.generate(torch.as_tensor(ids, dtype=torch.long),
                                attention_mask=torch.as_tensor(mask, dtype=torch.long), max_new_tokens=new,
                                do_sample=False, pad_token_id=0, eos_token_id=None)
    return out.numpy()


@pytest.mark.slow
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


@pytest.mark.slow
def test_prefill_then_decode_equals_full_forward(moe_model):
    cfg, opts = moe_model.config, moe_model.options
    prompt, steps = 70, 6  # the prompt crosses the 64-token chunk boundary of the delta rule
    ids = random_ids(2, prompt + steps, seed=9)
    full = np.asarray(moe_model(ids).logits)
    graphdef, params = nnx.split(moe_model)
    cache = init_cache(cfg, opts, 2, 256)
    logits, cache = prefill(graphdef, params, cache, ids[:, :prompt], np.ones((2, prompt), np.int32), 32)
    np.testing.assert_allclose(np.asarray(logits), full[:, prompt - 1], atol=1e-4)
    for t in range(steps):
        logits, cache = decode_step(graphdef, params, cache, jnp.asarray(ids[:, prompt + t]))
        np.testing.assert_allclose(np.asarray(logits), full[:, prompt + t], atol=1e-4, err_msg=f"step {t}")


@pytest.mark.slow
def test_prefill_in_two_chunks_gives_the_same_cache(moe_model):
    cfg, opts = moe_model.config, moe_model.options
    ids = random_ids(2, 96, seed=10)
    mask = np.ones_like(ids)
    mask[0, :11] = 0
    graphdef, params = nnx.split(moe_model)
    one_logits, one = prefill(graphdef, params, init_cache(cfg, opts, 2, 256), ids, mask, 96)
    two_logits, two = prefill(graphdef, params, init_cache(cfg, opts, 2, 256), ids, mask, 48)
    # fp32 reassociation only (the delta rule's chunk boundaries move); a lost or doubled token is O(1).
    np.testing.assert_allclose(np.asarray(one_logits), np.asarray(two_logits), atol=1e-4)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_left_padding_never_enters_the_gdn_state(moe_model):
    """A padded row's cache equals the cache of the same prompt run alone without padding."""
    cfg, opts = moe_model.config, moe_model.options
    ids = random_ids(1, 40, seed=12)
    graphdef, params = nnx.split(moe_model)
    padded = np.concatenate([np.full((1, 24), 5, np.int32), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 24), np.int32), np.ones((1, 40), np.int32)], axis=1)
    _, a = prefill(graphdef, params, init_cache(cfg, opts, 1, 256), padded, mask, 64)
    _, b = prefill(graphdef, params, init_cache(cfg, opts, 1, 256), ids, np.ones_like(ids), 64)
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


def _stopped(reference: np.ndarray, eos: list[int], pad: int) -> np.ndarray:
    """Each row of `reference` [B, n] up to and including its first id in `eos`, then `pad`; the columns after the
    last row's stop are dropped (generation ends when every row has stopped)."""
    rows, ends = [], []
    for row in reference:
        hits = np.flatnonzero(np.isin(row, eos))
        end = hits[0] + 1 if hits.size else len(row)
        rows.append(np.concatenate([row[:end], np.full(len(row) - end, pad, row.dtype)]))
        ends.append(end)
    return np.stack(rows)[:, :max(ends)]


def test_stop_tokens_and_streaming(moe_model, hf_checkpoint):
    """Every row equals transformers' greedy tokens up to and including its first stop id, then padding."""
    _, hf_model = hf_checkpoint("qwen3_5_moe_text")
    ids = random_ids(2, 12, seed=14)
    reference = _hf_generate(hf_model, ids, np.ones_like(ids), 10)[:, 12:]
    first = int(reference[0, 2])  # row 0 produces this token third
    second = int(next(t for t in reference[1, 3:] if t != first))  # and row 1 this one, at the 4th step or later
    for eos in ([first], [first, second]):
        expected = _stopped(reference, eos, pad=7)
        columns = []
        out = qwax.generate(moe_model, ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=7,
                            stream=columns.append)
        np.testing.assert_array_equal(out[:, :12], ids)
        np.testing.assert_array_equal(out[:, 12:], expected, err_msg=f"eos {eos}")
        np.testing.assert_array_equal(np.stack(columns, axis=1), expected)
    assert expected.shape[1] < 10  # with both stop ids every row stopped early and generation ended


@pytest.mark.slow
def test_prefill_from_embeddings_with_positions_returns_hidden(moe_model):
    """The engine's prefill over embeddings with explicit positions equals the prefill over ids, and its hidden
    states are the full forward's at the prompt's positions."""
    cfg, opts = moe_model.config, moe_model.options
    ids = random_ids(2, 40, seed=15)
    mask = np.ones_like(ids)
    mask[1, :9] = 0
    graphdef, params = nnx.split(moe_model)
    logits, cache = prefill(graphdef, params, init_cache(cfg, opts, 2, 256), ids, mask, 16)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    e_logits, e_cache, hidden = prefill(graphdef, params, init_cache(cfg, opts, 2, 256), None, mask, 16,
                                        inputs_embeds=moe_model.embed(ids),
                                        position_ids=np.broadcast_to(positions, (3, 2, 40)), return_hidden=True)
    np.testing.assert_allclose(np.asarray(e_logits), np.asarray(logits), atol=1e-5)
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(e_cache)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert hidden.shape == (2, 40, cfg.hidden_size)
    full = np.asarray(moe_model(ids, attention_mask=mask, position_ids=positions).hidden)
    np.testing.assert_allclose(np.asarray(hidden)[mask > 0], full[mask > 0], atol=1e-4)
    # A rope delta of 0 on every multimodal row is the text position.
    tokens = jnp.asarray(ids[:, -1])
    plain, _ = decode_step(graphdef, params, cache, tokens)
    shifted, _ = decode_step(graphdef, params, e_cache, tokens, rope_delta=jnp.zeros((2,), jnp.int32))
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(plain), atol=1e-5)


def test_seed_may_be_a_key(moe_model):
    ids = random_ids(2, 12, seed=16)
    by_int = qwax.generate(moe_model, ids, max_new_tokens=6, temperature=1.0, seed=5)
    by_key = qwax.generate(moe_model, ids, max_new_tokens=6, temperature=1.0, seed=jax.random.key(5))
    np.testing.assert_array_equal(by_int, by_key)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rules="fsdp"), "pass mesh= as well"),
    (dict(mesh="data=2"), "mesh must be a jax.sharding.Mesh"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(temperature=1.0, top_k=0), "top_k must be"),
    (dict(temperature=1.0, top_p=1.5), "top_p must be"),
    (dict(seed="seven"), "seed must be"),
    (dict(prefill_chunk_size=0), "prefill_chunk_size must be"),
    (dict(max_new_tokens=-1), "max_new_tokens must be"),
    (dict(speculative="eagle"), "the only supported drafter is 'mtp'"),
    (dict(speculative="mtp", temperature=0.5), "pass temperature=0"),
    (dict(speculative="mtp"), "needs a model with an MTP head"),
    (dict(image_grid_thw=np.array([[1, 2, 2]])), "need a multimodal model"),
])
def test_arguments_a_path_cannot_honour_raise(moe_model, kwargs, message):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        qwax.generate(moe_model, random_ids(1, 8, seed=17), **kwargs)


def test_prefill_checks_its_inputs(moe_model):
    cfg, opts = moe_model.config, moe_model.options
    graphdef, params = nnx.split(moe_model)
    ids = random_ids(1, 40, seed=18)
    with pytest.raises(ValueError, match="from slot 0 does not fit the cache's 32 slots"):
        prefill(graphdef, params, init_cache(cfg, opts, 1, 32), ids, np.ones_like(ids), 16)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        prefill(graphdef, params, init_cache(cfg, opts, 1, 64), ids, np.ones_like(ids), 16,
                inputs_embeds=moe_model.embed(ids))
    with pytest.raises(ValueError, match="position_ids must be"):
        prefill(graphdef, params, init_cache(cfg, opts, 1, 64), ids, np.ones_like(ids), 16,
                position_ids=np.zeros((2, 1, 40), np.int32))


def test_prompt_longer_than_the_maximum_length(moe_model):
    ids = random_ids(1, 500, seed=1)
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        qwax.generate(moe_model, ids, max_new_tokens=20)
