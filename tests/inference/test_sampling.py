"""The sampler: penalties and top-k / top-p against transformers' logits processors, per-row settings, and no
recompilation for new values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwax.inference.sampling import (RowSettings, SamplerState, SamplingParams, apply_penalties, choose,
                                     initial_state, restrict)

V = 50


def _logits(b: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(b, V)).astype(np.float32) * 3


def _settings(*rows: SamplingParams) -> RowSettings:
    return RowSettings(*(jnp.asarray(x) for x in RowSettings.of(rows)))


def test_repetition_penalty_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = _logits(2)
    prompt = np.array([[3, 7, 7, 11], [0, 1, 2, 40]])
    generated = np.array([[7, 20], [49, 49]])
    state = initial_state(jax.random.split(jax.random.key(0), 2), prompt, None, V, penalised=True)
    counts = np.zeros((2, V), np.int32)
    for r in range(2):
        np.add.at(counts[r], generated[r], 1)
    ours = apply_penalties(jnp.asarray(logits), _settings(SamplingParams(repetition_penalty=1.3),
                                                          SamplingParams(repetition_penalty=0.8)),
                           jnp.asarray(counts), state.prompt_seen)
    for r, penalty in enumerate((1.3, 0.8)):
        seen = torch.as_tensor(np.concatenate([prompt[r], generated[r]])[None])
        ref = RepetitionPenaltyLogitsProcessor(penalty)(seen, torch.as_tensor(logits[r:r + 1])).numpy()
        np.testing.assert_allclose(np.asarray(ours[r]), ref[0], rtol=1e-6)


def test_presence_and_frequency_penalties_follow_the_openai_definition():
    logits = _logits(1)
    counts = np.zeros((1, V), np.int32)
    counts[0, [4, 9, 9, 9]] = [1, 3, 3, 3]
    ours = apply_penalties(jnp.asarray(logits), _settings(SamplingParams(presence_penalty=0.5,
                                                                         frequency_penalty=0.25)),
                           jnp.asarray(counts), jnp.zeros((1, V), bool))
    expected = logits.copy()  # mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
    expected[0, 4] -= 1 * 0.25 + 0.5
    expected[0, 9] -= 3 * 0.25 + 0.5
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-6)


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.7), (8, 0.5), (1, None), (None, 1e-6)])
def test_top_k_and_top_p_keep_the_tokens_transformers_keeps(top_k, top_p):
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = _logits(3, seed=1)
    settings = _settings(*[SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)] * 3)
    ours = np.asarray(restrict(jnp.asarray(logits), settings.top_k, settings.top_p)) > np.finfo(np.float32).min
    ref = torch.as_tensor(logits)
    if top_k is not None:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p is not None:
        ref = TopPLogitsWarper(top_p)(None, ref)
    np.testing.assert_array_equal(ours, np.isfinite(ref.numpy()))


def test_rows_keep_their_own_settings_and_keys():
    """A batch mixing greedy, top-k and penalised rows gives each row the tokens it gets alone."""
    logits = jnp.asarray(_logits(3, seed=2))
    rows = [SamplingParams(), SamplingParams(temperature=0.9, top_k=4),
            SamplingParams(temperature=1.2, top_p=0.8, presence_penalty=1.0, repetition_penalty=1.1)]
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(3))
    prompt = np.array([[1, 2], [3, 4], [5, 6]])

    def run(indices: list[int]) -> np.ndarray:
        sub = [rows[i] for i in indices]
        state = initial_state(keys[jnp.asarray(indices)], prompt[indices], None, V, penalised=True)
        out, lg = [], logits[jnp.asarray(indices)]
        for _ in range(6):
            tokens, state = choose(lg, state, _settings(*sub), sampling=any(r.samples for r in sub))
            out.append(np.asarray(tokens))
        return np.stack(out, 1)

    together = run([0, 1, 2])
    for i in range(3):
        np.testing.assert_array_equal(together[i], run([i])[0])
    assert (together[0] == int(jnp.argmax(logits[0]))).all()  # greedy, no penalty: the argmax every step
    top4 = np.argsort(-np.asarray(logits[1]))[:4]
    assert np.isin(together[1], top4).all()


def test_new_values_do_not_recompile():
    logits = jnp.asarray(_logits(2, seed=3))
    state = SamplerState(jax.random.split(jax.random.key(0), 2), jnp.zeros((2, V), jnp.int32),
                         jnp.zeros((2, V), bool))
    choose(logits, state, _settings(*[SamplingParams(temperature=0.5, top_k=3)] * 2), sampling=True)
    compiled = choose._cache_size()
    for t, k, p, pres in [(0.7, 10, 0.9, 0.5), (1.3, None, 0.5, -1.0), (0.1, 2, None, 2.0)]:
        choose(logits, state, _settings(*[SamplingParams(temperature=t, top_k=k, top_p=p,
                                                         presence_penalty=pres)] * 2), sampling=True)
    assert choose._cache_size() == compiled


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty")])
def test_bad_settings_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
