"""Memory planner: bytes per device of a model on a mesh, from abstract shapes only (no device, no allocation).

Parameters come from `nnx.eval_shape` of the real model, their per-device shard shapes from the rule table on a
`jax.sharding.AbstractMesh` (`NamedSharding.shard_shape`), so a 512-chip plan runs on a laptop and agrees with the
placement `qwax.sharding.init.init_sharded` makes on real devices.

How the model runs comes from `RunOptions` (`options`; None means `RunOptions()`, the defaults of the model
itself: float32 parameters and compute, scanned layers, no remat; the `qwax plan` command line defaults to
bfloat16 instead): its dtypes size parameters, activations and the cache, its remat policy and layer scan decide
what the backward pass keeps, and its GDN chunk size the chunked-GDN intermediates.

Lengths: `seq` is the sequence (train) or the prefill chunk (infer); `context` is the context length, the
sequence in train mode and the KV cache in infer mode, whose prompt is then prefilled in chunks of `seq`
(default PREFILL_CHUNK). A `context` mesh axis (context parallelism, qwax.sharding.context_parallel) splits the
sequence, each chunk and the KV cache into shards of L / C tokens, so it must divide them.

Training (`mode="train"`):
  params      the parameters in options.param_dtype;
  grads       one gradient per parameter, same dtype and sharding;
  optimizer   AdamW: two float32 moments, plus a float32 master copy when the parameters are narrower than float32;
  activations the arrays the layers create (`_layer_tensors`: for each layer kind a list of [B, L, width] and
              score arrays with their logical axes, sized per device by the rules like the parameters), kept as
              autodiff keeps them: every scanned group's (or unrolled layer's) input; of every layer what the remat
              policy saves (none: the residuals the backward pass reads, each reshaped view of them separately,
              since a scan stacks each; dots: the matmul outputs; full: nothing); then, while one group is
              differentiated, all of that group's residuals (recomputed, and copied out of the stacks) and about
              two arrays of cotangents. The loss (logits, their float32 copy and gradient) peaks at another time:
              the larger of the two counts.
Inference (`mode="infer"`): params; cache = the KV cache of the attention layers (and of the MTP head), sharded
  by batch and over `context` by slot, and the constant-size GDN conv + recurrent states (`cache_detail`);
  activations = what one prefill chunk of `seq` tokens holds at its peak: a layer's FORWARD_LIVE largest arrays
  (the cached attention's score block against `kv_block_size` slots; with context shards, all of the chunk's
  queries against a block of the shard's own slots), its input and output, and the chunk's logits.

What is counted follows the code: the blocked training attention (pallas_kernels/attention/xla.py) keeps one
float32 score block per query block (two views of it in a scan); ring attention rematerialises each of its C
steps, so training keeps every step's K, V block and accumulator and works on RING_SCORE_COPIES [B, Nq, Lc, Lc]
float32 blocks of one step at a time; a prefill over a context-split cache holds all the chunk's queries against
one block of the shard's slots; context-parallel GDN runs the chunked rule twice (values, and
the identity map with v = 0 for o^A and A) plus the maps of its prefix scan. Checked against XLA
(tests/sharding/planner_worker.py): on 8 CPU devices params, optimizer state and cache equal the compiled
arguments, and activations (+ grads, which XLA's temporaries also hold) come within 25% of
`compiled.memory_analysis().temp_size_in_bytes`, which includes the heap's fragmentation. XLA needs scratch
space of its own, so read "fits" near 100% as "does not fit". The kernels planned are those of TPUs and GPUs:
the MoE's grouped matmuls and all_to_all buffers (with the capacity factor given; None: the exact, worst-case
capacity the layer uses by default), the GDN chunk of the Pallas kernels.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding

from qwax.config import QwaxConfig
from qwax.options import RunOptions
from qwax.pallas_kernels.attention.xla import ATTN_MAX_BLOCKS, ATTN_Q_BLOCK, kv_block_size
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
# Prefill chunk of a long-context plan (`context` in infer mode) when none is given: long enough for the
# matmuls and the context shards, short enough that a chunk's activations stay small beside a 1M-token cache.
# The engine's own default is 512 (qwax.generate(prefill_chunk_size=...)); plan what you run.
PREFILL_CHUNK = 8192
# Score-sized float32 arrays one ring-attention step keeps for the backward pass
# (qwax.sharding.context_parallel.attention), live while one step is recomputed and differentiated: of the
# scores, their masked form, exp and the masked probabilities, XLA keeps three, with one bool mask.
RING_SCORE_COPIES = 3
# Arrays of one layer that a forward-only pass holds at once (inference prefill): the largest ones.
FORWARD_LIVE = 4


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
class Tensor(NamedTuple):
    """One array a layer creates: logical axes and global shape (its per-device size comes from the rules, as for
    the parameters), dtype, `dot` ("proj": output of a matmul without batch dims, a Linear; "bdot": of a batched
    matmul, attention scores or the chunked GDN products; None: anything else) and `saved`: the backward pass
    reads it, so autodiff keeps it from the forward (remat "none"); `views`: how many reshaped views of it the
    backward pass reads, each of which a layer scan stacks on its own."""

    axes: tuple[str | None, ...]
    shape: tuple[int, ...]
    dtype: Any
    dot: str | None = None
    saved: bool = True
    views: int = 1


# What each remat policy keeps of a layer's forward: none -> the residuals, dots -> every matmul output,
# dots_no_batch -> the Linear outputs, full -> nothing (the layer's input only, counted apart).
def _policy_keeps(policy: str, t: Tensor) -> bool:
    if policy == "none":
        return t.saved
    if policy == "dots":
        return t.dot is not None
    if policy == "dots_no_batch":
        return t.dot == "proj"
    return False


TOKENS = ("batch", "length")


def _tok(b: int, l: int, width: int, name: str | None, dtype: Any, dot: str | None = None, saved: bool = True,
         n: int = 1) -> list[Tensor]:
    """n [B, L, width] token tensors whose last dim is the logical `name`."""
    return [Tensor((*TOKENS, name), (b, l, width), dtype, dot, saved)] * n


def context_shards(rules: Rules, mesh: AbstractMesh) -> int:
    """The size of the mesh axes the rules split the sequence over ("length"): the context-parallel degree."""
    sizes = mesh_sizes(mesh)
    return math.prod(sizes.get(a, 1) for a in rules.get("length", ()))


def _attention_blocks(l: int) -> list[tuple[int, int]]:
    """(queries, keys) of each query block of the blocked training attention (pallas_kernels/attention/xla.py)."""
    block = max(ATTN_Q_BLOCK, -(-l // ATTN_MAX_BLOCKS))
    return [(min(start + block, l) - start, min(start + block, l)) for start in range(0, l, block)]


def _attention_projections(cfg: QwaxConfig, opts: RunOptions, b: int, l: int) -> list[Tensor]:
    """The projections, norms, rotary embedding and output gate of gated attention (without o_proj)."""
    dt, f32 = opts.dtype, jnp.float32
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return (_tok(b, l, 2 * q, "act_heads", dt, "proj", saved=False)  # q_proj: the q and gate halves are sliced off
            + _tok(b, l, kv, "act_kv_heads", dt, "proj", n=2)  # k_proj, v_proj
            + _tok(b, l, q, "act_heads", dt, n=2) + _tok(b, l, q, "act_heads", f32)  # q, its rotated copy, q_norm
            + _tok(b, l, kv, "act_kv_heads", dt) + _tok(b, l, kv, "act_kv_heads", f32)  # rotated k, k_norm
            # the output, sigmoid(gate), their product (o_proj's input) and the sigmoid's derivative
            + _tok(b, l, q, "act_heads", dt, n=4))


def _attention_tensors(cfg: QwaxConfig, opts: RunOptions, b: int, l: int, cp: int) -> list[Tensor]:
    """Gated attention over a sequence (training, or a prefill without a cache); cp > 1: ring attention."""
    dt, f32 = opts.dtype, jnp.float32
    nq = cfg.num_attention_heads
    q, kv = nq * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out = _attention_projections(cfg, opts, b, l)
    if cp == 1:  # query blocks over the keys before them: one f32 [B, Nq, rows, end] score block each
        blocks = _attention_blocks(l)
        for rows, end in blocks:  # the scores and exp(scores - max), which the backward reads as two views
            block = (("batch", "act_heads", None), (b, nq, rows * end))
            out += [Tensor(*block, f32, "bdot", saved=False), Tensor(*block, f32, views=2)]
        prefix = sum(end for _, end in blocks if end < l)  # keys [0, end) sliced per block (the last reads all)
        out += [Tensor(("batch", "act_kv_heads", None), (b, kv, prefix), dt)] * 2
        out += _tok(b, l, q, "act_heads", f32, "bdot", saved=False) + _tok(b, l, q, "act_heads", f32)  # p @ V, / sum
    else:  # ring: every step scores the local queries against one KV block of Lc = L / cp tokens
        step = (("batch", "act_heads", "length", None), (b, nq, l, l // cp))  # per device [B, Nq, Lc, Lc]
        # Each step is rematerialised: the backward pass recomputes one step's scores at a time (its working set,
        # not residuals of the layer) ...
        out += [Tensor(*step, f32, "bdot", saved=False)] + [Tensor(*step, f32, saved=False)] * (RING_SCORE_COPIES - 1)
        out += [Tensor(*step, jnp.bool_, saved=False)]  # causal / padding visibility
        for _ in range(cp):  # ... and keeps each step's inputs: its K, V block and the running accumulator
            out += _tok(b, l, kv, "act_kv_heads", dt, n=2) + _tok(b, l, q, "act_heads", f32, "bdot")
        out += _tok(b, l, q, "act_heads", f32, n=2)  # pre-scaled queries, the normalised output
    return out + _tok(b, l, cfg.hidden_size, "act_embed", dt, "proj", saved=False)  # o_proj


def _gdn_rule_run(cfg: QwaxConfig, opts: RunOptions, b: int, l: int, cp: int, width: int) -> list[Tensor]:
    """One run of the chunked gated delta rule (pallas_kernels/gated_delta_rule/xla.py) over each shard's Lc
    tokens with values `width` wide: float32 q, k, beta*V and o, and one [Hv, dk, width] state per chunk."""
    f32 = jnp.float32
    hv, dk = cfg.linear_num_value_heads, cfg.linear_key_head_dim
    chunk = opts.gdn_chunk_size or default_chunk_size(opts.gdn_impl, "tpu")  # plans are for TPUs and GPUs
    chunks = cp * -(-(l // cp) // chunk)  # chunks of all shards, so that "length" leaves each its own
    return (_tok(b, l, cfg.linear_key_dim, "act_heads", f32, n=2) + _tok(b, l, hv * width, "act_heads", f32, n=2)
            + _tok(b, l, cfg.linear_num_value_heads, "act_heads", f32, n=8)  # gates, decays, per-token scalings
            + [Tensor(("batch", "act_heads", "length", None, None), (b, hv, chunks, dk, width), f32, "bdot")])


def _gdn_tensors(cfg: QwaxConfig, opts: RunOptions, b: int, l: int, cp: int) -> list[Tensor]:
    """Gated DeltaNet over a sequence; cp > 1: the context-parallel form (two runs of the rule, prefix scan)."""
    dt, pdt, f32 = opts.dtype, opts.param_dtype, jnp.float32
    conv, v, hv = cfg.linear_conv_dim, cfg.linear_value_dim, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    out = (_tok(b, l, conv, "act_heads", dt, "proj", saved=False)  # in_proj_qkv
           + _tok(b, l, v, "act_heads", dt, "proj") + _tok(b, l, 2 * hv, "act_heads", dt, "proj")  # z; b, a
           # the conv's K shifted taps and its output (kernel dtype), SiLU, the split q | k | v
           + _tok(b, l, conv, "act_heads", pdt, n=cfg.linear_conv_kernel_dim + 1)
           + _tok(b, l, conv, "act_heads", dt, n=3)
           + _tok(b, l, cfg.linear_key_dim, "act_heads", f32, n=2))  # L2-normalised q, k
    out += _gdn_rule_run(cfg, opts, b, l, cp, dv)
    if cp > 1:  # run 2: identity start, v = 0 (dk wide): the per-token reads o^A and the segment map A
        out += _gdn_rule_run(cfg, opts, b, l, cp, dk) + _tok(b, l, v, "act_heads", f32)  # o0 + o^A S_in
        maps = (("batch", "act_heads", None, None), (b, hv, dk, dk + dv))  # (A, B) of each prefix-scan step
        out += [Tensor(*maps, f32)] * (2 + math.ceil(math.log2(cp)))
    # gated RMSNorm(o, z) in float32 and its SiLU gate, then out_proj
    return (out + _tok(b, l, v, "act_heads", f32, n=3) + _tok(b, l, v, "act_heads", dt, n=3)
            + _tok(b, l, cfg.hidden_size, "act_embed", dt, "proj", saved=False))


def _ffn_tensors(cfg: QwaxConfig, opts: RunOptions, ffn: str, b: int, l: int,
                 ep_rows: int | None) -> list[Tensor]:
    """Dense SwiGLU, or the sparse MoE (router, the k routed slots of each token in expert order, shared
    expert); ep_rows: the rows each device's experts receive under expert parallelism (`_ep_rows`)."""
    dt, f32, h = opts.dtype, jnp.float32, cfg.hidden_size

    def swiglu(width: int, name: str) -> list[Tensor]:
        # gate and up projections, SiLU (its input's sigmoid and product), the product that feeds down_proj
        return (_tok(b, l, width, name, dt, "proj", n=2) + _tok(b, l, width, name, dt, n=4)
                + _tok(b, l, h, "act_embed", dt, "proj", saved=False))

    if ffn != "moe":
        return swiglu(cfg.intermediate_size, "act_mlp")
    k, e, i = cfg.num_experts_per_tok, cfg.num_experts, cfg.moe_intermediate_size
    if ep_rows:  # expert parallel: the experts run on the ep * capacity rows each device receives
        rows = lambda width, name: Tensor((None, name), (ep_rows, width), dt)  # noqa: E731
    else:  # the k routed slots of every local token, in expert order
        rows = lambda width, name: Tensor((*TOKENS, name), (b, l * k, width), dt)  # noqa: E731
    out = (_tok(b, l, e, None, dt, "proj") + _tok(b, l, e, None, f32)  # router logits, softmax
           + [rows(h, "act_embed"), rows(2 * i, "act_mlp")._replace(dot="bdot")]  # the rows, grouped gate|up
           + [rows(i, "act_mlp")] * 3  # SiLU, product
           + [rows(h, None)._replace(dot="bdot", saved=False)]  # grouped down
           + _tok(b, l, h, "act_embed", f32)  # weighted combine
           + swiglu(cfg.shared_expert_intermediate_size, "act_mlp"))
    if ep_rows:  # all_to_all send and receive buffers of the dispatch and of the combine
        out += [Tensor((None, None), (ep_rows, h), dt)] * 4
    return out


def _layer_tensors(cfg: QwaxConfig, opts: RunOptions, mixer: str, ffn: str, b: int, l: int,
                   ep_rows: int | None, cp: int = 1) -> list[Tensor]:
    """The arrays one decoder layer creates over `b` sequences of `l` tokens (split over cp context shards)."""
    dt, f32, h = opts.dtype, jnp.float32, cfg.hidden_size
    # two RMSNorms (float32 normalised input, output) and the residual sum after the mixer
    out = _tok(b, l, h, "act_embed", f32, n=2) + _tok(b, l, h, "act_embed", dt, n=3)
    out += (_attention_tensors if mixer == "full_attention" else _gdn_tensors)(cfg, opts, b, l, cp)
    return out + _ffn_tensors(cfg, opts, ffn, b, l, ep_rows)


def _cached_attention_tensors(cfg: QwaxConfig, opts: RunOptions, b: int, l: int, cache_len: int,
                              cp: int) -> list[Tensor]:
    """What the cached read of an l-token prefill chunk holds at once (forward only): one block of scores against
    S cache slots (`kv_block_size`) and the online-softmax accumulator. Over context shards
    (`qwax.sharding.context_parallel.cached_attention`) every shard holds the whole chunk's queries, keys and
    values (gathered), reads only its cache_len / cp slots, and writes its shard of the cache entry anew."""
    dt, f32 = opts.dtype, jnp.float32
    nq, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q_axis = "length" if cp == 1 else None  # context-parallel: all queries of the chunk on every shard
    slots = cache_len // cp
    s = kv_block_size(l, nq // nkv, slots)
    scores = (("batch", "act_heads", q_axis, None), (b, nq, l, s))
    acc = (("batch", "act_heads", q_axis, None), (b, nq, l, d))
    # the block's scores, their masked copy (for the running max) and the probabilities; the accumulator, rescaled
    out = [Tensor(*scores, f32, "bdot")] + [Tensor(*scores, f32)] * 2 + [Tensor(*acc, f32)] * 2
    if cp > 1:
        # In the context-parallel form XLA:CPU keeps a fourth, reshaped copy of the block live in some layouts
        # (one shard's slots in a single block) and not in others: counted as half a block.
        out += [Tensor(scores[0], (b, nq, l, max(1, s // 2)), f32)]
        out += [Tensor(("batch", None, "act_heads", None), (b, l, nq + 2 * nkv, d), dt)]  # gathered q, k, v
        out += [Tensor(("cache_batch", "cache_kv_heads", None, None), (b, nkv, slots, d), dt)] * 2  # new entry
    return out


def _forward_peak(tensors: list[Tensor], rules: Rules, mesh: AbstractMesh) -> int:
    """Bytes live at once in a forward-only pass of one layer: its FORWARD_LIVE largest arrays (XLA frees each
    intermediate after its last use, so a layer never holds all of them)."""
    sizes = sorted((_tensor_bytes([t], rules, mesh) for t in tensors), reverse=True)
    return sum(sizes[:FORWARD_LIVE])


def _tensor_bytes(tensors: list[Tensor], rules: Rules, mesh: AbstractMesh, keep=None) -> int:
    return sum(_shard_elems(t.shape, t.axes, rules, mesh) * jnp.dtype(t.dtype).itemsize
               for t in tensors if keep is None or keep(t))


def _ep_rows(cfg: QwaxConfig, rules: Rules, mesh: AbstractMesh, batch: int, seq: int,
             capacity_factor: float | None) -> int | None:
    """Rows of each all_to_all buffer on one device under expert parallelism (qwax.sharding.expert_parallel):
    ep * capacity, capacity = the device's token slots (exact, by default) or capacity_factor * slots / ep;
    None without expert parallelism."""
    sizes = mesh_sizes(mesh)
    ep = sizes.get("expert", 1)
    if not cfg.has_moe or ep == 1 or "expert" not in rules.get("experts", ()):
        return None
    shards = math.prod(sizes.get(a, 1) for a in ("data", "fsdp", "expert", "context"))
    s_local = batch * seq // shards * cfg.num_experts_per_tok
    c = s_local if capacity_factor is None else max(1, min(s_local, math.ceil(capacity_factor * s_local / ep)))
    return ep * c


def activation_bytes(cfg: QwaxConfig, options: RunOptions, rules: Rules, mesh: AbstractMesh, batch: int, seq: int,
                     mode: str, capacity_factor: float | None = None, cache_len: int | None = None) -> int:
    """Per-device activation bytes of a training step (remat-aware) or of one inference prefill chunk of `seq`
    tokens into a cache of `cache_len` slots (see the module doc). The sequence (chunk) is split over the
    context shards (`context_shards`), which must divide it."""
    cp = context_shards(rules, mesh)
    cap = _ep_rows(cfg, rules, mesh, batch, seq, capacity_factor)
    itemsize = options.dtype.itemsize
    kinds = cfg.layer_kinds
    hidden = _shard_elems((batch, seq, cfg.hidden_size), (*TOKENS, "act_embed"), rules, mesh) * itemsize
    logits = _shard_elems((batch, seq, cfg.vocab_size), (*TOKENS, "act_vocab"), rules, mesh)
    if mode == "infer":
        peak = 0
        for mixer, ffn in set(kinds) | ({("full_attention", cfg.mtp_ffn)} if cfg.mtp_num_hidden_layers else set()):
            dt, h = options.dtype, cfg.hidden_size
            tensors = _tok(batch, seq, h, "act_embed", jnp.float32) + _tok(batch, seq, h, "act_embed", dt)
            if mixer == "full_attention":
                tensors += (_attention_projections(cfg, options, batch, seq)
                            + _cached_attention_tensors(cfg, options, batch, seq, cache_len or seq, cp)
                            + _tok(batch, seq, h, "act_embed", dt, "proj"))
            else:
                tensors += _gdn_tensors(cfg, options, batch, seq, cp)
            tensors += _ffn_tensors(cfg, options, ffn, batch, seq, cap)
            peak = max(peak, _forward_peak(tensors, rules, mesh))
        # the layer's input and output, the full logits (the prefill keeps the last position's only)
        return peak + 2 * hidden + logits * itemsize
    per_layer = {kind: _layer_tensors(cfg, options, *kind, batch, seq, cap, cp) for kind in set(kinds)}
    policy = options.remat  # RunOptions has checked the name
    scanned = options.uses_scan(cfg)
    period = cfg.scan_period if scanned else 1
    groups = [kinds[i:i + period] for i in range(0, len(kinds), period)]
    keeps = lambda t: _policy_keeps(policy, t)  # noqa: E731
    # A scan stacks what the policy keeps of every group, each reshaped view autodiff reads on its own.
    stacked = lambda ts: sum(_tensor_bytes([t], rules, mesh) * (t.views if scanned else 1)  # noqa: E731
                             for t in ts if keeps(t))
    # Each scanned group (or unrolled layer) keeps its input; inside it, what the policy keeps.
    kept = len(groups) * hidden + sum(stacked(per_layer[k]) for k in kinds)
    if cfg.mtp_num_hidden_layers:  # the MTP head runs outside the layer stack, without remat
        mtp_layer = _layer_tensors(cfg, options, "full_attention", cfg.mtp_ffn, batch, seq, cap, cp)
        kept += cfg.mtp_num_hidden_layers * _tensor_bytes(mtp_layer, rules, mesh, lambda t: t.saved)
    # The backward pass of a group holds all of its residuals at once: those the policy dropped, recomputed
    # (remat wraps the whole group), and, in a scan, copies of the kept ones sliced out of their stacks.
    if scanned:
        in_group = lambda t: t.saved or keeps(t)  # noqa: E731
    else:
        in_group = lambda t: t.saved and not keeps(t)  # noqa: E731
    backward = max(sum(_tensor_bytes(per_layer[k], rules, mesh, in_group) for k in group) for group in groups)
    # ... beside the cotangents being formed: about the two largest arrays of a layer
    largest = max(_shard_elems(t.shape, t.axes, rules, mesh) * jnp.dtype(t.dtype).itemsize
                  for ts in per_layer.values() for t in ts)
    # The loss: logits, their float32 copy for the softmax cross-entropy and its gradient (before the layers'
    # backward pass, whose peak is apart from it).
    loss = logits * (itemsize + 8) + hidden
    return kept + max(backward + 2 * largest, loss)


def cache_detail(cfg: QwaxConfig, options: RunOptions, rules: Rules, mesh: AbstractMesh, batch: int,
                 cache_len: int) -> dict[str, int]:
    """Per-device bytes of the inference cache (qwax.inference.cache) by part.

    kv: keys and values [B, Nkv, cache_len, D] of every attention layer (the MTP head's included) in
    options.dtype, sharded by batch and by "cache_len" (the context axis); only attention layers have them.
    gdn: the constant-size state of every Gated DeltaNet layer, recurrent [B, Hv, dk, dv] float32 and conv
    [B, K, conv_dim], whatever the length. slots: the [B, cache_len] validity mask, index and positions.
    """
    dt = options.dtype.itemsize
    n_attn = sum(1 for t in cfg.layer_types if t == "full_attention") + cfg.mtp_num_hidden_layers
    n_gdn = sum(1 for t in cfg.layer_types if t == "linear_attention")
    kv = _shard_elems((batch, cfg.num_key_value_heads, cache_len, cfg.head_dim),
                      ("cache_batch", "cache_kv_heads", "cache_len", None), rules, mesh) * dt
    rec = _shard_elems((batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim),
                       ("cache_batch", "cache_heads", None, None), rules, mesh) * 4
    conv = _shard_elems((batch, cfg.linear_conv_kernel_dim, cfg.linear_conv_dim),
                        ("cache_batch", None, "cache_heads"), rules, mesh) * dt
    # one bookkeeping set per cache: the layer stack's, and the MTP head's when there is one
    slots = (_shard_elems((batch, cache_len), ("cache_batch", "cache_len"), rules, mesh)
             + 4 * _shard_elems((batch,), ("cache_batch",), rules, mesh) + 4) * (1 + (cfg.mtp_num_hidden_layers > 0))
    return {"kv": n_attn * 2 * kv, "gdn": n_gdn * (rec + conv), "slots": slots}


def cache_bytes(cfg: QwaxConfig, options: RunOptions, rules: Rules, mesh: AbstractMesh, batch: int,
                cache_len: int) -> int:
    """Per-device bytes of the inference cache: the sum of `cache_detail`."""
    return sum(cache_detail(cfg, options, rules, mesh, batch, cache_len).values())


def _check_split(flag: str, tokens: int, shards: int, what: str) -> None:
    if tokens % shards:
        raise ValueError(f"{flag}={tokens}: the mesh's context axis splits {what} into {shards} shards, and "
                         f"{shards} does not divide {tokens}; use a multiple of {shards}")


def resolve_lengths(mode: str, seq: int | None, context: int | None, cache_len: int | None
                    ) -> tuple[int, int | None]:
    """(seq, cache_len) of a plan from the lengths given (the `qwax plan` flags of the same names).

    train: `context` is the sequence length (the same as seq: give one, or both equal); no cache. infer:
    `context` is the cache length (the same as cache_len) and seq the prefill chunk (default PREFILL_CHUNK, at
    most the context); without context, seq is the prefill and cache_len defaults to it.
    """
    for flag, value in (("--seq", seq), ("--context", context), ("--cache-len", cache_len)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{flag}={value!r}: expected a positive number of tokens")
    if context is None:
        if seq is None:
            raise ValueError("no length given: pass --seq N (or seq=) or --context N (context=)")
        if mode == "train" and cache_len is not None:
            raise ValueError(f"--cache-len={cache_len}: train mode has no cache")
        return seq, (cache_len or seq) if mode == "infer" else None
    if mode == "train":
        if seq is not None and seq != context:
            raise ValueError(f"--seq={seq} and --context={context} disagree: in train mode both are the sequence "
                             "length; give one of them")
        if cache_len is not None:
            raise ValueError(f"--cache-len={cache_len}: train mode has no cache")
        return context, None
    if cache_len is not None and cache_len != context:
        raise ValueError(f"--cache-len={cache_len} and --context={context} disagree: in infer mode both are the "
                         "cache length; give one of them")
    return min(seq or PREFILL_CHUNK, context), context


def plan(cfg: QwaxConfig, mesh: str | dict | AbstractMesh, strategy: str | Rules = "fsdp", *,
         options: RunOptions | None = None, seq: int | None = None, batch: int, mode: str = "train",
         cache_len: int | None = None, context: int | None = None, device: str = "v5p",
         num_devices: int | None = None, rule_overrides: Any = None,
         capacity_factor: float | None = None) -> dict[str, Any]:
    """The memory plan of `cfg` run with `options` on `mesh` with `strategy`: the JSON object `qwax plan --json`
    prints.

    options: dtypes, remat, scan (None: RunOptions(), the model's defaults, float32; pass
    RunOptions(dtype="bfloat16", param_dtype="bfloat16", remat="full") for a typical large run). batch: the
    global batch (sequences). Lengths (see `resolve_lengths`): seq, the sequence (train) or the prefill chunk
    (infer); cache_len, the cache slots (infer, default seq); context, the context length: the sequence in
    train mode, the cache in infer mode, whose prefill then runs in chunks of seq (default PREFILL_CHUNK). A mesh
    `context` axis splits the sequence, each prefill chunk and the KV cache: it must divide them (ValueError).
    Keys: params_total (published count: no MTP head), params_active, per_device_bytes {params, grads,
    optimizer, activations, cache, total}, cache_detail {kv, gdn, slots}, device_memory_bytes, fits, and details
    (mesh, strategy, seq, cache_len, context, context_shards, remat, dtype names, MTP parameters, utilisation).
    """
    if options is None:
        options = RunOptions()
    elif not isinstance(options, RunOptions):
        raise TypeError(f"plan: options={options!r}: expected a qwax.RunOptions or None")
    if mode not in ("train", "infer"):
        raise ValueError(f"mode {mode!r}: expected 'train' or 'infer'")
    if device not in DEVICE_MEMORY_BYTES:
        raise ValueError(f"device {device!r}: expected one of {sorted(DEVICE_MEMORY_BYTES)}")
    seq, cache_len = resolve_lengths(mode, seq, context, cache_len)
    amesh = mesh if isinstance(mesh, AbstractMesh) else abstract_mesh(mesh, num_devices)
    rules = get_rules(strategy, rule_overrides) if isinstance(strategy, str) or rule_overrides else strategy
    cp = context_shards(rules, amesh)
    train = mode == "train"
    if train:
        _check_split("--context" if context is not None else "--seq", seq, cp, "the sequence")
    else:
        _check_split("--seq", seq, cp, "each prefill chunk")
        _check_split("--context" if context is not None else "--cache-len", cache_len, cp, "the KV cache")
    params = abstract_params(cfg, options)
    counts = param_bytes(params, rules, amesh)
    caches = {"kv": 0, "gdn": 0, "slots": 0} if train else cache_detail(cfg, options, rules, amesh, batch, cache_len)
    per_device = {
        "params": counts["params"],
        "grads": counts["grads"] if train else 0,
        "optimizer": counts["optimizer"] if train else 0,
        "activations": activation_bytes(cfg, options, rules, amesh, batch, seq, mode, capacity_factor, cache_len),
        "cache": sum(caches.values()),
    }
    per_device["total"] = sum(per_device.values())
    memory = DEVICE_MEMORY_BYTES[device]
    return {
        "params_total": counts["total"],
        "params_active": _active_count(params, cfg),
        "per_device_bytes": per_device,
        "cache_detail": caches,
        "device_memory_bytes": memory,
        "fits": per_device["total"] <= memory,
        "utilisation": per_device["total"] / memory,
        "params_mtp": counts["mtp"],
        "num_devices": amesh.size,
        "mesh": mesh_sizes(amesh),
        "strategy": strategy if isinstance(strategy, str) else "custom",
        "mode": mode, "device": device, "batch": batch, "seq": seq, "cache_len": cache_len or 0,
        "context": seq if train else cache_len, "context_shards": cp,
        "remat": options.remat, "scan_layers": options.uses_scan(cfg), "dtype": options.dtype.name,
        "param_dtype": options.param_dtype.name,
        "capacity_factor": capacity_factor,
    }


def format_plan(p: dict[str, Any]) -> str:
    """A human-readable table of a plan."""
    gib = lambda n: f"{n / GiB:10.2f} GiB"  # noqa: E731
    mesh = ",".join(f"{k}={v}" for k, v in p["mesh"].items() if v > 1) or "1 device"
    lengths = (f"batch {p['batch']} x seq {p['seq']}" if p["mode"] == "train" else
               f"batch {p['batch']}, prefill chunks of {p['seq']} into a cache of {p['cache_len']}")
    if p["context_shards"] > 1:
        lengths += f", split over {p['context_shards']} context shards"
    lines = [
        f"{p['mode']} on {p['num_devices']} x {p['device']} ({mesh}), strategy {p['strategy']}, {lengths}, "
        f"remat {p['remat']}, params {p['param_dtype']}, compute {p['dtype']}",
        f"parameters: {p['params_total'] / 1e9:.2f}B total, {p['params_active'] / 1e9:.2f}B active per token"
        + (f" (+{p['params_mtp'] / 1e9:.2f}B MTP head)" if p["params_mtp"] else ""),
        "per device:",
    ]
    for key, value in p["per_device_bytes"].items():
        lines.append(f"  {key:<12}{gib(value)}")
        if key == "cache" and value:
            lines.append(f"    {'KV':<10}{gib(p['cache_detail']['kv'])}  (attention layers)")
            lines.append(f"    {'GDN':<10}{gib(p['cache_detail']['gdn'])}  (constant in the length)")
    lines.append(f"  {'memory':<12}{gib(p['device_memory_bytes'])}")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"{verdict} ({100 * p['utilisation']:.0f}% of device memory)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- sweeps
# Candidate meshes of a sweep (`qwax plan --sweep`): per device kind, (hardware label, mesh, strategy), for
# pods of realistic sizes, without and with a context axis. v5p-N has N TensorCores = N / 2 chips.
SWEEP_MESHES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "v5p": (
        ("v5p-32 (16 chips)", "fsdp=2,expert=8", "fsdp_ep"),
        ("v5p-32 (16 chips)", "expert=8,context=2", "fsdp_ep"),
        ("v5p-64 (32 chips)", "fsdp=4,expert=8", "fsdp_ep"),
        ("v5p-64 (32 chips)", "expert=8,context=4", "fsdp_ep"),
        ("v5p-128 (64 chips)", "fsdp=8,expert=8", "fsdp_ep"),
        ("v5p-128 (64 chips)", "expert=8,context=8", "fsdp_ep"),
        ("v5p-256 (128 chips)", "fsdp=2,expert=8,context=8", "fsdp_ep"),
        ("v5p-256 (128 chips)", "expert=8,context=16", "fsdp_ep"),
        ("v5p-512 (256 chips)", "fsdp=4,expert=8,context=8", "fsdp_ep"),
        ("v5p-512 (256 chips)", "expert=8,context=32", "fsdp_ep"),
        ("v5p-1024 (512 chips)", "fsdp=2,expert=8,context=32", "fsdp_ep"),
        ("v5p-1024 (512 chips)", "expert=8,context=64", "fsdp_ep"),
    ),
    "h200": (
        ("8x H200", "expert=8", "fsdp_ep"),
        ("8x H200", "expert=4,context=2", "fsdp_ep"),
        ("16x H200", "fsdp=2,expert=8", "fsdp_ep"),
        ("16x H200", "expert=8,context=2", "fsdp_ep"),
        ("32x H200", "expert=8,context=4", "fsdp_ep"),
        ("64x H200", "fsdp=2,expert=8,context=4", "fsdp_ep"),
        ("64x H200", "expert=8,context=8", "fsdp_ep"),
        ("128x H200", "expert=8,context=16", "fsdp_ep"),
        ("256x H200", "expert=8,context=32", "fsdp_ep"),
    ),
}


def batch_shards(mesh: str | dict | AbstractMesh, strategy: str | Rules = "fsdp", num_devices: int | None = None,
                 rule_overrides: Any = None) -> int:
    """How many ways the rules split a batch's rows on `mesh` (the product of the "batch" mesh axes): a
    sweep's default training batch, one sequence per batch shard."""
    amesh = mesh if isinstance(mesh, AbstractMesh) else abstract_mesh(mesh, num_devices)
    rules = get_rules(strategy, rule_overrides) if isinstance(strategy, str) or rule_overrides else strategy
    sizes = mesh_sizes(amesh)
    return math.prod(sizes.get(a, 1) for a in rules.get("batch", ()))


def sweep(cfg: QwaxConfig, devices: list[str] | tuple[str, ...], *, options: RunOptions | None = None,
          mode: str = "train", seq: int | None = None, context: int | None = None, batch: int | None = None,
          capacity_factor: float | None = None) -> list[dict[str, Any]]:
    """`plan` on every candidate mesh of SWEEP_MESHES for each device kind in `devices` (e.g. ["v5p", "h200"]),
    each plan with its "hardware" label. batch None: 1 in infer mode, `batch_shards` of the mesh in train
    mode (one sequence per batch shard). Lengths as in `plan`."""
    unknown = [d for d in devices if d not in SWEEP_MESHES]
    if unknown:
        raise ValueError(f"--sweep {','.join(devices)}: no candidate meshes for {unknown}; expected a list of "
                         f"{sorted(SWEEP_MESHES)}")
    plans = []
    for device in devices:
        for hardware, mesh, strategy in SWEEP_MESHES[device]:
            rows = batch if batch is not None else 1 if mode == "infer" else batch_shards(mesh, strategy)
            p = plan(cfg, mesh, strategy, options=options, seq=seq, batch=rows, mode=mode, context=context,
                     device=device, capacity_factor=capacity_factor)
            plans.append({**p, "hardware": hardware})
    return plans


def _tokens(n: int) -> str:
    """1048576 -> "1M", 262144 -> "256k", 4096 -> "4k", 1000 -> "1000"."""
    for size, unit in ((1 << 20, "M"), (1 << 10, "k")):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def format_table(plans: list[dict[str, Any]]) -> str:
    """A Markdown table of plans (a `sweep`): hardware, mesh, lengths, per-device GiB by part, the verdict."""
    lines = ["| hardware | mesh, strategy | batch x length | params | grads | optimizer | activations | cache "
             "(KV + GDN) | total / HBM (GiB) | fits |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in plans:
        b = {k: v / GiB for k, v in p["per_device_bytes"].items()}
        mesh = ",".join(f"{k}={v}" for k, v in p["mesh"].items() if v > 1) or "1 device"
        lengths = (f"{p['batch']}x{_tokens(p['seq'])}" if p["mode"] == "train" else
                   f"{p['batch']}x{_tokens(p['cache_len'])} (chunks of {_tokens(p['seq'])})")
        verdict = f"yes ({100 * p['utilisation']:.0f}%)" if p["fits"] else f"**no** ({100 * p['utilisation']:.0f}%)"
        cache = (f"{b['cache']:.1f} ({p['cache_detail']['kv'] / GiB:.1f} + {p['cache_detail']['gdn'] / GiB:.2f})"
                 if p["mode"] == "infer" else "0")
        lines.append(f"| {p.get('hardware', p['device'])} | `{mesh}` {p['strategy']} | {lengths} | {b['params']:.1f} | "
                     f"{b['grads']:.1f} | {b['optimizer']:.1f} | {b['activations']:.1f} | {cache} | "
                     f"{b['total']:.1f} / {p['device_memory_bytes'] / GiB:.0f} | {verdict} |")
    return "\n".join(lines)
