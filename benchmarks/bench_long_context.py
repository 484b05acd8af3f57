"""Long context on the CPU: a 256k-token prefill in bounded memory, decoding at that context, and the extra work of
the context-parallel gated delta rule's prefix scan, measured in one run.

Part 1 (one device, this process): the hybrid `tiny-dense` preset (hidden 64, 3 Gated DeltaNet layers with a
constant-size state + 1 gated attention layer with a KV cache; random weights, float32, unrolled layers) prefills a
random prompt of --length tokens (batch 1) with qwax.inference.engine's chunked `prefill` into a cache preallocated
by `init_cache`, then runs greedy `decode_step`s. It does the same first for a prompt of --length / 4 tokens and
keeps a --short-token context beside them. For each long prompt it prints the chunk size, the prefill wall time
and tokens/s (compile excluded: one chunk is compiled into a throw-away cache first; the prompt goes through
`prefill` in 8 slices of whole chunks, carrying the cache, to print progress), the KV cache and GDN state bytes,
and the peak RSS of the process (getrusage ru_maxrss) before the prefill, once the cache is allocated and the
chunk compiled, and after the prefill, with the growth over the context's setup and prefill as "cache + X" (X:
this cache length's compiled programs and malloc arenas, less whatever reuses the freed memory of the previous
context, whose cache is gone by then).
Decode: the median ms/token over --steps steps (after warm-up), interleaved step by step with the short context,
and the ratio long / short.

Part 2 (a subprocess with 8 simulated CPU devices, --xla_force_host_platform_device_count=8): the gated delta
rule at B=1, L=--scan-length, Hk=2, Hv=4, dk=dv=128, float32, chunk 32, impl="xla", forward and forward+backward,
jitted: (a) the single-device sequential chunk scan `qwax.pallas_kernels.gated_delta_rule.gated_delta_rule`, and
(b) `qwax.sharding.context_parallel.gated_delta_rule` under `use_sharding(make_mesh("context=8"), "fsdp")` with the
inputs split over the `context` axis, which runs each shard's chunks twice (from zero, and from the identity with
v = 0 for the shard's affine map) plus a log-depth prefix scan over the shards. The 8 devices share this
machine's cores, so the process CPU time (all threads) of (b) is the total work of the 8 shards; (b)/(a) is the
extra work of the prefix scan, and (b)/8/(a) the work per device next to the one-device op, i.e. what a real
8-device mesh would spend per device, communication aside. Wall times (the median of --reps rounds after a
warm-up; a and b interleaved) are printed beside the CPU times. Here b/a comes out below the 2x of the two passes:
the one-device op spends 1.5-2x more CPU time per token at L=32768 than at L=4096 (11.5 us/token at 4096; likely
its intermediates outgrowing the CPU caches), which each shard's L/8 tokens avoid; the v = 0 pass costs as much as
the first (measured alone at L=4096).

    python benchmarks/bench_long_context.py [--tiny] [--length 262144] [--chunk 1024] [--steps 32]
                                            [--short 1024] [--scan-length 32768] [--reps 5] [--part all]

--tiny: --length 16384 and --scan-length 8192, about a minute. The default run takes 6.5-10 minutes on 2 cores: the
attention layer's prefill reads the whole cache written so far, so its cost grows with the square of the prompt.
Chunk 1024 was the fastest of 256-8192 here (64k prompt, one run: 17.8 s at 1024, 18.7 s at 512, 34 s at 2048,
44 s at 4096; at 16k, 8192 took 2.5x as long as 4096).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import qwax
from bench_gated_delta_rule import make_inputs
from qwax.inference.cache import Cache, cache_bytes, init_cache
from qwax.inference.engine import cache_length, decode_step, prefill, prefill_chunk_length
from qwax.layers.attention import KVCache
from qwax.layers.gated_deltanet import GDNState
from qwax.options import RunOptions

SCAN_DEVICES = 8
B, HK, HV, DK, DV = 1, 2, 4, 128, 128
SCAN_CHUNK = 32
PROGRESS_SLICES = 8
WARMUP_STEPS = 2
MiB = 2**20


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def part_bytes(cache: Cache, kind: type) -> int:
    """Bytes of the cache's per-layer entries of one type (KVCache or GDNState)."""
    return sum(cache_bytes(layer) for layer in cache.layers if isinstance(layer, kind))


# ------------------------------------------------------------------ part 1: prefill and decode


class Context:
    """A prompt prefilled into its own cache, ready to decode."""

    def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, cfg: qwax.QwaxConfig, opts: RunOptions,
                 length: int, chunk_size: int, new_tokens: int, progress: bool):
        self.graphdef, self.params = graphdef, params
        self.chunk = prefill_chunk_length(length, chunk_size)
        slots = cache_length(length, self.chunk, new_tokens)
        ids = np.random.default_rng(length).integers(0, cfg.vocab_size, (1, length), dtype=np.int32)
        mask = np.ones_like(ids)
        self.rss_before = peak_rss()
        # Compile this cache length's prefill chunk into a throw-away cache, so the timing below is steady state.
        _, warm = prefill(graphdef, params, init_cache(cfg, opts, 1, slots), ids[:, :self.chunk],
                          mask[:, :self.chunk], self.chunk)
        jax.block_until_ready(warm)
        del warm
        cache = jax.block_until_ready(init_cache(cfg, opts, 1, slots))
        self.rss_ready = peak_rss()
        # Slices of whole chunks; the first one takes the remainder, which `prefill` left-pads as a whole prompt.
        n_chunks = -(-length // self.chunk)
        per_slice = max(1, n_chunks // PROGRESS_SLICES) * self.chunk
        bounds = list(range(length, 0, -per_slice))[::-1]
        starts = [0] + bounds[:-1]
        start_time = time.perf_counter()
        for begin, end in zip(starts, bounds):
            logits, cache = prefill(graphdef, params, cache, ids[:, begin:end], mask[:, begin:end], self.chunk)
            if progress:
                jax.block_until_ready(logits)
                elapsed = time.perf_counter() - start_time
                print(f"    {end:>8d} / {length} tokens  {elapsed:7.1f} s  {end / elapsed:7.0f} tokens/s", flush=True)
        jax.block_until_ready(logits)
        self.prefill_s = time.perf_counter() - start_time
        self.rss_after = peak_rss()
        self.cache_bytes = cache_bytes(cache)
        self.kv_bytes = part_bytes(cache, KVCache)
        self.gdn_bytes = part_bytes(cache, GDNState)
        self.logits, self.cache = logits, cache
        self.step_ms: list[float] = []

    def step(self) -> None:
        """One greedy decode step, timed (block until its logits are ready)."""
        tokens = jnp.argmax(self.logits, -1).astype(jnp.int32)
        start = time.perf_counter()
        self.logits, self.cache = decode_step(self.graphdef, self.params, self.cache, tokens)
        jax.block_until_ready(self.logits)
        self.step_ms.append(1e3 * (time.perf_counter() - start))

    def decode_ms(self) -> float:
        """Median ms/token of the steps after the warm-up ones."""
        return statistics.median(self.step_ms[WARMUP_STEPS:])

    def release(self) -> None:
        """Free the cache."""
        del self.cache, self.logits


def interleaved_decode(contexts: list[Context], steps: int) -> None:
    """Warm-up and `steps` timed decode steps of each context, one context after the other at every step."""
    for _ in range(WARMUP_STEPS + steps):
        for c in contexts:
            c.step()


def run_prefill_part(args: argparse.Namespace) -> None:
    new_tokens = WARMUP_STEPS + args.steps
    lengths = [args.length // 4, args.length]
    cfg = qwax.get_preset("tiny-dense", max_position_embeddings=cache_length(args.length, args.chunk, new_tokens))
    opts = RunOptions(scan_layers=False)
    graphdef, params = nnx.split(qwax.QwaxForCausalLM(cfg, opts, rngs=nnx.Rngs(0)))
    kinds = [mixer for mixer, _ in cfg.layer_kinds]
    print(f"part 1: prefill and decode, tiny-dense ({cfg.param_count()[0] / 1e6:.2f}M parameters, hidden "
          f"{cfg.hidden_size}, {kinds.count('linear_attention')} GDN + {kinds.count('full_attention')} attention "
          f"layers, {cfg.num_key_value_heads} KV heads x {cfg.head_dim}), float32, batch 1, "
          f"{jax.device_count()} {jax.default_backend()} device", flush=True)
    # The short context decodes beside each long one.
    short = Context(graphdef, params, cfg, opts, args.short, args.chunk, len(lengths) * new_tokens, progress=False)
    print(f"  {args.short}-token context prefilled; peak RSS {peak_rss() / MiB:.0f} MiB")
    results = []
    for length in lengths:
        print(f"  prefill {length} tokens in chunks of {prefill_chunk_length(length, args.chunk)}:", flush=True)
        long = Context(graphdef, params, cfg, opts, length, args.chunk, new_tokens, progress=True)
        short.step_ms.clear()
        interleaved_decode([short, long], args.steps)
        growth = long.rss_after - long.rss_before
        print(f"  prompt {length} tokens, chunk {long.chunk}: prefill {long.prefill_s:.1f} s, "
              f"{length / long.prefill_s:.0f} tokens/s")
        print(f"    cache {long.cache_bytes / MiB:.2f} MiB: KV {long.kv_bytes / MiB:.2f} MiB "
              f"({long.kv_bytes / length:.0f} B/token), GDN state {long.gdn_bytes / 2**10:.1f} KiB (constant)")
        print(f"    peak RSS: before {long.rss_before / MiB:.0f} MiB, cache allocated + chunk compiled "
              f"{long.rss_ready / MiB:.0f} MiB, after prefill {long.rss_after / MiB:.0f} MiB "
              f"(prefill itself +{(long.rss_after - long.rss_ready) / MiB:.0f} MiB)")
        print(f"    peak RSS growth = {growth / MiB:.0f} MiB = cache {long.cache_bytes / MiB:.0f} MiB + "
              f"{(growth - long.cache_bytes) / MiB:.0f} MiB other (compiled programs, malloc arenas)")
        print(f"    decode {long.decode_ms():.2f} ms/token at {length} tokens vs {short.decode_ms():.2f} at "
              f"{args.short}: {long.decode_ms() / short.decode_ms():.2f}x (medians of {args.steps} interleaved "
              "steps)", flush=True)
        results.append((length, long.prefill_s, long.cache_bytes, growth, long.decode_ms() / short.decode_ms()))
        long.release()
    (l1, s1, c1, g1, r1), (l2, s2, c2, g2, r2) = results
    print(f"  {l2 // l1}x the prompt: prefill time {s2 / s1:.1f}x, cache {c2 / c1:.1f}x (+{(c2 - c1) / MiB:.0f} "
          f"MiB), peak RSS growth {g1 / MiB:.0f} -> {g2 / MiB:.0f} MiB ({(g2 - g1) / MiB:+.0f} MiB), decode "
          f"ms/token vs {args.short} tokens {r1:.2f}x -> {r2:.2f}x")


# ------------------------------------------------------------------ part 2: context-parallel prefix scan


def scan_fns(op: Callable) -> dict[str, Callable]:
    """Jitted forward and forward+backward of the gated delta rule `op` (chunk 32, impl "xla")."""
    def forward(q, k, v, g, beta):
        return op(q, k, v, g, beta, chunk_size=SCAN_CHUNK, impl="xla")

    def loss(q, k, v, g, beta):
        o, state = forward(q, k, v, g, beta)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(state**2)

    return {"fwd": jax.jit(forward), "fwd+bwd": jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))}


def timed(fn: Callable, args: tuple) -> tuple[float, float]:
    """(wall s, process CPU s over all threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - wall, time.process_time() - cpu


def run_scan_worker(args: argparse.Namespace) -> None:
    from jax.sharding import NamedSharding, PartitionSpec as P

    from qwax.pallas_kernels.gated_delta_rule import gated_delta_rule as sequential
    from qwax.sharding import context_parallel, make_mesh, use_sharding

    if jax.device_count() < SCAN_DEVICES:
        raise SystemExit(f"part 2 needs {SCAN_DEVICES} devices, found {jax.device_count()}: run it through "
                         "--part scan, which sets XLA_FLAGS for its subprocess")
    length = args.scan_length
    print(f"part 2: gated delta rule, B={B} L={length} Hk={HK} Hv={HV} dk={DK} dv={DV} float32, chunk {SCAN_CHUNK}, "
          f"impl xla; {jax.device_count()} simulated CPU devices on {os.cpu_count()} cores", flush=True)
    inputs = make_inputs(length, heads=(HK, HV), dims=(DK, DV))
    mesh = make_mesh(f"context={SCAN_DEVICES}")
    split = tuple(jax.device_put(x, NamedSharding(mesh, P(None, "context"))) for x in inputs)
    # Each side is traced and called in its own scope: under the mesh even the one-device op would be partitioned.
    sides = {"a": (scan_fns(sequential), inputs, contextlib.nullcontext),
             "b": (scan_fns(context_parallel.gated_delta_rule), split, lambda: use_sharding(mesh, "fsdp"))}
    with sides["b"][2]():
        if "collective_permute" not in sides["b"][0]["fwd"].lower(*split).as_text():
            raise SystemExit("the context-parallel gated delta rule lowered without a collective permute: it did "
                             "not run context-parallel")
    cases = {(side, name): (fn, a, scope) for side, (fns, a, scope) in sides.items() for name, fn in fns.items()}
    for fn, a, scope in cases.values():  # compile and warm up
        with scope():
            jax.block_until_ready(fn(*a))
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in cases}
    for _ in range(args.reps):  # interleaved rounds: a slow spell of a shared machine hits every case alike
        for key, (fn, a, scope) in cases.items():
            with scope():
                runs[key].append(timed(fn, a))
    wall = {key: statistics.median(w for w, _ in r) for key, r in runs.items()}
    cpu = {key: statistics.median(c for _, c in r) for key, r in runs.items()}
    print(f"  {'':>8} {'(a) 1 device':>21} {f'(b) context={SCAN_DEVICES}':>21} {'extra work b/a':>17} "
          f"{'per device':>11}")
    print(f"  {'pass':>8} {'wall s':>10} {'CPU s':>10} {'wall s':>10} {'CPU s':>10} {'CPU':>8} {'wall':>8} "
          f"{'b/8/a CPU':>11}")
    for name in ("fwd", "fwd+bwd"):
        a, b = ("a", name), ("b", name)
        extra = cpu[b] / cpu[a]
        print(f"  {name:>8} {wall[a]:>10.3f} {cpu[a]:>10.3f} {wall[b]:>10.3f} {cpu[b]:>10.3f} {extra:>7.2f}x "
              f"{wall[b] / wall[a]:>7.2f}x {extra / SCAN_DEVICES:>10.3f}x")
    print(f"  b/a: the {SCAN_DEVICES} shards together do b/a times the sequential scan's work (two chunk passes "
          f"each + the prefix scan); per device b/8/a, so a real {SCAN_DEVICES}-device mesh would run "
          f"{SCAN_DEVICES * cpu[('a', 'fwd')] / cpu[('b', 'fwd')]:.1f}x (fwd) / "
          f"{SCAN_DEVICES * cpu[('a', 'fwd+bwd')] / cpu[('b', 'fwd+bwd')]:.1f}x (fwd+bwd) faster than one device, "
          f"communication aside. CPU s (all threads) is the total work; wall s also depends on how many of the "
          f"{os.cpu_count()} cores were free. Medians of {args.reps} interleaved rounds.")


def run_scan_part(args: argparse.Namespace) -> None:
    """Part 2 in a subprocess: the device count must be set before JAX starts."""
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                      f" --xla_force_host_platform_device_count={SCAN_DEVICES}").strip())
    command = [sys.executable, os.path.abspath(__file__), "--scan-worker", "--scan-length", str(args.scan_length),
               "--reps", str(args.reps)]
    subprocess.run(command, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=262144, help="the long prompt's tokens (--length / 4 too)")
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk size")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per context")
    parser.add_argument("--short", type=int, default=1024, help="the short context decode is compared with")
    parser.add_argument("--scan-length", type=int, default=32768, help="L of the gated delta rule comparison")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds of the gated delta rule comparison")
    parser.add_argument("--part", choices=("all", "prefill", "scan"), default="all")
    parser.add_argument("--tiny", action="store_true", help="--length 16384 --scan-length 8192: a quick check")
    parser.add_argument("--scan-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.length, args.scan_length = 16384, 8192
    if args.scan_length % SCAN_DEVICES:
        parser.error(f"--scan-length must divide into {SCAN_DEVICES} shards")
    if args.scan_worker:
        run_scan_worker(args)
        return
    start = time.perf_counter()
    if args.part in ("all", "prefill"):
        run_prefill_part(args)
    if args.part in ("all", "scan"):
        run_scan_part(args)
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
