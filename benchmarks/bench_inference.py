"""Long-context inference: decode time per token vs context, prefill throughput, cache size, vs transformers.

On a GDN-heavy tiny Qwen3.5-MoE config (3 GDN layers per attention layer, unrolled) this prints, in one run:
  - prefill tokens/s and the process's peak RSS after each prefill (64k must fit this 24 GiB machine; the caches
    of the shorter contexts are still held then);
  - decode ms/token at contexts 1k, 4k, 16k, 64k (cache filled by that prefill): the minimum and the median over
    --rounds rounds of --steps steps that interleave the contexts, and the 16k/1k ratio of both (target <= 1.5);
  - cache bytes per token of context;
  - decode tokens/s of qwax.generate vs transformers' generate on the same weights, as a ratio.

    python benchmarks/bench_inference.py [--contexts 1024,4096,16384,65536] [--steps 32] [--rounds 5] [--skip-hf]
                                         [model.FIELD=value ...]

The 16k/1k ratio depends on how heavy the KV cache is next to the rest of a token's work: it also prints the KV
values an attention layer stores per token over the hidden size (this config: 1.0; Qwen3.5-397B-A17B: 2 KV heads
x 256 x 2 / 4096 = 0.25).
`model.hidden_size=512 model.num_key_value_heads=1 model.head_dim=64 model.mrope_section=4,2,2` gives a tiny model
with the flagship's proportion.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import qwax
from qwax.inference import Cache, cache_bytes, decode_step, init_cache, prefill
from qwax.options import RunOptions, split_overrides
from qwax.train.recipes import parse_model_override

HF_FIELDS = dict(vocab_size=1024, hidden_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
                 linear_value_head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                 shared_expert_intermediate_size=64, max_position_embeddings=131072)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def prefilled(graphdef, params, cfg, opts, context: int, chunk: int, steps: int) -> tuple[jax.Array, Cache, float]:
    """(logits, cache, prefill tokens/s) after a chunked prefill of `context` random tokens, with room for `steps`."""
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, context), dtype=np.int32)
    mask = np.ones_like(ids)
    # Compile the prefill chunk first so the throughput below is steady state.
    _, warm = prefill(graphdef, params, init_cache(cfg, opts, 1, context + steps + 1), ids[:, :chunk], mask[:, :chunk],
                      chunk)
    jax.block_until_ready(warm)
    del warm
    cache = init_cache(cfg, opts, 1, context + steps + 1)
    start = time.perf_counter()
    logits, cache = prefill(graphdef, params, cache, ids, mask, chunk)
    jax.block_until_ready(logits)
    return logits, cache, context / (time.perf_counter() - start)


def decode_ms(graphdef, params, state: list, steps: int) -> float:
    """ms per token of `steps` greedy decode steps from state = [logits, cache], which it advances."""
    logits, cache = state
    start = time.perf_counter()
    for _ in range(steps):
        logits, cache = decode_step(graphdef, params, cache, jnp.argmax(logits, -1).astype(jnp.int32))
    jax.block_until_ready(logits)
    state[:] = [logits, cache]
    return 1e3 * (time.perf_counter() - start) / steps


def hf_vs_qwax(new_tokens: int = 128) -> tuple[float, float]:
    import torch
    import transformers

    cfg = transformers.Qwen3_5MoeTextConfig(**HF_FIELDS, rope_parameters={
        "rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
        "mrope_interleaved": True})
    torch.manual_seed(0)
    hf = transformers.Qwen3_5MoeForCausalLM(cfg).eval()
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 32))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = qwax.load_hf(d)
    qwax.generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[])  # compile
    start = time.perf_counter()
    qwax.generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[])
    qwax_rate = new_tokens / (time.perf_counter() - start)
    with torch.no_grad():
        t = torch.as_tensor(ids)
        hf.generate(t, max_new_tokens=8, do_sample=False)
        start = time.perf_counter()
        hf.generate(t, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return qwax_rate, new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="1024,4096,16384,65536")
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk size")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed decode rounds per context, interleaved")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("overrides", nargs="*", help="model.FIELD=value")
    args = parser.parse_args()

    # Unrolled layers: a layer's own KV cache is then read in one pass, while a layer scan carries stacked caches
    # and slices (copies) its layer's blocks out of them (16k/1k measured 1.83 unrolled vs 2.22 scanned).
    fields = dict(HF_FIELDS, mrope_section=(2, 1, 1), mrope_interleaved=True, rope_theta=1e7, scan_layers=False)
    for item in args.overrides:
        name, value = parse_model_override(item, fields)
        fields[name] = value
    config_fields, option_fields = split_overrides(fields)
    cfg = qwax.QwaxConfig(model_type="qwen3_5_moe_text", **config_fields)
    opts = RunOptions(**option_fields)
    model = qwax.QwaxForCausalLM(cfg, opts, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    print(f"config: {cfg.num_hidden_layers} layers ({cfg.layer_types.count('full_attention')} attention), "
          f"hidden {cfg.hidden_size}, {cfg.num_experts} experts top-{cfg.num_experts_per_tok}; KV values per token "
          f"per attention layer / hidden = {2 * cfg.num_key_value_heads * cfg.head_dim / cfg.hidden_size:.2f}; "
          f"backend {jax.default_backend()}")
    contexts = [int(c) for c in args.contexts.split(",")]
    print(f"{'context':>8s} {'prefill tok/s':>14s} {'peak RSS GiB':>13s} {'cache B/token':>14s}")
    states = {}
    for context in contexts:
        logits, cache, rate = prefilled(graphdef, params, cfg, opts, context, min(args.chunk, context),
                                        args.rounds * args.steps + 1)
        print(f"{context:8d} {rate:14.0f} {peak_rss_gib():13.2f} {cache_bytes(cache) / context:14.0f}")
        states[context] = [logits, cache]
        decode_ms(graphdef, params, states[context], 1)  # compile this cache length's decode step
    # Rounds interleave the contexts, so a slow spell of a shared machine hits all of them alike; the minimum over
    # rounds is each context's undisturbed time (the median is printed beside it).
    times = {c: [] for c in contexts}
    for _ in range(args.rounds):
        for c in contexts:
            times[c].append(decode_ms(graphdef, params, states[c], args.steps))
    print(f"{'context':>8s} {'decode ms/token min':>20s} {'median':>7s}  ({args.rounds} rounds of {args.steps} steps)")
    for c in contexts:
        print(f"{c:8d} {min(times[c]):20.2f} {statistics.median(times[c]):7.2f}")
    if 1024 in times and 16384 in times:
        print(f"decode time per token 16k/1k: {min(times[16384]) / min(times[1024]):.2f} from the minima, "
              f"{statistics.median(times[16384]) / statistics.median(times[1024]):.2f} from the medians "
              "(target <= 1.5)")
    if not args.skip_hf:
        if args.overrides:
            parser.error("the transformers comparison uses the default config: pass --skip-hf with overrides")
        ours, theirs = hf_vs_qwax()
        print(f"decode tokens/s qwax {ours:.1f} vs transformers {theirs:.1f}: qwax/transformers = {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
