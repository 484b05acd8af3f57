"""The pure train step: loss definition, packing exactness, accumulation, dtypes, weight-decay mask, MTP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qwax
from qwax.options import split_overrides
from qwax.train.optim import decay_mask, make_optimizer, param_names
from qwax.train.step import LossWeights, make_eval_step, make_train_step

SMALL = dict(hidden_size=32, num_hidden_layers=2, full_attention_interval=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, linear_num_key_heads=1, linear_num_value_heads=2,
             linear_key_head_dim=16, linear_value_head_dim=16, mrope_section=(1, 1, 0), vocab_size=64)


def small_model(preset: str = "tiny-moe", **kw) -> qwax.QwaxForCausalLM:
    """A small model of `preset`; `kw` are config fields and run options (e.g. dtype, scan_layers)."""
    extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                 shared_expert_intermediate_size=32) if preset == "tiny-moe" else dict(intermediate_size=64)
    config_kw, option_kw = split_overrides(kw)
    return qwax.QwaxForCausalLM(qwax.get_preset(preset, **{**SMALL, **extra, **config_kw}),
                                qwax.RunOptions(**option_kw), rngs=nnx.Rngs(0))


def row_batch(docs: list[np.ndarray], length: int) -> dict:
    """One packed row holding `docs` back to back, padded to `length` (segment 0)."""
    ids, seg, pos = np.zeros(length, np.int32), np.zeros(length, np.int32), np.zeros(length, np.int32)
    at = 0
    for i, d in enumerate(docs, 1):
        ids[at: at + len(d)], seg[at: at + len(d)], pos[at: at + len(d)] = d, i, np.arange(len(d))
        at += len(d)
    targets = np.zeros(length, np.int32)
    targets[:-1] = ids[1:]
    weights = np.zeros(length, np.float32)
    weights[:-1] = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)
    return {"input_ids": ids[None], "segment_ids": seg[None], "position_ids": pos[None], "targets": targets[None],
            "weights": weights[None]}


@pytest.mark.slow
def test_packed_batch_loss_equals_token_weighted_loss_of_documents_run_one_by_one():
    model = small_model()
    graphdef, params = nnx.split(model)
    eval_step = jax.jit(make_eval_step(graphdef))
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 64, n).astype(np.int32) for n in (23, 70, 5, 40)]  # 70 > the 64-token chunk
    packed_sum, packed_n = eval_step(params, row_batch(docs, 160))
    alone_sum = alone_n = 0.0
    for d in docs:
        s, n = eval_step(params, row_batch([d], len(d)))
        alone_sum, alone_n = alone_sum + float(s), alone_n + float(n)
    assert float(packed_n) == alone_n == sum(len(d) - 1 for d in docs)
    np.testing.assert_allclose(float(packed_sum) / float(packed_n), alone_sum / alone_n, rtol=1e-6)


@pytest.mark.slow
def test_loss_is_mean_cross_entropy_over_weighted_tokens():
    model = small_model("tiny-dense")
    graphdef, params = nnx.split(model)
    batch = row_batch([np.arange(10, dtype=np.int32), np.arange(20, 30, dtype=np.int32)], 24)
    s, n = jax.jit(make_eval_step(graphdef))(params, batch)
    logits = np.asarray(model(batch["input_ids"], position_ids=batch["position_ids"],
                              segment_ids=batch["segment_ids"]).logits[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    w = batch["weights"][0]
    expected = -(logp[np.arange(24), batch["targets"][0]] * w).sum()
    assert float(n) == w.sum() == 9 + 9  # 9 (input, next token) pairs per 10-token document
    np.testing.assert_allclose(float(s), expected, rtol=1e-5)


def _batch(rng, a, b, length, vocab=64) -> dict:
    ids = rng.integers(0, vocab, (a, b, length + 1)).astype(np.int32)
    return {"input_ids": ids[..., :-1], "targets": ids[..., 1:], "segment_ids": np.ones((a, b, length), np.int32),
            "position_ids": np.broadcast_to(np.arange(length, dtype=np.int32), (a, b, length)).copy(),
            "weights": rng.integers(0, 2, (a, b, length)).astype(np.float32)}


@pytest.mark.slow
def test_gradient_accumulation_equals_one_large_batch():
    graphdef, params = nnx.split(small_model("tiny-dense"))
    opt = optax.sgd(1.0)  # the update is the gradient itself (Adam's first step would amplify float noise)
    step = jax.jit(make_train_step(graphdef, opt, LossWeights(0.0)))
    big = _batch(np.random.default_rng(0), 1, 4, 32)
    accum = jax.tree.map(lambda x: x.reshape(2, 2, 32), big)
    p1, _, m1 = step(params, opt.init(params), big, jax.random.key(0))
    p2, _, m2 = step(params, opt.init(params), accum, jax.random.key(0))
    np.testing.assert_allclose(float(m1["ce"]), float(m2["ce"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.slow
def test_short_training_lowers_the_loss():
    graphdef, params = nnx.split(small_model())
    opt = make_optimizer(learning_rate=1e-2, warmup_steps=2, total_steps=30)
    step = jax.jit(make_train_step(graphdef, opt, LossWeights(0.001)))
    rng = np.random.default_rng(0)
    batch = _batch(rng, 1, 2, 32, vocab=8)  # 8 symbols: learnable within a few steps
    state = opt.init(params)
    losses = []
    for i in range(15):
        params, state, m = step(params, state, batch, jax.random.key(i))
        losses.append(float(m["ce"]))
    assert losses[-1] < losses[0] - 1.0, losses
    assert float(m["aux_loss"]) > 0


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_master_weights():
    model = small_model(dtype="bfloat16", param_dtype="float32")
    graphdef, params = nnx.split(model)
    opt = make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=10)
    step = jax.jit(make_train_step(graphdef, opt, LossWeights(0.001), model.options.dtype))
    new, _, m = step(params, opt.init(params), _batch(np.random.default_rng(0), 1, 2, 16), jax.random.key(0))
    assert np.isfinite(float(m["loss"]))
    assert {x.dtype for x in jax.tree.leaves(new)} == {jnp.dtype("float32")}
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)))


@pytest.mark.slow
def test_mtp_loss_trains_the_mtp_head():
    graphdef, params = nnx.split(small_model("tiny-dense", mtp_num_hidden_layers=1))
    opt = make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=10)
    step = jax.jit(make_train_step(graphdef, opt, LossWeights(0.0, mtp_loss_weight=0.3)))
    new, _, m = step(params, opt.init(params), _batch(np.random.default_rng(0), 1, 2, 16), jax.random.key(0))
    assert np.isfinite(float(m["mtp_loss"])) and float(m["mtp_loss"]) > 1.0
    np.testing.assert_allclose(float(m["loss"]), float(m["ce"]) + 0.3 * float(m["mtp_loss"]), rtol=1e-5)
    fc_before = params["mtp"]["fc"]["kernel"][...]
    assert not np.array_equal(new["mtp"]["fc"]["kernel"][...], fc_before)


def test_training_with_the_mtp_loss_lowers_the_main_and_the_mtp_loss():
    graphdef, params = nnx.split(small_model("tiny-dense", mtp_num_hidden_layers=1))
    opt = make_optimizer(learning_rate=1e-2, warmup_steps=2, total_steps=30)
    step = jax.jit(make_train_step(graphdef, opt, LossWeights(0.0, mtp_loss_weight=0.3)))
    batch = _batch(np.random.default_rng(0), 1, 2, 32, vocab=8)  # 8 symbols: learnable within a few steps
    batch["weights"] = np.ones_like(batch["weights"])
    state = opt.init(params)
    ce, mtp = [], []
    for i in range(15):
        params, state, m = step(params, state, batch, jax.random.key(i))
        ce.append(float(m["ce"]))
        mtp.append(float(m["mtp_loss"]))
    assert ce[-1] < ce[0] - 1.0, ce
    assert mtp[-1] < mtp[0] - 1.0, mtp


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_weight_decay_mask_skips_norms_biases_A_log_and_dt_bias(scan):
    model = small_model(num_hidden_layers=4, full_attention_interval=2, scan_layers=scan, mtp_num_hidden_layers=1)
    _, params = nnx.split(model)
    flat = jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]
    by_name = {"/".join(param_names(path)): bool(m) for path, m in flat}
    for name, decays in by_name.items():
        leaf = name.split("/")[-1]
        no_decay = "norm" in name or leaf in ("A_log", "dt_bias")
        assert decays == (not no_decay), name
    assert any(k.endswith("A_log") for k in by_name) and any(k.endswith("q_norm/weight") for k in by_name)
    assert by_name["embed_tokens"] and by_name["lm_head/kernel"]
    # The optimizer applies it: with a zero gradient, decayed weights shrink and the others stay put.
    opt = make_optimizer(learning_rate=1.0, warmup_steps=0, total_steps=2, weight_decay=0.5, clip_norm=0)
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    for (path, u), (_, m) in zip(jax.tree_util.tree_flatten_with_path(updates)[0], flat):
        assert bool(jnp.any(u != 0)) == bool(m) or not bool(m), "/".join(param_names(path))
        if not m:
            assert not bool(jnp.any(u != 0)), "/".join(param_names(path))
