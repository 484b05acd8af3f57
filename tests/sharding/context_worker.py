"""Subprocess side of the context-parallel tests: `python context_worker.py JOB [ARGS]` prints `RESULT {json}`.

Every job compares a run with the sequence split over the `context` mesh axis against the same computation on
one device (whole sequences, no mesh), and reports the largest differences; tests/sharding/
test_context_parallel.py asserts on them.
"""

from __future__ import annotations

import sys

from sharding_worker import report, setup_devices

TYPES = ("tiny-dense", "tiny-moe", "tiny-next")
# Batch 4 x 32 tokens; with context=4 a shard holds 8 tokens. Documents: boundaries inside a shard (13, 21) and
# exactly at shard boundaries (8, 24); row 1 is one document; row 3 changes document at every boundary.
LENGTH = 32


def segment_ids():
    import numpy as np
    seg = np.zeros((4, LENGTH), np.int32)
    seg[0, 8:] = 1
    seg[0, 13:] = 2
    seg[0, 24:] = 3
    seg[2, 21:] = 1
    for j in range(1, 4):
        seg[3, 8 * j:] = j
    return seg


def model_setup(name: str, impl: str):
    """A tiny model of preset `name` ((GDN, attention) x 2 groups), its params as numpy, and token ids [4, 32]."""
    import jax
    import numpy as np
    import qwax
    from flax import nnx
    cfg = qwax.get_preset(name, num_hidden_layers=4, full_attention_interval=2)
    options = qwax.RunOptions(gdn_impl=impl, gdn_chunk_size=4, moe_impl="reference")
    graphdef, params = nnx.split(qwax.QwaxForCausalLM(cfg, options, rngs=nnx.Rngs(0)))
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (4, LENGTH), dtype=np.int32)
    return cfg, graphdef, jax.tree.map(np.asarray, params), ids


def loss_and_logits(graphdef, cfg):
    import jax.numpy as jnp
    import optax
    import qwax

    def loss(params, ids, seg):
        out = qwax.forward(graphdef, params, ids, segment_ids=seg)
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1].astype(jnp.float32), ids[:, 1:])
        same = (seg[:, 1:] == seg[:, :-1]).astype(jnp.float32)  # no target across a document boundary
        return jnp.sum(ce * same) / jnp.sum(same) + cfg.router_aux_loss_coef * out.aux_loss, out.logits

    return loss


def compare_grads(got, want) -> float:
    """Largest per-parameter relative difference max|got - want| / max|want|."""
    import jax
    import numpy as np
    worst = 0.0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = np.max(np.abs(b))
        if scale > 0:
            worst = max(worst, float(np.max(np.abs(a - b)) / scale))
    return worst


def train_case(name: str, spec: str, strategy: str, impl: str, devices=None, reference=None) -> dict:
    """Logits, loss and all gradients of a packed batch on `spec` vs one device."""
    import jax
    import numpy as np
    from qwax import sharding

    cfg, graphdef, params, ids = model_setup(name, impl)
    seg = segment_ids()
    fn = jax.value_and_grad(loss_and_logits(graphdef, cfg), has_aux=True)
    if reference is None:
        one = jax.local_devices()[0]
        (ref_loss, ref_logits), ref_grads = jax.jit(fn)(*jax.device_put((params, ids, seg), one))
    else:
        ref_loss, ref_logits, ref_grads = reference
    mesh = sharding.make_mesh(spec, devices)
    rules = sharding.get_rules(strategy)
    param_sh = sharding.param_shardings(params, rules, mesh)
    tokens = sharding.logical_sharding(("batch", "length"), ids.shape, rules, mesh)
    put = lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i])  # noqa: E731 (every process has x)
    params_d = jax.tree.map(put, params, param_sh)
    with sharding.use_sharding(mesh, rules):
        (loss, logits), grads = jax.jit(fn)(params_d, put(ids, tokens), put(seg, tokens))
        logits_spec = str(logits.sharding.spec)
    gather = lambda x: np.asarray(jax.experimental.multihost_utils.process_allgather(x, tiled=True))  # noqa: E731
    logits, grads = gather(logits), jax.tree.map(gather, grads)
    return {"logits": float(np.max(np.abs(logits - np.asarray(ref_logits)))),
            "loss": abs(float(loss) - float(ref_loss)), "grads": compare_grads(grads, ref_grads),
            "logits_spec": logits_spec, "loss_value": float(ref_loss)}


def prefill_case(name: str, spec: str, strategy: str) -> dict:
    """A prefill of 32 tokens (left-padded rows) into a cache: the cache and the next-token logits vs one device."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import qwax
    from qwax import sharding
    from qwax.inference.cache import cache_logical_axes, init_cache

    cfg, graphdef, params, ids = model_setup(name, "xla")
    mask = np.ones(ids.shape, np.int32)
    mask[1, :5] = 0
    mask[2, :12] = 0

    def prefill(params, ids, mask, cache):
        out = qwax.forward(graphdef, params, ids, attention_mask=mask, cache=cache)
        return out.logits[:, -1], out.cache

    opts = qwax.RunOptions(gdn_impl="xla", gdn_chunk_size=4, moe_impl="reference")
    cache = init_cache(cfg, opts, ids.shape[0], 64)
    ref_logits, ref_cache = jax.jit(prefill)(params, ids, mask, cache)
    mesh = sharding.make_mesh(spec)
    rules = sharding.get_rules(strategy)
    cache_sh = sharding.tree_shardings(cache, cache_logical_axes(cache), rules, mesh)
    tokens = sharding.logical_sharding(("batch", "length"), ids.shape, rules, mesh)
    params_d = jax.device_put(params, sharding.param_shardings(params, rules, mesh))
    with sharding.use_sharding(mesh, rules):
        logits, new_cache = jax.jit(prefill)(params_d, jax.device_put(ids, tokens), jax.device_put(mask, tokens),
                                             jax.device_put(cache, cache_sh))
    diffs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
             for a, b in zip(jax.tree.leaves(new_cache), jax.tree.leaves(ref_cache))]
    # The stacked KV caches: k [groups, B, Nkv, D, 64 slots] and v [groups, B, Nkv, 64 slots, D].
    kv_spec = [str(x.sharding.spec) for x in jax.tree.leaves(new_cache) if x.ndim == 5 and 64 in x.shape[-2:]]
    return {"logits": float(jnp.max(jnp.abs(logits - ref_logits))), "cache": max(diffs), "kv_specs": kv_spec}


def generate_case(name: str, spec: str) -> dict:
    """Greedy generation through qwax.generate (chunked prefill, then decode) on `spec` vs no mesh."""
    import numpy as np
    import qwax
    from flax import nnx
    from qwax import sharding

    cfg, graphdef, params, ids = model_setup(name, "xla")
    model = nnx.merge(graphdef, params)
    mask = np.ones(ids.shape, np.int32)
    mask[1, :7] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, prefill_chunk_size=16, eos_token_id=[])
    want = qwax.generate(model, ids, **kwargs)
    got = qwax.generate(model, ids, mesh=sharding.make_mesh(spec), **kwargs)
    return {"equal": bool(np.array_equal(got, want)), "shape": list(want.shape)}


def op_cases(result: dict) -> None:
    """The three context-parallel ops against the single-device ops: outputs and input gradients, with an
    initial state and conv history (prefill continuation) and packed documents."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from qwax import sharding
    from qwax.pallas_kernels.attention import attention as attention_op
    from qwax.pallas_kernels.causal_conv import causal_depthwise_conv as conv_op
    from qwax.pallas_kernels.gated_delta_rule import gated_delta_rule as gdr_op
    from qwax.layers.attention import attention_mask
    from qwax.sharding import context_parallel as cp

    rng = np.random.default_rng(0)
    b, l, hk, hv, dk, dv = 2, 32, 2, 4, 8, 8
    seg = segment_ids()[[0, 3]]
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, k = (unit(rng.normal(size=(b, l, hk, dk))).astype(np.float32) for _ in range(2))
    v = rng.normal(size=(b, l, hv, dv)).astype(np.float32)
    g = -rng.uniform(0.01, 0.5, (b, l, hv)).astype(np.float32)
    beta = rng.uniform(0.1, 0.9, (b, l, hv)).astype(np.float32)
    s0 = rng.normal(size=(b, hv, dk, dv)).astype(np.float32)
    x = rng.normal(size=(b, l, 12)).astype(np.float32)
    kernel = rng.normal(size=(12, 4)).astype(np.float32)
    hist = rng.normal(size=(b, 3, 12)).astype(np.float32)
    qa = rng.normal(size=(b, l, 4, 8)).astype(np.float32)
    ka, va = (rng.normal(size=(b, l, 2, 8)).astype(np.float32) for _ in range(2))
    valid = np.ones((b, l), bool)
    valid[1, :3] = False
    pos = np.broadcast_to(np.arange(l), (b, l))

    def gdr(op, seg_ids):
        def f(q, k, v, g, beta, s0):
            o, s = op(q, k, v, g, beta, initial_state=s0, segment_ids=seg_ids, chunk_size=4, impl="xla")
            return jnp.sum(o * np.cos(np.arange(dv))) + jnp.sum(s * 0.3), (o, s)
        return f

    def conv(op, seg_ids):
        def f(x, kernel, hist):
            y = op(x, kernel, hist, seg_ids)
            return jnp.sum(y * np.sin(np.arange(12))), y
        return f

    def attn(seg_ids, ring):
        mask = attention_mask(jnp.asarray(valid), jnp.asarray(pos), jnp.asarray(pos), seg_ids, seg_ids)

        def f(q, k, v):
            o = (cp.attention(q, k, v, mask, kv_valid=jnp.asarray(valid), segment_ids=seg_ids) if ring
                 else attention_op(q, k, v, mask))
            o = jnp.where(valid[:, :, None, None], o, 0)  # padding queries mean nothing
            return jnp.sum(o * np.cos(np.arange(8))), o
        return f

    cases = {"gdr": (gdr(gdr_op, None), gdr(cp.gated_delta_rule, None), (q, k, v, g, beta, s0)),
             "gdr/packed": (gdr(gdr_op, seg), gdr(cp.gated_delta_rule, seg), (q, k, v, g, beta, s0)),
             "conv": (conv(conv_op, None), conv(cp.causal_depthwise_conv, None), (x, kernel, hist)),
             "conv/packed": (conv(conv_op, seg), conv(cp.causal_depthwise_conv, seg), (x, kernel, hist)),
             "attention": (attn(None, False), attn(None, True), (qa, ka, va)),
             "attention/packed": (attn(seg, False), attn(seg, True), (qa, ka, va))}
    # A cache of 64 slots (stacked over 2 layer groups) holding 10 tokens; a chunk of 12 new tokens at slots
    # [10, 22) straddles the boundary of the first two shards (16 slots each with context=4).
    from qwax.pallas_kernels.attention import attend_cache, kv_cache_shapes, write_kv
    ks, vs = kv_cache_shapes(b, 2, 8, 64, (2,))
    k_cache = jnp.zeros(ks).at[..., :10].set(rng.normal(size=(*ks[:-1], 10)))
    v_cache = jnp.zeros(vs).at[..., :10, :].set(rng.normal(size=(*vs[:-2], 10, 8)))
    slots_valid = np.zeros((b, 64), bool)
    slots_valid[:, :22] = True
    slots_valid[1, 2:4] = False
    new = tuple(rng.normal(size=shape).astype(np.float32) for shape in ((b, 12, 4, 8), (b, 12, 2, 8), (b, 12, 2, 8)))

    def cached_single(q, k, v, kc, vc):
        kc, vc = write_kv(kc, vc, k, v, jnp.int32(10), jnp.int32(1))
        return attend_cache(q, kc, vc, jnp.asarray(slots_valid), jnp.int32(10), jnp.int32(1)), kc, vc

    def cached_parallel(q, k, v, kc, vc):
        return cp.cached_attention(q, k, v, kc, vc, jnp.asarray(slots_valid), jnp.int32(10), jnp.int32(1))

    for spec in ("fsdp=2,context=4", "data=2,context=2,fsdp=2", "context=8"):
        mesh = sharding.make_mesh(spec)
        rules = sharding.get_rules("fsdp")
        want = jax.jit(cached_single)(*new, k_cache, v_cache)
        with sharding.use_sharding(mesh, rules):
            fn = jax.jit(cached_parallel)
            got = fn(*new, k_cache, v_cache)
            text = fn.lower(*new, k_cache, v_cache).as_text()
        result[f"op/{spec}/cached_attention"] = {
            "out": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b_)))) for a, b_ in zip(got, want)),
            "shard_map": "shard_map" in text or "sdy.manual_computation" in text,
            "all_reduce": "all-reduce" in text or "all_reduce" in text}
        for name, (single, parallel, args) in cases.items():
            n = len(args)
            want = jax.jit(jax.value_and_grad(single, argnums=tuple(range(n)), has_aux=True))(*args)
            with sharding.use_sharding(mesh, rules):
                fn = jax.jit(jax.value_and_grad(parallel, argnums=tuple(range(n)), has_aux=True))
                got = fn(*args)
                text = fn.lower(*args).as_text()
            (_, out_w), grad_w = want
            (_, out_g), grad_g = got
            result[f"op/{spec}/{name}"] = {
                "out": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b_)))) for a, b_ in
                           zip(jax.tree.leaves(out_g), jax.tree.leaves(out_w))),
                "grads": compare_grads(grad_g, grad_w),
                "shard_map": "shard_map" in text or "sdy.manual_computation" in text,
                "ppermute": "collective_permute" in text}


def job_eight_devices() -> None:
    setup_devices(8)
    result: dict = {}
    op_cases(result)
    for name in TYPES:
        for spec, strategy in (("fsdp=2,context=4", "fsdp"), ("data=2,context=2,fsdp=2", "fsdp")):
            result[f"train/{name}/{spec}"] = train_case(name, spec, strategy, "xla")
    result["train/tiny-moe/expert=2,context=4"] = train_case("tiny-moe", "expert=2,context=4", "fsdp_ep", "xla")
    result["train/tiny-dense/context=4,tensor=2"] = train_case("tiny-dense", "context=4,tensor=2", "fsdp_tp", "xla")
    for name in TYPES:
        result[f"prefill/{name}"] = prefill_case(name, "fsdp=2,context=4", "fsdp")
    result["generate/tiny-moe"] = generate_case("tiny-moe", "fsdp=2,context=4")
    report(result)


def job_multihost(process_id: str, num_processes: str, port: str) -> None:
    """One of two processes x 4 devices: the packed train case on a mesh whose context axis spans both."""
    setup_devices(4)
    import jax
    from qwax.sharding import multihost

    multihost.initialize(f"127.0.0.1:{port}", int(num_processes), int(process_id))
    result = {"process_index": jax.process_index(), "devices": jax.device_count()}
    for spec in ("context=8", "fsdp=2,context=4"):
        result[spec] = train_case("tiny-moe", spec, "fsdp", "xla")
    report(result)


if __name__ == "__main__":
    globals()["job_" + sys.argv[1]](*sys.argv[2:])
