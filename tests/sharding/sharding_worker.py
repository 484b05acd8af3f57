"""Subprocess side of the sharding tests: `python sharding_worker.py JOB [ARGS]` prints `RESULT {json}`.

Each job sets up its simulated devices before importing jax (the pytest process itself has one device) and
reports numbers; the tests in this directory assert on them. Jobs are grouped so that the whole directory
starts few processes and compiles each program once.
"""

from __future__ import annotations

import json
import os
import sys
import time


def setup_devices(n: int) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    # Cheaper LLVM code generation halves the compile time, which dominates these jobs.
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={n} --xla_backend_optimization_level=0 "
                               "--xla_llvm_disable_expensive_passes=true")


def report(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------ model, batch, loss, step
def tiny_config(**overrides):
    import qwax
    # (GDN, attention) x 2 scanned groups: stacked parameters with a leading layer axis, every layer kind, and
    # the smallest program that has them (compile time dominates these tests).
    kw = dict(num_hidden_layers=4, full_attention_interval=2)
    kw.update(overrides)
    return qwax.get_preset("tiny-moe", **kw)


def tiny_options(**overrides):
    """Run options of the test model: the reference kernels (plain jnp, cheap to compile on the CPU)."""
    import qwax
    return qwax.RunOptions(**{"moe_impl": "reference", "gdn_impl": "reference", **overrides})


def batch_ids(cfg, batch: int = 8, length: int = 16, seed: int = 0):
    import numpy as np
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length), dtype=np.int32)


def loss_fn(graphdef, cfg):
    """Token cross-entropy of next-token prediction plus the weighted MoE auxiliary loss."""
    import jax.numpy as jnp
    import optax
    import qwax

    def loss(params, ids):
        out = qwax.forward(graphdef, params, ids)
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1].astype(jnp.float32), ids[:, 1:])
        return jnp.mean(ce) + cfg.router_aux_loss_coef * out.aux_loss

    return loss


def sharded_train_setup(cfg, options, spec: str, strategy: str, seed: int = 0):
    """Mesh, rules, sharded params and AdamW state, and a jitted train step with explicit in/out shardings."""
    import jax
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from qwax import sharding
    from qwax.sharding.init import init_sharded

    mesh = sharding.make_mesh(spec)
    rules = sharding.get_rules(strategy)
    graphdef, params, shardings = init_sharded(cfg, mesh, rules, seed, options)
    tx = optax.adamw(1e-2)
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_shardings = sharding.follow_params(opt_abstract, params, shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    loss = loss_fn(graphdef, cfg)

    def step(params, opt_state, ids):
        value, grads = jax.value_and_grad(loss)(params, ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    ids_sharding = sharding.logical_sharding(("batch", "length"), (8, 16), rules, mesh)
    replicated = NamedSharding(mesh, P())
    step = jax.jit(step, in_shardings=(shardings, opt_shardings, ids_sharding),
                   out_shardings=(shardings, opt_shardings, replicated), donate_argnums=(0, 1))
    return dict(mesh=mesh, rules=rules, graphdef=graphdef, params=params, shardings=shardings,
                opt_state=opt_state, opt_shardings=opt_shardings, step=step, ids_sharding=ids_sharding)


def resident_bytes(tree, device) -> int:
    """Bytes of the shards of every array in `tree` that live on `device`."""
    import jax
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards
               if s.device == device)


# ------------------------------------------------------------------ jobs
STRATEGY_MESHES = {
    "fsdp": "data=2,fsdp=4",
    "fsdp_tp": "fsdp=4,tensor=2",
    "fsdp_ep": "fsdp=2,expert=4",
    "fsdp_ep_tp": "fsdp=2,expert=2,tensor=2",
}


def strategies(result: dict) -> None:
    """Per strategy: loss and gradient differences to one device, shard shapes of the params."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    import qwax
    from qwax import sharding
    from qwax.sharding.init import init_sharded

    cfg, options = tiny_config(), tiny_options()
    ids = batch_ids(cfg)
    graphdef, params = nnx.split(qwax.QwaxForCausalLM(cfg, options, rngs=nnx.Rngs(0)), nnx.Param)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn(graphdef, cfg)))(
        *jax.device_put((params, ids), jax.devices()[0]))
    ref_grads = {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(ref_grads)}
    ref_params = {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(params)}
    result["ref_loss"] = float(ref_loss)
    result["ref_grad_max_abs"] = max(float(np.max(np.abs(g))) for g in ref_grads.values())
    for strategy, spec in STRATEGY_MESHES.items():
        t0 = time.time()
        mesh = sharding.make_mesh(spec)
        rules = sharding.get_rules(strategy)
        shardings = sharding.param_shardings(params, rules, mesh)
        sharded = jax.device_put(params, shardings)
        result[f"params/{strategy}"] = sharded
        ids_sharding = sharding.logical_sharding(("batch", "length"), ids.shape, rules, mesh)
        step = jax.jit(jax.value_and_grad(loss_fn(graphdef, cfg)), in_shardings=(shardings, ids_sharding),
                       out_shardings=(NamedSharding(mesh, P()), shardings))
        with sharding.use_sharding(mesh, rules):
            loss, grads = step(sharded, jax.device_put(ids, ids_sharding))
        shards = {}
        for path, v in nnx.to_flat_state(sharded):
            arr = v.get_value()
            shards["/".join(map(str, path))] = {
                "global": list(arr.shape), "device": sorted({tuple(s.data.shape) for s in arr.addressable_shards}),
                "spec": str(arr.sharding.spec)}
        grad_shards = {"/".join(map(str, path)): str(v.get_value().sharding.spec)
                       for path, v in nnx.to_flat_state(grads)}
        result[strategy] = {
            "loss": float(loss),
            "grad_max_abs_err": max(float(np.max(np.abs(np.asarray(v.get_value()) - ref_grads[path])))
                                    for path, v in nnx.to_flat_state(grads)),
            "shards": shards, "grad_specs": grad_shards, "seconds": time.time() - t0}
    # Initialising straight into the shards gives the single-device values.
    mesh = sharding.make_mesh(STRATEGY_MESHES["fsdp_ep_tp"])
    _, sharded, shardings = init_sharded(cfg, mesh, "fsdp_ep_tp", 0, options)
    result["init_sharded"] = {
        "max_abs_err": max(float(np.max(np.abs(np.asarray(v.get_value()) - ref_params[path])))
                           for path, v in nnx.to_flat_state(sharded)),
        "specs_equal": all(a.sharding == b for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(shardings)))}


def resident(result: dict) -> None:
    """Bytes of params and AdamW state actually on device 0 vs the planner.

    float32: the params of `strategies` (fsdp, fsdp_ep_tp) and AdamW moments. bfloat16 (fsdp_ep_tp): the optimizer
    the planner assumes, a float32 master copy of the params and AdamW moments of that copy.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    import qwax
    from qwax import sharding
    from qwax.sharding import planner

    device = jax.devices()[0]
    tx = optax.adamw(1e-3)
    for strategy, param_dtype in (("fsdp", "float32"), ("fsdp_ep_tp", "float32"), ("fsdp_ep_tp", "bfloat16")):
        spec = STRATEGY_MESHES[strategy]
        mesh = sharding.make_mesh(spec)
        cfg, options = tiny_config(), tiny_options(param_dtype=param_dtype)
        if param_dtype == "float32":
            params = result.pop(f"params/{strategy}")
            master = params
        else:
            _, host = nnx.split(qwax.QwaxForCausalLM(cfg, options, rngs=nnx.Rngs(0)), nnx.Param)
            params = jax.device_put(host, sharding.param_shardings(host, sharding.get_rules(strategy), mesh))
            master = jax.tree.map(lambda a: a.astype(jnp.float32), params)  # elementwise: keeps the sharding
        shardings = jax.tree.map(lambda a: a.sharding, master)
        opt_shardings = sharding.follow_params(jax.eval_shape(tx.init, master), master, shardings, mesh)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(master)
        real_opt = resident_bytes(opt_state, device) + (resident_bytes(master, device) if master is not params
                                                         else 0)
        p = planner.plan(cfg, spec, strategy, options=options, seq=16, batch=8, device="cpu")
        result[f"resident/{strategy}/{param_dtype}"] = {
            "params": resident_bytes(params, device), "optimizer": real_opt,
            "plan_params": p["per_device_bytes"]["params"], "plan_optimizer": p["per_device_bytes"]["optimizer"]}
    for key in [k for k in result if k.startswith("params/")]:
        del result[key]


def expert_parallel_op(result: dict) -> None:
    """expert_parallel.routed_experts vs the unsharded op: forward and gradients, on several layouts."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from qwax.pallas_kernels.moe import routed_experts
    from qwax.sharding import expert_parallel, make_mesh

    t, h, i, e, k = 64, 16, 8, 8, 2
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(keys[0], (t, h))
    w_gate_up = 0.3 * jax.random.normal(keys[1], (e, h, 2 * i))
    w_down = 0.3 * jax.random.normal(keys[2], (e, i, h))
    weights, idx = jax.lax.top_k(jax.nn.softmax(jax.random.normal(keys[3], (t, e))), k)
    idx = idx.astype(jnp.int32)

    def value_and_grad(fn):
        def loss(*a):
            y = fn(*a)
            return jnp.sum(jnp.sin(y)), y
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)

    cases = [("data=2,expert=4", t, "xla"), ("fsdp=2,expert=2,tensor=2", t, "reference"),
             ("expert=8", 40, "reference")]  # 40 % 8 != 0: no all_to_all, local experts + psum
    for spec, n, impl in cases:
        mesh = make_mesh(spec)
        args = (x[:n], weights[:n], w_gate_up, w_down)

        def sharded(x, w, wgu, wd, n=n, mesh=mesh, impl=impl):
            return expert_parallel.routed_experts(x, idx[:n], w, wgu, wd, mesh=mesh, impl=impl)

        def unsharded(x, w, wgu, wd, n=n):
            return routed_experts(x, idx[:n], w, wgu, wd, impl="reference")

        (_, y), g = jax.jit(value_and_grad(sharded))(*args)
        (_, y_ref), g_ref = value_and_grad(unsharded)(*args)
        result[f"ep/{spec}/{impl}"] = {
            "forward_err": float(jnp.max(jnp.abs(y - y_ref))), "forward_max": float(jnp.max(jnp.abs(y_ref))),
            "grad_err": [float(jnp.max(jnp.abs(a - b))) for a, b in zip(g, g_ref)],
            "grad_max": [float(jnp.max(jnp.abs(b))) for b in g_ref]}
    # A capacity factor drops slots beyond capacity: the output must differ only where tokens were dropped.
    mesh = make_mesh("expert=8")
    skewed = jnp.zeros_like(idx).at[:, 1].set(1)  # every token to experts 0 and 1 (both on shard 0)
    y_cap = jax.jit(lambda *a: expert_parallel.routed_experts(*a, mesh=mesh, capacity_factor=1.0,
                                                              impl="reference"))(x, skewed, weights, w_gate_up, w_down)
    y_all = routed_experts(x, skewed, weights, w_gate_up, w_down, impl="reference")
    kept = np.asarray(jnp.all(jnp.abs(y_cap - y_all) < 1e-5, axis=-1))
    result["ep/capacity"] = {"kept_tokens": int(kept.sum()), "tokens": t}


def job_eight_devices() -> None:
    setup_devices(8)
    result: dict = {}
    for part in (expert_parallel_op, strategies, resident):
        t0 = time.time()
        part(result)
        result[f"seconds/{part.__name__}"] = time.time() - t0
    report(result)


# A hidden size no other activation of the test model has ([B, L, 48] is then always a hidden state), and a
# batch and length that differ from every head or width count.
ACT_HIDDEN, ACT_BATCH, ACT_LENGTH = 48, 4, 8
ACT_MESH, ACT_STRATEGY = "fsdp=2,tensor=4", "fsdp_tp"


def sharding_constraints(module_text: str) -> list[dict]:
    """Every `sdy.sharding_constraint` of a lowered (Shardy) module: its per-dim mesh axes and tensor type,
    e.g. {"sharding": '[{"fsdp"}, {}, {}]', "type": "4x8x48xf32"}."""
    import re
    pattern = re.compile(r"sdy\.sharding_constraint %\S+ <@\w+, (\[.*?\])> : tensor<([^>]*)>")
    return [{"sharding": m.group(1), "type": m.group(2)} for m in pattern.finditer(module_text)]


def job_activation_shardings() -> None:
    """The activation constraints of the forward under use_sharding(mesh, "fsdp_tp") on fsdp=2 x tensor=4: the
    sharding constraints in the lowered module (scanned and unrolled layers) and the compiled logits sharding."""
    setup_devices(8)
    import jax
    import qwax
    from qwax import sharding
    from qwax.sharding.init import init_sharded

    jax.config.update("jax_use_shardy_partitioner", True)  # constraints print with mesh axis names
    cfg = tiny_config(hidden_size=ACT_HIDDEN)
    ids = batch_ids(cfg, ACT_BATCH, ACT_LENGTH)
    mesh = sharding.make_mesh(ACT_MESH)
    rules = sharding.get_rules(ACT_STRATEGY)
    ids_sharding = sharding.logical_sharding(("batch", "length"), ids.shape, rules, mesh)
    result: dict = {"layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size}
    for scan in (True, False):
        options = tiny_options(scan_layers=scan)
        graphdef, params, shardings = init_sharded(cfg, mesh, rules, 0, options)
        forward = jax.jit(lambda p, x, g=graphdef: qwax.forward(g, p, x).logits,
                          in_shardings=(shardings, ids_sharding))
        with sharding.use_sharding(mesh, rules):
            lowered = forward.lower(params, jax.device_put(ids, ids_sharding))
            entry = {"scanned": options.uses_scan(cfg), "constraints": sharding_constraints(lowered.as_text())}
            if scan:
                spec = lowered.compile().output_shardings.spec
                entry["logits_spec"] = [list(a) if isinstance(a, tuple) else a for a in spec]
        result["scan" if scan else "unrolled"] = entry
    report(result)


MULTIHOST_SPEC, MULTIHOST_STRATEGY = "fsdp=4,expert=2", "fsdp_ep"


def two_steps(cfg, options):
    """Losses of two train steps (the second after one AdamW update) on the multihost mesh, and the setup."""
    from qwax.sharding import multihost

    setup = sharded_train_setup(cfg, options, MULTIHOST_SPEC, MULTIHOST_STRATEGY)
    ids = batch_ids(cfg)
    rows = multihost.process_rows(setup["ids_sharding"], ids.shape[0], ids.shape[1:])
    batch = multihost.global_array(ids[rows], setup["ids_sharding"], ids.shape)
    params, opt_state = setup["params"], setup["opt_state"]
    losses = []
    from qwax.sharding import use_sharding
    with use_sharding(setup["mesh"], setup["rules"]):
        for _ in range(2):
            params, opt_state, loss = setup["step"](params, opt_state, batch)
            losses.append(float(loss))
    return losses, params, setup, rows


def job_multihost(process_id: str, num_processes: str, port: str, checkpoint_dir: str) -> None:
    """One of two processes x 4 devices: train steps, then save and restore the params with orbax."""
    setup_devices(4)
    import jax
    import numpy as np
    from flax import nnx
    from qwax.sharding import multihost

    multihost.initialize(f"127.0.0.1:{port}", int(num_processes), int(process_id))
    losses, params, setup, rows = two_steps(tiny_config(), tiny_options())
    multihost.save_checkpoint(checkpoint_dir, params)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    restored = multihost.restore_checkpoint(checkpoint_dir, abstract, setup["shardings"])
    same = all(
        np.array_equal(np.asarray(a.data), np.asarray(b.data))
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(restored))
        for a, b in zip(x.addressable_shards, y.addressable_shards))
    same_specs = all(x.sharding.spec == y.sharding.spec for x, y in zip(jax.tree.leaves(params),
                                                                        jax.tree.leaves(restored)))
    report({"process_index": jax.process_index(), "process_count": jax.process_count(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count(), "losses": losses,
            "rows": rows.tolist(), "restored_equal": bool(same), "restored_specs_equal": bool(same_specs),
            "restored_type": type(restored).__name__ == type(params).__name__ and isinstance(restored, nnx.State)})


def job_single_process_reference() -> None:
    """The multihost job's train steps in one process with 8 devices."""
    setup_devices(8)
    import jax
    losses, _, _, rows = two_steps(tiny_config(), tiny_options())
    report({"losses": losses, "devices": jax.device_count(), "rows": rows.tolist()})


if __name__ == "__main__":
    globals()["job_" + sys.argv[1]](*sys.argv[2:])
