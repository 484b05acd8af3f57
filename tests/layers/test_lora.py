"""LoRA adapters on qwax models: zero-B identity, merging, rsLoRA scaling, functional dropout, filters, errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwax
from qwax.layers.lora import DEFAULT_TARGETS, LoRA, LoRASalt, lora_dropout
from qwax.lora import FROZEN, TRAINABLE, adapter_sites, apply_lora, has_lora, lora_config_of, lora_modules, merge_lora
from qwax.sharding import abstract_mesh, get_rules, param_shardings

IDS = np.random.default_rng(0).integers(0, 256, size=(2, 12), dtype=np.int32)
ALL = DEFAULT_TARGETS + ("experts",)


def tiny(preset: str = "tiny-moe", *, scan: bool = True, **overrides) -> qwax.QwaxForCausalLM:
    """A tiny random float32 model: (GDN, attention) x 2, so the scanned layout has 2 layer groups, with the
    reference kernels (the cheapest to compile on the CPU). The presets' weight scale (0.02) keeps the network far
    from chaotic, so float32 reassociation stays ~1e-7 at the logits."""
    cfg = qwax.get_preset(preset, **{"num_hidden_layers": 4, "full_attention_interval": 2, **overrides})
    options = qwax.RunOptions(scan_layers=scan, moe_impl="reference", gdn_impl="reference")
    return qwax.QwaxForCausalLM(cfg, options, rngs=nnx.Rngs(0))


def randomise_b(model, scale: float = 0.05, seed: int = 1) -> None:
    """Nonzero B everywhere (apply_lora starts at B = 0)."""
    for i, adapter in enumerate(lora_modules(model).values()):
        shape = adapter.lora_b.get_value().shape
        adapter.lora_b.set_value(scale * jax.random.normal(jax.random.key(seed * 1000 + i), shape))


def logits(model, ids=IDS) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids)).logits)


# ------------------------------------------------------------------------------------------------ config
def test_config_scaling_and_rslora():
    assert qwax.LoRAConfig(rank=8, alpha=16).scaling == 2.0
    assert qwax.LoRAConfig(rank=16, alpha=8, use_rslora=True).scaling == pytest.approx(8 / 4)
    assert qwax.LoRAConfig(rank=4, alpha=8, targets=["q_proj", "q_proj"]).targets == ("q_proj",)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0, alpha=1), "rank=0"),
    (dict(rank=2.0, alpha=1), "rank=2.0"),
    (dict(rank=4, alpha=float("nan")), "alpha"),
    (dict(rank=4, alpha=8, dropout=1.0), "dropout=1.0"),
    (dict(rank=4, alpha=8, dropout=-0.1), "dropout"),
    (dict(rank=4, alpha=8, targets=("q_proj", "qkv", "lm_head")), r"unknown module name\(s\) \['qkv', 'lm_head'\]"),
    (dict(rank=4, alpha=8, targets=()), "empty"),
    (dict(rank=4, alpha=8, targets=("q_proj", "experts"), dropout=0.1), "'experts' needs dropout=0"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qwax.LoRAConfig(**kwargs)


def test_rslora_scaling_of_an_adapter():
    """The adapter computes s * x A B with s = alpha / sqrt(r) (rsLoRA) or alpha / r."""
    model = apply_lora(tiny(scan=False), qwax.LoRAConfig(rank=16, alpha=8, targets=("q_proj",), use_rslora=True))
    adapter = next(iter(lora_modules(model).values()))
    assert adapter.scaling == pytest.approx(2.0)
    randomise_b(model)
    x = np.random.default_rng(3).normal(size=(5, 64)).astype(np.float32)
    a, b = np.asarray(adapter.lora_a.get_value()), np.asarray(adapter.lora_b.get_value())
    np.testing.assert_allclose(np.asarray(adapter(jnp.asarray(x))), 8 / math.sqrt(16) * x @ a @ b, rtol=1e-5,
                               atol=1e-6)
    plain = apply_lora(tiny(scan=False), qwax.LoRAConfig(rank=16, alpha=8, targets=("q_proj",)))
    assert next(iter(lora_modules(plain).values())).scaling == 0.5


def test_adapter_a_is_peft_kaiming_uniform_and_b_zero():
    model = apply_lora(tiny(scan=False), qwax.LoRAConfig(rank=8, alpha=16, targets=("down_proj",)))
    for adapter in lora_modules(model).values():
        a = np.asarray(adapter.lora_a.get_value())
        bound = 1 / math.sqrt(a.shape[-2])
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
        assert not np.asarray(adapter.lora_b.get_value()).any()


# ------------------------------------------------------------------------------------------------ function
@pytest.mark.slow
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_zero_b_adapter_leaves_logits_unchanged(scan):
    model = tiny(scan=scan)
    before = logits(model)
    apply_lora(model, qwax.LoRAConfig(rank=4, alpha=8, targets=ALL))
    assert model.decoder.scanned == scan
    np.testing.assert_array_equal(logits(model), before)


@pytest.mark.parametrize("preset, targets", [
    ("tiny-moe", ALL),
    pytest.param("tiny-moe", DEFAULT_TARGETS, marks=pytest.mark.slow),
    pytest.param("tiny-next", ALL, marks=pytest.mark.slow),
    pytest.param("tiny-dense", DEFAULT_TARGETS, marks=pytest.mark.slow),
])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_merge_equals_adapter_model(preset, targets, scan):
    model = apply_lora(tiny(preset, scan=scan), qwax.LoRAConfig(rank=4, alpha=8, targets=targets))
    base = logits(model)
    randomise_b(model)
    adapted = logits(model)
    assert np.abs(adapted - base).max() > 0.05  # the adapters matter (logits are O(0.5))
    merged = merge_lora(model)
    assert not has_lora(merged) and lora_config_of(merged) is None
    assert has_lora(model)  # merge_lora leaves its argument alone
    np.testing.assert_array_equal(logits(model), adapted)
    err = np.abs(logits(merged) - adapted).max()
    assert err <= 1e-5, f"{preset} {targets[-1]} scan={scan}: merged vs adapter max |diff| {err:.2e}"
    # The merged model has the structure of a freshly built one (so save_hf, checkpoints and jit see a base model).
    fresh = tiny(preset, scan=scan)
    assert nnx.graphdef(merged) == nnx.graphdef(fresh)


def test_sites_skip_the_mtp_head_router_and_shared_expert_gate():
    model = tiny("tiny-moe", mtp_num_hidden_layers=1)
    names = [s.hf_name for s in adapter_sites(model)]
    assert names[0] == "model.layers.0.linear_attn.in_proj_qkv"
    assert not any(n.startswith("mtp.") or n.endswith((".gate", "shared_expert_gate", "lm_head")) for n in names)
    assert "model.layers.3.mlp.experts.down_proj" in names
    apply_lora(model, qwax.LoRAConfig(rank=2, alpha=2, targets=ALL))
    assert model.mtp.block.layers[0].self_attn.q_proj.lora is None
    assert model.decoder.groups.layers[1].mlp.shared_expert_gate.lora is None
    assert model.decoder.groups.layers[1].self_attn.q_proj.lora is not None


def _padded(spec: jax.sharding.PartitionSpec, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(spec))


@pytest.mark.parametrize("strategy", ["fsdp_tp", "fsdp_ep_tp"])
def test_adapters_shard_along_the_base_weights_logical_axes(strategy):
    model = apply_lora(tiny("tiny-moe"), qwax.LoRAConfig(rank=4, alpha=8, targets=ALL))
    state = nnx.state(model)  # every variable, salts included, must carry logical axes
    mesh = abstract_mesh("data=1,fsdp=2,expert=2,tensor=2")
    shardings = dict(nnx.to_flat_state(param_shardings(state, get_rules(strategy), mesh)))
    shapes = {path: v.get_value().shape for path, v in nnx.to_flat_state(state)}
    checked = 0
    for path, v in shardings.items():
        if path[-1] != "lora_a":
            continue
        base = path[:-2] + ("kernel",) if path[-2] == "lora" else path[:-3] + (f"experts_{path[-2]}",)
        w = _padded(shardings[base].get_value().spec, 4)
        a = _padded(v.get_value().spec, 4)
        b = _padded(shardings[path[:-1] + ("lora_b",)].get_value().spec, 4)
        rank = len(shapes[base])  # the layer-group dim, (experts,) in, out
        assert a[:rank - 1] == w[:rank - 1] and a[rank - 1] is None, (path, w, a)
        assert b[:rank - 2] == w[:rank - 2] and b[rank - 2] is None and b[rank - 1] == w[rank - 1], (path, w, b)
        checked += 1
    assert checked == len(lora_modules(model))
    q = shardings[("decoder", "groups", "layers", 1, "self_attn", "q_proj", "lora", "lora_b")]
    assert q.get_value().spec == jax.sharding.PartitionSpec(None, None, "tensor")


def test_trainable_and_frozen_filters_partition_the_parameters():
    model = apply_lora(tiny("tiny-moe"), qwax.LoRAConfig(rank=4, alpha=8, targets=ALL))
    _, trainable, frozen, rest = nnx.split(model, TRAINABLE, FROZEN, ...)
    n_lora = len(lora_modules(model))
    assert len(jax.tree.leaves(trainable)) == 2 * n_lora
    base = nnx.state(tiny("tiny-moe"), nnx.Param)
    assert len(jax.tree.leaves(frozen)) == len(jax.tree.leaves(base))
    assert all(isinstance(v, LoRASalt) for _, v in nnx.to_flat_state(rest))


def test_gradients_reach_only_the_adapters():
    """At init (B = 0) dL/dB is nonzero for every adapter, routed experts included; the base weights are not
    differentiated at all."""
    model = apply_lora(tiny("tiny-moe"), qwax.LoRAConfig(rank=4, alpha=8, targets=ALL))
    graphdef, trainable, rest = nnx.split(model, TRAINABLE, ...)

    @jax.jit
    def grads(trainable, rest):
        def loss(t):
            return jnp.mean(jnp.square(nnx.merge(graphdef, t, rest)(jnp.asarray(IDS)).logits))

        return jax.grad(loss)(trainable)

    flat = nnx.to_flat_state(grads(trainable, rest))
    b_grads = {path: np.abs(np.asarray(v.get_value())).max() for path, v in flat if path[-1] == "lora_b"}
    assert len(b_grads) == len(lora_modules(model)) and min(b_grads.values()) > 0, b_grads
    assert any(path[-3] == "experts_lora" for path in b_grads)


def test_multimodal_language_model_gets_the_adapters():
    from qwax.layers.vision import VisionConfig

    vision = VisionConfig(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=8,
                          out_hidden_size=64, num_position_embeddings=36)
    text = qwax.get_preset("tiny-dense", num_hidden_layers=4, full_attention_interval=2)
    cfg = qwax.MultimodalConfig(text=text, vision=vision,
                                image_token_id=250, video_token_id=251, vision_start_token_id=252,
                                vision_end_token_id=253)
    model = qwax.QwaxForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, qwax.LoRAConfig(rank=2, alpha=4, targets=("q_proj", "down_proj")))
    names = {s.hf_name for s in adapter_sites(model) if s.target in ("q_proj", "down_proj")}
    assert "model.language_model.layers.3.self_attn.q_proj" in names
    paths = {path for path, _ in lora_modules(model)}
    assert all(path[0] == "language_model" for path in paths) and len(paths) == 1 + 2  # q_proj: 1 slot, down_proj: 2
    assert lora_config_of(model).targets == ("q_proj", "down_proj")
    assert not has_lora(merge_lora(model)) and not has_lora(model.visual)


# ------------------------------------------------------------------------------------------------ dropout
def test_dropout_is_off_without_the_context_and_deterministic_with_it():
    model = apply_lora(tiny("tiny-dense"), qwax.LoRAConfig(rank=4, alpha=8, dropout=0.5))
    randomise_b(model)
    graphdef, state = nnx.split(model)
    reference = apply_lora(tiny("tiny-dense"), qwax.LoRAConfig(rank=4, alpha=8, dropout=0.0))
    nnx.update(reference, nnx.state(model, TRAINABLE))
    plain = logits(reference)
    np.testing.assert_allclose(logits(model), plain, rtol=0, atol=1e-6)

    @jax.jit
    def forward(state, key):
        with lora_dropout(key):
            return nnx.merge(graphdef, state)(jnp.asarray(IDS)).logits

    a, b = forward(state, jax.random.key(0)), forward(state, jax.random.key(1))
    assert np.abs(np.asarray(a) - plain).max() > 1e-3
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(forward(state, jax.random.key(0))), np.asarray(a))


def test_every_adapter_and_layer_group_has_its_own_salt():
    model = apply_lora(tiny("tiny-moe"), qwax.LoRAConfig(rank=4, alpha=8))
    salts = np.concatenate([np.asarray(a.salt.get_value()).reshape(-1) for a in lora_modules(model).values()])
    n_groups = model.decoder.num_groups
    assert n_groups == 2 and salts.size == n_groups * len(lora_modules(model))
    assert len(set(salts.tolist())) == salts.size


def test_scanned_groups_draw_different_masks():
    """With A = B = I and s = 1 an adapter returns dropout(x): run a 4-group stack through lax.scan as the decoder
    does and compare the masks of the groups."""
    groups, d, p = 4, 16, 0.5
    adapter = LoRA(d, d, d, scaling=1.0, axes=("embed", "mlp"), key=jax.random.key(0),
                   salt=jnp.arange(groups, dtype=jnp.int32), groups=(groups,), dropout=p)
    eye = jnp.broadcast_to(jnp.eye(d), (groups, d, d))
    adapter.lora_a.set_value(eye)
    adapter.lora_b.set_value(eye)
    graphdef, state = nnx.split(adapter)
    x = jnp.ones((64, d))

    def run(key):
        def body(carry, group_state):
            return carry, nnx.merge(graphdef, group_state)(x)

        with lora_dropout(key):
            return jax.lax.scan(body, 0, state)[1]

    np.testing.assert_array_equal(np.asarray(run(None)), np.ones((groups, 64, d)))
    out = np.asarray(jax.jit(run)(jax.random.key(7)))
    assert set(np.unique(out).tolist()) == {0.0, 1 / (1 - p)}
    masks = out != 0
    assert 0.4 < masks.mean() < 0.6
    for i in range(groups):
        for j in range(i):
            assert (masks[i] != masks[j]).mean() > 0.3, f"groups {i} and {j} share a dropout mask"


# ------------------------------------------------------------------------------------------------ errors
def test_errors():
    model = apply_lora(tiny("tiny-dense"), qwax.LoRAConfig(rank=4, alpha=8))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, qwax.LoRAConfig(rank=4, alpha=8))
    with pytest.raises(ValueError, match=r"no module of this model matches targets \['in_proj_qkvz'\]"):
        apply_lora(tiny("tiny-dense"), qwax.LoRAConfig(rank=4, alpha=8, targets=("in_proj_qkvz",)))
    with pytest.raises(ValueError, match="no routed experts"):
        apply_lora(tiny("tiny-dense"), qwax.LoRAConfig(rank=4, alpha=8, targets=ALL))
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        merge_lora(tiny("tiny-dense"))
    with pytest.raises(TypeError, match="LoRAConfig"):
        apply_lora(tiny("tiny-dense"), {"rank": 4})
    assert lora_config_of(model) == qwax.LoRAConfig(rank=4, alpha=8)


_SHARDED_SCRIPT = r"""
import os
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import qwax
from qwax.lora import apply_lora, lora_modules
from qwax.sharding import make_mesh
from qwax.sharding.init import init_sharded

cfg = qwax.get_preset("tiny-moe", num_hidden_layers=4, full_attention_interval=2)
opts = qwax.RunOptions(moe_impl="reference", gdn_impl="reference")
mesh = make_mesh("fsdp=2,tensor=2")
graphdef, params, _ = init_sharded(cfg, mesh, "fsdp_tp", options=opts)
model = nnx.merge(graphdef, params)
ids = jnp.asarray(np.arange(24, dtype=np.int32).reshape(2, 12))
forward = jax.jit(qwax.forward, static_argnums=0)
base = np.asarray(forward(*nnx.split(model), ids).logits)
apply_lora(model, qwax.LoRAConfig(rank=4, alpha=8, targets=("q_proj", "down_proj", "experts")))
def spec(x):
    dims = list(x.sharding.spec)
    while dims and dims[-1] is None:
        dims.pop()
    return dims
specs = {".".join(map(str, k[0])) + ":" + k[1]: [spec(a.lora_a.get_value()), spec(a.lora_b.get_value())]
         for k, a in lora_modules(model).items()}
after = np.asarray(forward(*nnx.split(model), ids).logits)
print("RESULT " + json.dumps({"specs": specs, "diff": float(np.abs(after - base).max())}))
"""


@pytest.mark.slow
def test_adapters_of_a_sharded_model_are_placed_like_their_base_weights(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["diff"] == 0.0
    specs = result["specs"]
    # [layer group, (experts,) in, r] and [layer group, (experts,) r, out], along the kernel's fsdp / tensor dims.
    assert specs["decoder.groups.layers.1.self_attn.q_proj:linear"] == [[None, "fsdp"], [None, None, "tensor"]]
    assert specs["decoder.groups.layers.0.mlp.shared_expert.down_proj:linear"] == [[None, "tensor"],
                                                                                   [None, None, "fsdp"]]
    assert specs["decoder.groups.layers.0.mlp:gate_up"] == [[None, None, "fsdp"], [None, None, None, "tensor"]]
