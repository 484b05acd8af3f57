"""Memory planner: bytes per device of a model on a mesh, from abstract shapes only (no device, no allocation).

Parameters come from `nnx.eval_shape` of the real model, their per-device shard shapes from the rule table on a
`jax.sharding.AbstractMesh` (`NamedSharding.shard_shape`), so a 512-chip plan runs on a laptop and agrees with the
placement `qwax.sharding.init.init_sharded` makes on real devices.

How the model runs comes from `RunOptions` (`options`; None means `RunOptions()`, the defaults of the model
itself: float32 parameters and compute, scanned layers, no remat; the `qwax plan` command line defaults to
bfloat16 instead): its dtypes size parameters, activations and the cache, its remat policy and layer scan decide
what the backward pass keeps, and its GDN chunk size the chunked-GDN intermediates.

Training (`mode="train"`):
  params      the parameters in options.param_dtype;
  grads       one gradient per parameter, same dtype and sharding;
  optimizer   AdamW: two float32 moments, plus a float32 master copy when the parameters are narrower than float32;
  activations what the backward pass keeps, an estimate from the layer shapes and options.remat (see `_layer_tensors`):
              per layer the tensors the remat policy saves, plus one layer's full working set and its cotangents
              (the layer being recomputed / differentiated), plus the logits with their float32 softmax and grad.
Inference (`mode="infer"`): params; cache = KV cache of the attention layers and GDN conv + recurrent states for
  `batch` sequences of `cache_len` tokens; activations = one layer's working set and the logits of a `seq`-token
  prefill.

Activation figures are estimates of the arrays the current qwax layers create (e.g. attention materialises its
[B, heads, L, L] scores): XLA may fuse some away and needs scratch space of its own, so read "fits" near 100% as
"does not fit". Expert-parallel all_to_all buffers are counted with the capacity factor given (None: the exact,
worst-case capacity the layer uses by default).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding

from qwax.config import QwaxConfig
from qwax.options import RunOptions
from qwax.pallas_kernels.gated_delta_rule import default_chunk_size
from qwax.sharding.mesh import abstract_mesh, mesh_sizes
from qwax.sharding.rules import Rules, get_rules, logical_axes_of, partition_spec

GiB = 1 << 30
# Nominal HBM per device (chip or GPU), no reserve.
DEVICE_MEMORY_BYTES = {
    "v5e": 16 * GiB,
    "v5p": 95 * GiB,
    "v6e": 32 * GiB,
    "h100": 80 * GiB,
    "h200": 141 * 10**9,
    "cpu": 24 * GiB,
}


def abstract_params(cfg: QwaxConfig, options: RunOptions) -> nnx.State:
    """State of jax.ShapeDtypeStruct parameters (with their logical_axes) of QwaxForCausalLM(cfg, options)."""
    from qwax.model import QwaxForCausalLM

    _, params = nnx.eval_shape(lambda: nnx.split(QwaxForCausalLM(cfg, options, rngs=nnx.Rngs(0)), nnx.Param))
    return params


def _shard_elems(shape: tuple[int, ...], axes: tuple[str | None, ...], rules: Rules, mesh: AbstractMesh) -> int:
    spec = partition_spec(axes, shape, rules, mesh)
    return math.prod(NamedSharding(mesh, spec).shard_shape(tuple(shape)))


def param_bytes(params: nnx.State, rules: Rules, mesh: AbstractMesh) -> dict[str, int]:
    """Element counts (total without the MTP head, MTP head) and per-device bytes of params, grads and AdamW."""
    total = mtp = 0
    per_device = {"params": 0, "grads": 0, "optimizer": 0}
    for path, v in nnx.to_flat_state(params):
        value = v.get_value()
        axes = logical_axes_of(v)
        size = math.prod(value.shape)
        itemsize = jnp.dtype(value.dtype).itemsize
        local = _shard_elems(value.shape, axes, rules, mesh)
        per_device["params"] += local * itemsize
        per_device["grads"] += local * itemsize
        per_device["optimizer"] += local * (8 + (4 if itemsize < 4 else 0))
        if "mtp" in path:
            mtp += size
            continue
        total += size
    return {"total": total, "mtp": mtp, **per_device}


def _active_count(params: nnx.State, cfg: QwaxConfig) -> int:
    """Parameters a token uses: everything outside the MTP head, routed experts counted k / E."""
    active = 0.0
    for path, v in nnx.to_flat_state(params):
        if "mtp" in path:
            continue
        size = math.prod(v.get_value().shape)
        active += size * cfg.num_experts_per_tok / cfg.num_experts if "experts" in logical_axes_of(v) else size
    return int(round(active))


# --------------------------------------------------------------------------- activations
# A tensor of one layer: (logical axes, global shape, dtype, kind). kind: "proj" = output of a matmul without
# batch dims (a Linear), "bdot" = output of a batched matmul (attention scores / values, chunked GDN),
# "elem" = anything else. Remat policies save: none -> all, dots -> proj + bdot, dots_no_batch -> proj, full -> none.
SAVED_KINDS = {"none": ("proj", "bdot", "elem"), "dots": ("proj", "bdot"), "dots_no_batch": ("proj",), "full": ()}


def _layer_tensors(cfg: QwaxConfig, opts: RunOptions, mixer: str, ffn: str, b: int, l: int,
                   ep_capacity: int | None) -> list[tuple[tuple, tuple, Any, str]]:
    dt, f32 = opts.dtype, jnp.float32
    h = cfg.hidden_size
    hidden = ("batch", "length", "act_embed")
    out = [(hidden, (b, l, h), dt, "elem"), (hidden, (b, l, h), dt, "elem"), (hidden, (b, l, h), dt, "elem")]
    if mixer == "full_attention":
        nq, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        heads, kv = ("batch", "length", "act_heads"), ("batch", "length", "act_kv_heads")
        scores = ("batch", "act_heads", "length", None)
        out += [(heads, (b, l, 2 * nq * d), dt, "proj"), (kv, (b, l, nkv * d), dt, "proj"),
                (kv, (b, l, nkv * d), dt, "proj"), (heads, (b, l, nq * d), dt, "elem"),
                (kv, (b, l, nkv * d), dt, "elem"), (scores, (b, nq, l, l), f32, "bdot"),
                (scores, (b, nq, l, l), dt, "elem"), (heads, (b, l, nq * d), dt, "bdot"),
                (heads, (b, l, nq * d), dt, "elem"), (hidden, (b, l, h), dt, "proj")]
    else:
        heads = ("batch", "length", "act_heads")
        hv, dk, dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
        c = opts.gdn_chunk_size or default_chunk_size(opts.gdn_impl, "tpu")  # plans are for TPUs and GPUs (same C)
        n_chunks = -(-l // c)
        out += [(heads, (b, l, cfg.linear_conv_dim), dt, "proj"), (heads, (b, l, cfg.linear_value_dim), dt, "proj"),
                (heads, (b, l, 2 * hv), dt, "proj"), (heads, (b, l, cfg.linear_conv_dim), dt, "elem"),
                (heads, (b, l, cfg.linear_conv_dim), dt, "elem"), (heads, (b, l, 2 * cfg.linear_key_dim), f32, "elem"),
                (heads, (b, l, 2 * hv), f32, "elem"),
                (("batch", "act_heads", None, None, None), (b, hv, n_chunks, dk, dv), f32, "bdot"),
                (("batch", "act_heads", None, None, None), (b, hv, n_chunks, c, c), f32, "bdot"),
                (heads, (b, l, cfg.linear_value_dim), f32, "bdot"), (heads, (b, l, cfg.linear_value_dim), dt, "elem"),
                (hidden, (b, l, h), dt, "proj")]
    if ffn == "moe":
        k, e, i, i_s = cfg.num_experts_per_tok, cfg.num_experts, cfg.moe_intermediate_size, \
            cfg.shared_expert_intermediate_size
        t, mlp = b * l, ("batch", "length", "act_mlp")
        slots = t * k
        out += [(("batch", None), (t, e), dt, "proj"), (("batch", None), (slots, h), dt, "elem"),
                (("batch", "act_mlp"), (slots, 2 * i), dt, "proj"), (("batch", "act_mlp"), (slots, i), dt, "elem"),
                (("batch", None), (slots, h), dt, "proj"), (mlp, (b, l, i_s), dt, "proj"),
                (mlp, (b, l, i_s), dt, "proj"), (mlp, (b, l, i_s), dt, "elem"), (hidden, (b, l, h), dt, "proj")]
        if ep_capacity:  # all_to_all send / receive buffers of the expert-parallel dispatch and combine
            out += [(("batch", None), (ep_capacity, h), dt, "elem")] * 4
    else:
        i, mlp = cfg.intermediate_size, ("batch", "length", "act_mlp")
        out += [(mlp, (b, l, i), dt, "proj"), (mlp, (b, l, i), dt, "proj"), (mlp, (b, l, i), dt, "elem"),
                (hidden, (b, l, h), dt, "proj")]
    return out


def _tensor_bytes(tensors, rules: Rules, mesh: AbstractMesh, kinds=("proj", "bdot", "elem")) -> int:
    return sum(_shard_elems(shape, axes, rules, mesh) * jnp.dtype(dtype).itemsize
               for axes, shape, dtype, kind in tensors if kind in kinds)


def _ep_capacity(cfg: QwaxConfig, rules: Rules, mesh: AbstractMesh, batch: int, seq: int,
                 capacity_factor: float | None) -> int | None:
    """Global rows of one EP all_to_all buffer (ep * C per token shard, summed over shards), None without EP."""
    sizes = mesh_sizes(mesh)
    ep = sizes.get("expert", 1)
    if not cfg.has_moe or ep == 1 or "expert" not in rules.get("experts", ()):
        return None
    spec = partition_spec(("batch", "length"), (batch, seq), rules, mesh)
    shards = math.prod(sizes[a] for part in spec if part for a in ((part,) if isinstance(part, str) else part))
    s_local = batch * seq // shards * cfg.num_experts_per_tok
    c = s_local if capacity_factor is None else max(1, min(s_local, math.ceil(capacity_factor * s_local / ep)))
    return ep * c * shards


def activation_bytes(cfg: QwaxConfig, options: RunOptions, rules: Rules, mesh: AbstractMesh, batch: int, seq: int,
                     mode: str, capacity_factor: float | None = None) -> int:
    """Per-device activation bytes of a training step (remat-aware) or an inference prefill (see module doc)."""
    cap = _ep_capacity(cfg, rules, mesh, batch, seq, capacity_factor)
    itemsize = options.dtype.itemsize
    kinds = cfg.layer_kinds
    per_layer = {kind: _layer_tensors(cfg, options, *kind, batch, seq, cap) for kind in set(kinds)}
    working = max(_tensor_bytes(t, rules, mesh) for t in per_layer.values())
    hidden = _shard_elems((batch, seq, cfg.hidden_size), ("batch", "length", "act_embed"), rules, mesh) * itemsize
    logits = _shard_elems((batch, seq, cfg.vocab_size), ("batch", "length", "act_vocab"), rules, mesh)
    if mode == "infer":
        return working + 2 * hidden + logits * itemsize
    saved = SAVED_KINDS[options.remat]  # RunOptions has checked the name
    period = cfg.scan_period if options.uses_scan(cfg) else 1
    groups = len(kinds) // period
    # Each scanned group (or unrolled layer) keeps its input; inside it, what the policy saves.
    kept = groups * hidden + sum(_tensor_bytes(per_layer[k], rules, mesh, saved) for k in kinds)
    if cfg.mtp_num_hidden_layers:
        mtp_layer = _layer_tensors(cfg, options, "full_attention", cfg.mtp_ffn, batch, seq, cap)
        kept += cfg.mtp_num_hidden_layers * _tensor_bytes(mtp_layer, rules, mesh)
    # One layer being differentiated: its activations and their cotangents; logits, fp32 softmax and their grad.
    return kept + 2 * working + logits * (itemsize + 8)


def cache_bytes(cfg: QwaxConfig, options: RunOptions, rules: Rules, mesh: AbstractMesh, batch: int,
                cache_len: int) -> int:
    """Per-device bytes of the inference cache: K and V [B, Nkv, cache_len, D] per attention layer (the MTP layer
    included) in options.dtype, GDN recurrent [B, Hv, dk, dv] float32 and conv [B, K, conv_dim] per
    linear-attention layer."""
    dt = options.dtype.itemsize
    n_attn = sum(1 for t in cfg.layer_types if t == "full_attention") + cfg.mtp_num_hidden_layers
    n_gdn = sum(1 for t in cfg.layer_types if t == "linear_attention")
    kv = _shard_elems((batch, cfg.num_key_value_heads, cache_len, cfg.head_dim),
                      ("cache_batch", "cache_kv_heads", "cache_len", None), rules, mesh) * dt
    rec = _shard_elems((batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim),
                       ("cache_batch", "cache_heads", None, None), rules, mesh) * 4
    conv = _shard_elems((batch, cfg.linear_conv_kernel_dim, cfg.linear_conv_dim),
                        ("cache_batch", None, None), rules, mesh) * dt
    return n_attn * 2 * kv + n_gdn * (rec + conv)


def plan(cfg: QwaxConfig, mesh: str | dict | AbstractMesh, strategy: str | Rules = "fsdp", *,
         options: RunOptions | None = None, seq: int, batch: int, mode: str = "train", cache_len: int | None = None,
         device: str = "v5p", num_devices: int | None = None, rule_overrides: Any = None,
         capacity_factor: float | None = None) -> dict[str, Any]:
    """The memory plan of `cfg` run with `options` on `mesh` with `strategy`: the JSON object `qwax plan --json`
    prints.

    options: dtypes, remat, scan (None: RunOptions(), the model's defaults, float32; pass
    RunOptions(dtype="bfloat16", param_dtype="bfloat16", remat="full") for a typical large run). seq, batch: the
    sequence length and global batch (sequences). Keys: params_total (published count: no MTP head),
    params_active, per_device_bytes {params, grads, optimizer, activations, cache, total}, device_memory_bytes,
    fits, and details (mesh, strategy, remat, dtype names, MTP parameters, utilisation).
    """
    if options is None:
        options = RunOptions()
    elif not isinstance(options, RunOptions):
        raise TypeError(f"plan: options={options!r}: expected a qwax.RunOptions or None")
    if mode not in ("train", "infer"):
        raise ValueError(f"mode {mode!r}: expected 'train' or 'infer'")
    if device not in DEVICE_MEMORY_BYTES:
        raise ValueError(f"device {device!r}: expected one of {sorted(DEVICE_MEMORY_BYTES)}")
    amesh = mesh if isinstance(mesh, AbstractMesh) else abstract_mesh(mesh, num_devices)
    rules = get_rules(strategy, rule_overrides) if isinstance(strategy, str) or rule_overrides else strategy
    params = abstract_params(cfg, options)
    counts = param_bytes(params, rules, amesh)
    train = mode == "train"
    per_device = {
        "params": counts["params"],
        "grads": counts["grads"] if train else 0,
        "optimizer": counts["optimizer"] if train else 0,
        "activations": activation_bytes(cfg, options, rules, amesh, batch, seq, mode, capacity_factor),
        "cache": 0 if train else cache_bytes(cfg, options, rules, amesh, batch, cache_len or seq),
    }
    per_device["total"] = sum(per_device.values())
    memory = DEVICE_MEMORY_BYTES[device]
    return {
        "params_total": counts["total"],
        "params_active": _active_count(params, cfg),
        "per_device_bytes": per_device,
        "device_memory_bytes": memory,
        "fits": per_device["total"] <= memory,
        "utilisation": per_device["total"] / memory,
        "params_mtp": counts["mtp"],
        "num_devices": amesh.size,
        "mesh": mesh_sizes(amesh),
        "strategy": strategy if isinstance(strategy, str) else "custom",
        "mode": mode, "device": device, "batch": batch, "seq": seq,
        "cache_len": (cache_len or seq) if not train else 0,
        "remat": options.remat, "scan_layers": options.uses_scan(cfg), "dtype": options.dtype.name,
        "param_dtype": options.param_dtype.name,
        "capacity_factor": capacity_factor,
    }


def format_plan(p: dict[str, Any]) -> str:
    """A human-readable table of a plan."""
    gib = lambda n: f"{n / GiB:10.2f} GiB"  # noqa: E731
    mesh = ",".join(f"{k}={v}" for k, v in p["mesh"].items() if v > 1) or "1 device"
    lines = [
        f"{p['mode']} on {p['num_devices']} x {p['device']} ({mesh}), strategy {p['strategy']}, "
        f"batch {p['batch']} x seq {p['seq']}, remat {p['remat']}, params {p['param_dtype']}, compute {p['dtype']}",
        f"parameters: {p['params_total'] / 1e9:.2f}B total, {p['params_active'] / 1e9:.2f}B active per token"
        + (f" (+{p['params_mtp'] / 1e9:.2f}B MTP head)" if p["params_mtp"] else ""),
        "per device:",
    ]
    for key, value in p["per_device_bytes"].items():
        lines.append(f"  {key:<12}{gib(value)}")
    lines.append(f"  {'memory':<12}{gib(p['device_memory_bytes'])}")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"{verdict} ({100 * p['utilisation']:.0f}% of device memory)")
    return "\n".join(lines)
