"""Rule tables: logical names -> PartitionSpecs, and the sharded train step of every strategy on 8 devices."""

import logging

import jax
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import qwax
from qwax.sharding import STRATEGIES, abstract_mesh, follow_params, get_rules, param_shardings, partition_spec
from qwax.sharding import rules as rules_module

MESH = abstract_mesh("data=2,fsdp=2,expert=2,tensor=2")


def test_every_parameter_name_of_every_model_has_a_rule_in_every_strategy():
    for preset in ("tiny-moe", "tiny-dense", "tiny-next"):
        cfg = qwax.get_preset(preset, mtp_num_hidden_layers=1)
        _, params = nnx.eval_shape(lambda cfg=cfg: nnx.split(qwax.QwaxForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param))
        for strategy in STRATEGIES:
            specs = param_shardings(params, get_rules(strategy), MESH)
            assert len(jax.tree.leaves(specs)) == len(jax.tree.leaves(params))


def test_scanned_parameters_get_an_unsharded_leading_layers_dim():
    rules = get_rules("fsdp_ep_tp")
    assert partition_spec(("experts", "embed", "expert_mlp"), (6, 8, 64, 64), rules, MESH) == \
        P(None, "expert", "fsdp", "tensor")
    assert partition_spec(("experts", "embed", "expert_mlp"), (8, 64, 64), rules, MESH) == P("expert", "fsdp", "tensor")


def test_a_mesh_axis_shards_one_dim_only_and_only_when_it_divides():
    rules = get_rules("fsdp_ep_tp")
    # embed -> (fsdp, expert), but expert is taken by the experts dim first.
    assert partition_spec(("embed", "mlp"), (64, 32), rules, MESH) == P(("fsdp", "expert"), "tensor")
    # 3 heads do not split over tensor=2: replicated; 6 embed rows: fsdp=2 divides, fsdp x expert = 4 does not.
    assert partition_spec(("embed", "kv_heads"), (6, 3), rules, MESH) == P("fsdp")


def test_axes_of_size_one_are_dropped():
    mesh = abstract_mesh("fsdp=8")
    assert partition_spec(("embed", "mlp"), (64, 32), get_rules("fsdp_ep_tp"), mesh) == P("fsdp")


def test_a_dropped_mesh_axis_is_logged_once_per_case(caplog, monkeypatch):
    monkeypatch.setattr(rules_module, "_REPORTED_DROPS", set())  # other tests of this process may have logged
    rules = get_rules("fsdp_ep_tp")
    mesh = abstract_mesh("fsdp=2,tensor=4")
    with caplog.at_level(logging.WARNING, logger="qwax.sharding"):
        for _ in range(3):  # e.g. every layer's k_proj: one message
            assert partition_spec(("embed", "kv_heads"), (64, 2), rules, mesh) == P("fsdp")
        assert partition_spec(("embed", "kv_heads"), (64, 8), rules, mesh) == P("fsdp", "tensor")  # divides
        assert partition_spec(("embed", "kv_heads"), (64, 6), rules, mesh) == P("fsdp")  # another size
        # fsdp_ep_tp's embed is fsdp + expert: 6 rows keep fsdp=2 and drop expert=2.
        assert partition_spec(("embed",), (6,), rules, MESH) == P("fsdp")
    records = [r for r in caplog.records if r.name == "qwax.sharding"]
    assert [r.levelno for r in records] == [logging.WARNING] * 3
    messages = [r.getMessage() for r in records]
    assert "'kv_heads' of size 2" in messages[0] and "mesh axis 'tensor' (size 4)" in messages[0]
    assert "not sharded" in messages[0]
    assert "'kv_heads' of size 6" in messages[1]
    assert "'embed' of size 6" in messages[2] and "mesh axis 'expert' (size 2)" in messages[2]
    assert "sharded over fsdp only" in messages[2]
    # An axis taken by an earlier dim, or of size 1, is not a divisibility problem: nothing is logged.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qwax.sharding"):
        partition_spec(("experts", "embed"), (8, 64), rules, MESH)
        partition_spec(("embed", "kv_heads"), (64, 3), rules, abstract_mesh("fsdp=8"))
    assert not [r for r in caplog.records if r.name == "qwax.sharding"]


def test_overrides_replace_entries_and_unknown_axes_are_rejected():
    rules = get_rules("fsdp", "vocab=tensor,embed=fsdp+expert,norm=none")
    assert rules["vocab"] == ("tensor",) and rules["embed"] == ("fsdp", "expert") and rules["norm"] == ()
    assert get_rules("fsdp", {"vocab": None})["vocab"] == ()
    with pytest.raises(ValueError, match="pipeline"):
        get_rules("fsdp", "vocab=pipeline")
    with pytest.raises(KeyError, match="fsdp_zero"):
        get_rules("fsdp_zero")
    with pytest.raises(KeyError, match="mystery"):
        partition_spec(("mystery",), (4,), get_rules("fsdp"), MESH)


def test_optimizer_state_follows_the_parameter_shardings():
    cfg = qwax.get_preset("tiny-moe")
    _, params = nnx.eval_shape(lambda: nnx.split(qwax.QwaxForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    shardings = param_shardings(params, get_rules("fsdp_ep"), MESH)
    opt = jax.eval_shape(optax.adamw(1e-3).init, params)
    opt_shardings = follow_params(opt, params, shardings, MESH)
    adam = opt_shardings[0]
    for moments in (adam.mu, adam.nu):
        assert jax.tree.leaves(moments) == jax.tree.leaves(shardings)
    assert adam.count.spec == P()


# Per-device shard shapes the rules must give on the 8-device meshes of sharding_worker.STRATEGY_MESHES
# for the test model (tiny-moe, 4 layers scanned as 2 groups of (GDN, attention)).
G = "decoder/groups/layers"
NAMES = ["embed_tokens", f"{G}/0/linear_attn/in_proj_qkv/kernel", f"{G}/0/linear_attn/in_proj_b/kernel",
         f"{G}/1/self_attn/q_proj/kernel", f"{G}/1/self_attn/k_proj/kernel", f"{G}/1/self_attn/o_proj/kernel",
         f"{G}/0/mlp/experts_gate_up", f"{G}/0/mlp/experts_down", f"{G}/0/mlp/gate/kernel", "lm_head/kernel",
         "norm/weight"]
GLOBAL = [(256, 64), (2, 64, 128), (2, 64, 4), (2, 64, 128), (2, 64, 32), (2, 64, 64), (2, 8, 64, 64),
          (2, 8, 32, 64), (2, 64, 8), (64, 256), (64,)]
EXPECTED = {
    # data=2,fsdp=4: embed over fsdp.
    "fsdp": [(256, 16), (2, 16, 128), (2, 16, 4), (2, 16, 128), (2, 16, 32), (2, 64, 16), (2, 8, 16, 64),
             (2, 8, 32, 16), (2, 16, 8), (16, 256), (64,)],
    # fsdp=4,tensor=2: + vocab, heads, widths over tensor.
    "fsdp_tp": [(128, 16), (2, 16, 64), (2, 16, 2), (2, 16, 64), (2, 16, 16), (2, 32, 16), (2, 8, 16, 32),
                (2, 8, 16, 16), (2, 16, 8), (16, 128), (64,)],
    # fsdp=2,expert=4: experts over expert; dense weights' embed over fsdp x expert.
    "fsdp_ep": [(256, 8), (2, 8, 128), (2, 8, 4), (2, 8, 128), (2, 8, 32), (2, 64, 8), (2, 2, 32, 64),
                (2, 2, 32, 32), (2, 8, 8), (8, 256), (64,)],
    # fsdp=2,expert=2,tensor=2: both.
    "fsdp_ep_tp": [(128, 16), (2, 16, 64), (2, 16, 2), (2, 16, 64), (2, 16, 16), (2, 32, 16), (2, 4, 32, 32),
                   (2, 4, 16, 32), (2, 16, 8), (16, 128), (64,)],
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", sorted(EXPECTED))
def test_sharded_train_step_equals_single_device_step(eight_devices, strategy):
    result = eight_devices[strategy]
    assert abs(result["loss"] - eight_devices["ref_loss"]) <= 1e-5
    assert result["grad_max_abs_err"] <= 1e-5, (result["grad_max_abs_err"], eight_devices["ref_grad_max_abs"])


@pytest.mark.multiprocess
def test_init_sharded_gives_the_single_device_values_in_the_rules_shardings(eight_devices):
    assert eight_devices["init_sharded"]["max_abs_err"] <= 1e-6
    assert eight_devices["init_sharded"]["specs_equal"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", sorted(EXPECTED))
def test_per_device_shard_shapes_are_those_of_the_rules(eight_devices, strategy):
    shards = eight_devices[strategy]["shards"]
    for name, global_shape, local_shape in zip(NAMES, GLOBAL, EXPECTED[strategy]):
        assert tuple(shards[name]["global"]) == global_shape, name
        assert [tuple(s) for s in shards[name]["device"]] == [local_shape], (name, shards[name]["spec"])
    # Gradients come back with the parameters' shardings.
    for name, spec in eight_devices[strategy]["grad_specs"].items():
        assert spec == shards[name]["spec"], name


def test_inference_cache_is_sharded_over_batch_and_heads():
    from qwax.inference.cache import cache_logical_axes, init_cache
    from qwax.sharding import tree_shardings

    cfg = qwax.get_preset("tiny-moe", num_hidden_layers=8)
    cache = jax.eval_shape(lambda: init_cache(cfg, qwax.RunOptions(), 4, 32))
    mesh = abstract_mesh("data=2,fsdp=2,tensor=2")
    shardings = tree_shardings(cache, cache_logical_axes(cache), "fsdp_tp", mesh)
    for layer, layer_shardings in zip(cache.layers, shardings.layers):
        # KV [.., B, Nkv, len, D], GDN conv [.., B, K, conv_dim], recurrent [.., B, Hv, dk, dv].
        batch_dims = (4, 4) if hasattr(layer, "k") else (3, 4)
        for array, sharding, from_end in zip(layer, layer_shardings, batch_dims):
            local = sharding.shard_shape(array.shape)
            assert local[array.ndim - from_end] == array.shape[array.ndim - from_end] // 4  # batch: data x fsdp
    (kv_array, kv), = [(c.k, s.k) for c, s in zip(cache.layers, shardings.layers) if hasattr(c, "k")][:1]
    (rec_array, rec), = [(c.recurrent, s.recurrent) for c, s in zip(cache.layers, shardings.layers)
                         if hasattr(c, "recurrent")][:1]
    assert kv.shard_shape(kv_array.shape)[-3] == kv_array.shape[-3] // 2  # KV heads over tensor
    assert rec.shard_shape(rec_array.shape)[-3] == rec_array.shape[-3] // 2  # GDN heads over tensor
