"""Router z-loss: mean over MoE layers and real tokens of logsumexp(router logits)^2."""

from __future__ import annotations

import pytest
import numpy as np
from flax import nnx

import qwax
from qwax.train.step import LossWeights, micro_batch_terms


@pytest.mark.slow
def test_router_z_loss_matches_a_numpy_computation_and_skips_padding():
    cfg = qwax.get_preset("tiny-moe")
    model = qwax.QwaxForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    segments = np.ones_like(ids)
    segments[1, 10:] = 0  # padding
    batch = dict(input_ids=ids, targets=ids, weights=(segments > 0).astype(np.float32),
                 position_ids=np.tile(np.arange(16), (2, 1)), segment_ids=segments)
    terms = micro_batch_terms(model, batch, LossWeights(z_loss_coef=1e-3))
    logits = np.asarray(model(ids, position_ids=batch["position_ids"], segment_ids=segments).router_logits, np.float64)
    assert logits.shape == (cfg.num_hidden_layers, ids.size, cfg.num_experts)
    lse = np.log(np.exp(logits).sum(-1))  # [layers, tokens]
    keep = segments.reshape(-1) > 0
    np.testing.assert_allclose(float(terms["z"]), np.mean(lse[:, keep] ** 2), rtol=1e-5)
