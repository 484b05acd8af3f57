"""DPO: qwax's loss, metrics and gradients against an independent torch computation of the DPO formula on
transformers' logits, for the same tiny models and pairs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qwax
from qwax.convert.hf import CheckpointLayout, hf_tensors
from qwax.train.dpo import dpo_objective, pair_metrics, pair_sums
from qwax.train.step import make_train_step
from hf_models import make_hf_model

BETA = 0.3
PAIRS, LENGTH = 3, 40


def pair_batch(vocab: int, seed: int = 0) -> dict:
    """[2P, L] rows: P chosen then P rejected sequences sharing a prompt, right-padded; weights mark the
    completion's targets. The last pair is padding (no weighted token) and must be ignored."""
    rng = np.random.default_rng(seed)
    rows = 2 * PAIRS
    ids = np.zeros((rows, LENGTH), np.int32)
    seg = np.zeros((rows, LENGTH), np.int32)
    w = np.zeros((rows, LENGTH), np.float32)
    for p in range(PAIRS - 1):
        prompt = rng.integers(1, vocab, rng.integers(5, 12))
        for side in (p, PAIRS + p):
            completion = rng.integers(1, vocab, rng.integers(6, LENGTH - len(prompt)))
            seq = np.concatenate([prompt, completion])
            ids[side, :len(seq)], seg[side, :len(seq)] = seq, 1
            w[side, len(prompt) - 1:len(seq) - 1] = 1.0  # target t = token t+1 of the completion
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    pos = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), ids.shape).copy()
    return {"input_ids": ids, "segment_ids": seg, "position_ids": pos, "targets": targets, "weights": w}


def torch_dpo(policy, reference, batch: dict, beta: float):
    """The DPO formula written directly in torch: (loss, metrics dict, {param name: grad})."""
    import torch
    import torch.nn.functional as F

    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    targets = torch.as_tensor(batch["targets"], dtype=torch.long)
    w = torch.as_tensor(batch["weights"])

    def logps(model):
        logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        return (logp.gather(-1, targets[..., None])[..., 0] * w).sum(-1)

    policy.zero_grad()
    pi = logps(policy)
    with torch.no_grad():
        ref = logps(reference)
    n = PAIRS
    valid = (w[:n].sum(-1) > 0) & (w[n:].sum(-1) > 0)
    chosen = beta * (pi[:n] - ref[:n])
    rejected = beta * (pi[n:] - ref[n:])
    losses = -F.logsigmoid(chosen - rejected)
    loss = losses[valid].mean()
    loss.backward()
    chosen, rejected = chosen.detach(), rejected.detach()
    metrics = {"rewards_chosen": float(chosen[valid].mean()), "rewards_rejected": float(rejected[valid].mean()),
               "reward_accuracy": float((chosen > rejected)[valid].float().mean())}
    return float(loss.detach()), metrics, {k: p.grad.detach().numpy().copy() for k, p in policy.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen3_5_text", "qwen3_5_moe_text"])
def test_dpo_loss_and_gradients_match_torch(model_type, tmp_path):
    policy_dir, reference_dir = tmp_path / "policy", tmp_path / "reference"
    hf_policy = make_hf_model(model_type, policy_dir, seed=0)
    hf_reference = make_hf_model(model_type, reference_dir, seed=1)  # another model, so the rewards are not 0
    batch = pair_batch(hf_policy.config.vocab_size)
    torch_loss, torch_metrics, torch_grads = torch_dpo(hf_policy, hf_reference, batch, BETA)

    policy, reference = qwax.load_hf(policy_dir), qwax.load_hf(reference_dir)
    graphdef, params = nnx.split(policy)
    ref_params = nnx.split(reference)[1]
    objective = dpo_objective(BETA)
    stacked = jax.tree.map(lambda x: jnp.asarray(x)[None], batch)  # one micro-batch

    def loss_fn(p):
        total = objective.totals(stacked)
        value, sums = objective.terms(nnx.merge(graphdef, p), nnx.merge(graphdef, ref_params), batch, total, 1)
        return value, sums

    (loss, sums), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    assert float(sums["pairs"]) == PAIRS - 1
    assert abs(float(loss) - torch_loss) <= 1e-4 * max(1.0, abs(torch_loss))
    assert torch_loss != pytest.approx(np.log(2), abs=1e-3)  # the rewards really differ from 0
    metrics = pair_metrics(sums)
    for key, expected in torch_metrics.items():
        assert float(metrics[key]) == pytest.approx(expected, abs=1e-4), key

    ours = dict(hf_tensors(nnx.merge(graphdef, grads), CheckpointLayout(fused_experts=True)))
    assert set(ours) == set(torch_grads), set(ours) ^ set(torch_grads)
    checked = 0
    for key, expected in torch_grads.items():
        norm = np.linalg.norm(expected)
        if norm == 0:
            assert np.abs(ours[key]).max() < 1e-8, key
            continue
        rel = np.linalg.norm(ours[key] - expected) / norm
        assert rel <= 1e-3, f"{model_type} DPO grad {key}: relative error {rel:.2e}"
        checked += 1
    assert checked > len(torch_grads) // 2

    # The jitted train step reports the same loss (and applies an update).
    step = jax.jit(make_train_step(graphdef, optax.sgd(0.0), objective))
    _, _, step_metrics = step(params, optax.sgd(0.0).init(params), stacked, jax.random.key(0), None, ref_params)
    assert float(step_metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)


def test_pair_sums_ignore_padding_pairs_and_count_ties_as_wrong():
    policy = jnp.asarray([-3.0, -5.0, 0.0, -4.0, -5.0, 0.0])  # chosen rows, then rejected rows
    reference = jnp.asarray([-4.0, -5.0, 0.0, -4.0, -5.0, 0.0])
    weights = jnp.asarray([[1.0], [1.0], [0.0], [1.0], [1.0], [0.0]])
    sums = pair_sums(policy, reference, weights, beta=0.5)
    m = pair_metrics(sums)
    assert float(sums["pairs"]) == 2
    assert float(m["reward_accuracy"]) == 0.5  # pair 0: margin 0.5 > 0; pair 1: a tie
    expected = (-np.log(1 / (1 + np.exp(-0.5))) + np.log(2)) / 2
    assert float(m["loss"]) == pytest.approx(expected, rel=1e-6)
    assert float(m["reward_margin"]) == pytest.approx(0.25)


def test_dpo_beta_must_be_positive():
    with pytest.raises(ValueError, match="beta"):
        dpo_objective(0.0)
