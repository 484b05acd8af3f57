"""The MTP head: checkpoint round trip, logits against an independent torch module, speculative decoding."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from flax import nnx

import qwax
from qwax.convert.hf import CheckpointLayout, hf_tensors
from qwax.convert.safetensors_io import CheckpointReader, write_checkpoint
from qwax.inference import speculative
from hf_models import random_ids


@pytest.fixture(scope="module")
def mtp_checkpoint(hf_checkpoint, tmp_path_factory):
    """The tiny HF Qwen3.5-MoE checkpoint plus random mtp.* tensors stored per expert, as Qwen3.5 ships them."""
    src, hf_model = hf_checkpoint("qwen3_5_moe_text")
    dst = tmp_path_factory.mktemp("mtp") / "ckpt"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["mtp_num_hidden_layers"] = 1
    (dst / "config.json").write_text(json.dumps(config))
    cfg = qwax.QwaxConfig.from_hf(dst)
    donor = qwax.QwaxForCausalLM(cfg.replace(initializer_range=0.1), rngs=nnx.Rngs(42))
    rng = np.random.default_rng(0)
    mtp = {}
    for key, value in hf_tensors(donor, CheckpointLayout(fused_experts=True, fused_mtp_experts=False)):
        if key.startswith("mtp."):
            # Zero-centred norm offsets are 0 at init: give every tensor random values.
            mtp[key] = (value + 0.1 * rng.standard_normal(value.shape)).astype(np.float32)
    with CheckpointReader(dst) as reader:
        tensors = dict(reader.items())
    (dst / "model.safetensors").unlink()
    write_checkpoint(dst, {**tensors, **mtp})
    return dst, hf_model, mtp


def test_mtp_weights_round_trip_bitwise(mtp_checkpoint, tmp_path):
    src, _, mtp = mtp_checkpoint
    model = qwax.load_hf(src)
    assert model.config.mtp_num_hidden_layers == 1
    qwax.save_hf(model, tmp_path / "out")
    with CheckpointReader(tmp_path / "out") as reader:
        saved = {k: reader.get(k) for k in reader.keys() if k.startswith("mtp.")}
    assert set(saved) == set(mtp)
    assert "mtp.layers.0.mlp.experts.0.gate_proj.weight" in saved  # per-expert, as loaded
    for key, value in mtp.items():
        assert saved[key].dtype == value.dtype and np.array_equal(saved[key], value), key


def _torch_mtp_logits(hf_model, mtp, ids):
    """An independent MTP head in torch, assembled from transformers' own layer classes and the spec (§8)."""
    import torch
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as m

    config = hf_model.config
    t = {k: torch.as_tensor(v) for k, v in mtp.items()}
    norms = {name: m.Qwen3_5MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
             for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")}
    for name, norm in norms.items():
        norm.weight.data = t[f"mtp.{name}.weight"]
    fc = torch.nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
    fc.weight.data = t["mtp.fc.weight"]
    layer = m.Qwen3_5MoeDecoderLayer(config, layer_idx=config.layer_types.index("full_attention"))
    layer_state = {k[len("mtp.layers.0."):]: v for k, v in t.items() if k.startswith("mtp.layers.0.")}
    e = config.num_experts
    layer_state["mlp.experts.gate_up_proj"] = torch.stack([torch.cat(
        [layer_state.pop(f"mlp.experts.{i}.gate_proj.weight"), layer_state.pop(f"mlp.experts.{i}.up_proj.weight")])
        for i in range(e)])
    layer_state["mlp.experts.down_proj"] = torch.stack(
        [layer_state.pop(f"mlp.experts.{i}.down_proj.weight") for i in range(e)])
    layer.load_state_dict(layer_state, strict=True)
    layer.self_attn.config._attn_implementation = "eager"
    with torch.no_grad():
        tokens = torch.as_tensor(ids, dtype=torch.long)
        hidden = hf_model.model(input_ids=tokens).last_hidden_state[:, :-1]
        embeds = hf_model.model.embed_tokens(tokens[:, 1:])
        x = fc(torch.cat([norms["pre_fc_norm_embedding"](embeds), norms["pre_fc_norm_hidden"](hidden)], dim=-1))
        length = x.shape[1]
        positions = torch.arange(length)[None].expand(x.shape[0], -1)
        cos_sin = hf_model.model.rotary_emb(x, positions)
        causal = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]
        x = layer(x, position_embeddings=cos_sin, attention_mask=causal, position_ids=positions)
        if isinstance(x, tuple):
            x = x[0]
        return hf_model.lm_head(norms["norm"](x)).numpy()


@pytest.mark.slow
def test_mtp_logits_match_an_independent_torch_head(mtp_checkpoint):
    src, hf_model, mtp = mtp_checkpoint
    model = qwax.load_hf(src)
    ids = random_ids(2, 40, seed=21)
    hidden = model(ids).hidden
    ours = np.asarray(model.mtp_forward(hidden[:, :-1], ids[:, 1:]).logits)
    np.testing.assert_allclose(ours, _torch_mtp_logits(hf_model, mtp, ids), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_speculative_decoding_equals_plain_greedy(mtp_checkpoint, batch):
    model = qwax.load_hf(mtp_checkpoint[0])
    ids = random_ids(batch, 30, seed=22 + batch)
    mask = np.ones_like(ids)
    if batch > 1:
        mask[1, :6] = 0
        mask[2, :17] = 0
    plain = qwax.generate(model, ids, attention_mask=mask, max_new_tokens=24)
    stats = {}
    fast = speculative.generate_mtp(model, ids, attention_mask=mask, max_new_tokens=24, stats=stats)
    np.testing.assert_array_equal(fast, plain)
    assert stats["drafts"] > 0  # a random head is mostly rejected: every rejection rolled the state back


@pytest.mark.slow
def test_accepted_drafts_and_rejections_mix_exactly(mtp_checkpoint, monkeypatch):
    """An oracle drafter that is right on every other draft exercises acceptance and rollback alternately."""
    model = qwax.load_hf(mtp_checkpoint[0])
    ids = random_ids(2, 20, seed=30)
    plain = qwax.generate(model, ids, max_new_tokens=30)
    calls = []

    def oracle(mtp_logits, generated):
        calls.append(generated)
        right = plain[:, 20 + generated]  # the token after the last emitted one
        return right if len(calls) % 2 else (right + 1) % model.config.vocab_size

    monkeypatch.setattr(speculative, "_draft_tokens", oracle)
    stats = {}
    fast = qwax.generate(model, ids, max_new_tokens=30, speculative="mtp")
    fast_stats = speculative.generate_mtp(model, ids, max_new_tokens=30, stats=stats)
    np.testing.assert_array_equal(fast, plain)
    np.testing.assert_array_equal(fast_stats, plain)
    assert 0 < stats["accepted"] < stats["drafts"]


@pytest.mark.slow
def test_speculative_decoding_honours_stop_tokens_and_streaming(mtp_checkpoint, monkeypatch):
    """With stop ids, a pad id and a stream, the speculative path emits exactly what the plain greedy path does,
    through accepted pairs and rollbacks alike."""
    model = qwax.load_hf(mtp_checkpoint[0])
    ids = random_ids(2, 20, seed=31)
    plain = qwax.generate(model, ids, max_new_tokens=16)
    calls = []

    def oracle(mtp_logits, generated):
        calls.append(generated)
        right = plain[:, 20 + generated]
        return right if len(calls) % 2 else (right + 1) % model.config.vocab_size

    monkeypatch.setattr(speculative, "_draft_tokens", oracle)
    eos = [int(plain[0, 20 + 4]), int(plain[1, 20 + 7])]
    kw = dict(max_new_tokens=16, eos_token_id=eos, pad_token_id=5)
    want_columns, got_columns = [], []
    want = qwax.generate(model, ids, stream=want_columns.append, **kw)
    # seed is accepted: greedy decoding draws nothing, so it cannot change the tokens (as on the plain path).
    got = qwax.generate(model, ids, stream=got_columns.append, speculative="mtp", seed=123, **kw)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.stack(got_columns, 1), np.stack(want_columns, 1))
    assert want.shape[1] < 20 + 16  # both rows stopped early
    assert calls  # the oracle drafted


def test_speculative_decoding_of_zero_tokens_returns_the_prompt(mtp_checkpoint):
    model = qwax.load_hf(mtp_checkpoint[0])
    ids = random_ids(1, 9, seed=32)
    stats = {}
    np.testing.assert_array_equal(speculative.generate_mtp(model, ids, max_new_tokens=0, stats=stats), ids)
    assert stats["drafts"] == 0
