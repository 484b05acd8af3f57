"""Subprocess side of the planner's check against XLA: `python planner_worker.py JOB` prints `RESULT {json}`.

On 8 simulated CPU devices each case compiles a sharded program of a small model, the way training and the
inference engine run it, and reports `compiled.memory_analysis()` (per partition: every device runs the same
SPMD program) beside the planner's per-device figures for the same model, options, mesh and lengths:

  train  one AdamW step: params and optimizer state (donated), ids [B, L] sharded ("batch", "length"), under
         use_sharding(mesh, rules), as tests/sharding/sharding_worker.sharded_train_setup builds it;
  infer  one prefill chunk into a cache (qwax.inference.engine._prefill_chunk, without the padding mask): params,
         the cache (donated, placed by cache_logical_axes) and ids [B, chunk].

Nothing runs: the programs are lowered from jax.ShapeDtypeStructs with shardings, so no array is allocated.
Jobs: `train` and `infer` (run side by side by the test).
"""

from __future__ import annotations

import math
import sys
import time

from sharding_worker import report, setup_devices

# Meshes of the check (8 devices), without and with a context axis, and the strategy each runs.
MESHES = {
    "fsdp=8": "fsdp",
    "fsdp=2,expert=2,tensor=2": "fsdp_ep_tp",
    "fsdp=2,context=4": "fsdp",
    "data=2,context=2,fsdp=2": "fsdp",
}
# The activation check's model: dense FFN (on the CPU the MoE runs CPU-only kernels, a sorted loop or dense
# GEMMs over all experts, which the planner, planning TPU and GPU kernels, does not describe); the MoE model
# checks the parameter, optimizer and cache bytes, which do not depend on kernels.
DENSE, MOE = "tiny-dense", "tiny-moe"
MOE_MESHES = ("fsdp=2,expert=2,tensor=2", "data=2,context=2,fsdp=2")
TRAIN_BATCH, TRAIN_SEQ = 8, 256
INFER_BATCH, INFER_CHUNK, INFER_CACHE = 8, 512, 2048


def config(preset: str):
    import qwax
    # (GDN, attention) x 2 scanned groups, as the other sharding tests.
    return qwax.get_preset(preset, num_hidden_layers=4, full_attention_interval=2)


def run_options(remat: str):
    """float32, the XLA kernels, and the GDN chunk of the accelerators (the planner's default) made explicit."""
    import qwax
    return qwax.RunOptions(gdn_impl="xla", moe_impl="xla", gdn_chunk_size=64, remat=remat)


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "temp": m.temp_size_in_bytes,
            "alias": m.alias_size_in_bytes}


def abstract(tree, shardings):
    import jax
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def local_bytes(tree) -> int:
    """Per-device bytes of a tree of sharded ShapeDtypeStructs."""
    import jax
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def model_shapes(cfg, options, rules, mesh):
    import qwax
    from flax import nnx
    from qwax import sharding
    graphdef, params = nnx.eval_shape(lambda: nnx.split(qwax.QwaxForCausalLM(cfg, options, rngs=nnx.Rngs(0)),
                                                        nnx.Param))
    return graphdef, params, sharding.param_shardings(params, rules, mesh)


def train_case(preset: str, spec: str, remat: str) -> dict:
    """Compile one AdamW train step on `spec`; its memory analysis and the plan."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import qwax
    from qwax import sharding
    from qwax.sharding import planner

    cfg, options, strategy = config(preset), run_options(remat), MESHES[spec]
    mesh, rules = sharding.make_mesh(spec), sharding.get_rules(strategy)
    graphdef, params, shardings = model_shapes(cfg, options, rules, mesh)
    tx = optax.adamw(1e-3)
    opt = jax.eval_shape(tx.init, params)
    opt_shardings = sharding.follow_params(opt, params, shardings, mesh)
    ids_sharding = sharding.logical_sharding(("batch", "length"), (TRAIN_BATCH, TRAIN_SEQ), rules, mesh)

    def loss(p, ids):
        out = qwax.forward(graphdef, p, ids)
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1].astype(jnp.float32), ids[:, 1:])
        return jnp.mean(ce) + cfg.router_aux_loss_coef * out.aux_loss

    def step(p, o, ids):
        value, grads = jax.value_and_grad(loss)(p, ids)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, value

    jitted = jax.jit(step, in_shardings=(shardings, opt_shardings, ids_sharding),
                     out_shardings=(shardings, opt_shardings, NamedSharding(mesh, P())), donate_argnums=(0, 1))
    ids = jax.ShapeDtypeStruct((TRAIN_BATCH, TRAIN_SEQ), jnp.int32, sharding=ids_sharding)
    t0 = time.time()
    with sharding.use_sharding(mesh, rules):
        compiled = jitted.lower(abstract(params, shardings), abstract(opt, opt_shardings), ids).compile()
    p = planner.plan(cfg, spec, strategy, options=options, seq=TRAIN_SEQ, batch=TRAIN_BATCH, device="cpu")
    return {"xla": memory(compiled), "plan": p["per_device_bytes"], "ids": local_bytes(ids),
            "seconds": time.time() - t0}


def infer_case(preset: str, spec: str) -> dict:
    """Compile one prefill chunk into a cache on `spec`; its memory analysis and the plan."""
    import jax
    import jax.numpy as jnp
    import qwax
    from qwax import sharding
    from qwax.inference.cache import cache_logical_axes, init_cache
    from qwax.sharding import planner

    cfg, options, strategy = config(preset), run_options("none"), MESHES[spec]
    mesh, rules = sharding.make_mesh(spec), sharding.get_rules(strategy)
    graphdef, params, shardings = model_shapes(cfg, options, rules, mesh)
    cache = jax.eval_shape(lambda: init_cache(cfg, options, INFER_BATCH, INFER_CACHE))
    cache_shardings = sharding.tree_shardings(cache, cache_logical_axes(cache), rules, mesh)
    ids_sharding = sharding.logical_sharding(("batch", "length"), (INFER_BATCH, INFER_CHUNK), rules, mesh)

    def prefill(p, c, ids):
        out = qwax.forward(graphdef, p, ids, cache=c)
        return out.logits[:, -1].astype(jnp.float32), out.cache

    jitted = jax.jit(prefill, in_shardings=(shardings, cache_shardings, ids_sharding),
                     out_shardings=(None, cache_shardings), donate_argnums=(1,))
    ids = jax.ShapeDtypeStruct((INFER_BATCH, INFER_CHUNK), jnp.int32, sharding=ids_sharding)
    t0 = time.time()
    with sharding.use_sharding(mesh, rules):
        compiled = jitted.lower(abstract(params, shardings), abstract(cache, cache_shardings), ids).compile()
    p = planner.plan(cfg, spec, strategy, options=options, seq=INFER_CHUNK, batch=INFER_BATCH, mode="infer",
                     cache_len=INFER_CACHE, device="cpu")
    return {"xla": memory(compiled), "plan": p["per_device_bytes"], "ids": local_bytes(ids),
            "seconds": time.time() - t0}


def job_train() -> None:
    setup_devices(8)
    result = {f"train/{spec}/{remat}": train_case(DENSE, spec, remat) for spec in MESHES for remat in ("none", "full")}
    result.update({f"moe-train/{spec}/full": train_case(MOE, spec, "full") for spec in MOE_MESHES})
    report(result)


def job_infer() -> None:
    setup_devices(8)
    result = {f"infer/{spec}": infer_case(DENSE, spec) for spec in MESHES}
    result.update({f"moe-infer/{spec}": infer_case(MOE, spec) for spec in MOE_MESHES})
    report(result)


if __name__ == "__main__":
    globals()["job_" + sys.argv[1]]()
