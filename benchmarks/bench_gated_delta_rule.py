"""Benchmark the gated delta rule: chunked impl="xla" against the per-token impl="reference", and impl="auto"
against transformers' own chunked implementation in torch.

Times the jitted forward and forward+backward at B=1, Hk=4, Hv=8, dk=dv=128, fp32, and prints the ratio
reference/xla measured in the same run, the achieved GFLOP/s of the chunked form next to the f32 matmul peak
measured at startup, the compiled temporary memory of forward+backward for both, and (unless --no-torch)
forward+backward of `transformers.models.qwen3_5.modeling_qwen3_5.torch_chunk_gated_delta_rule` (chunk 64, torch
float32, same inputs and loss) against qwax with default arguments. Run from the repository root:

    python -m benchmarks.bench_gated_delta_rule [--long] [--mem-len 16384] [--chunk-sizes default,64,32] [--no-torch]

The "default" row is `gated_delta_rule(q, k, v, g, beta)` with no other argument: impl="auto" and the per-backend
chunk length (`default_chunk_size()`, 32 on the CPU).

Timings are the best of --reps rounds after a warm-up; each round runs the reference and every xla variant
once, interleaved, so slow phases of a shared machine hit all of them alike. A run whose compiled temporaries
would not fit in half of this machine's memory is skipped (the reference's forward+backward at L=16384 needs
~27 GiB).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp

from qwax.cpu_allocator import keep_freed_memory_for_benchmark
from qwax.pallas_kernels import gated_delta_rule
from qwax.pallas_kernels.gated_delta_rule import default_chunk_size
from qwax.train.metrics import measure_peak_flops

B, HK, HV, DK, DV = 1, 4, 8, 128, 128


def make_inputs(length: int, seed: int = 0, heads: tuple[int, int] = (HK, HV), dims: tuple[int, int] = (DK, DV)
                ) -> tuple[jax.Array, ...]:
    """Random q, k (L2-normalised), v, g, beta of batch B, `length` tokens, heads (Hk, Hv), dims (dk, dv)."""
    (hk, hv), (dk, dv) = heads, dims
    ks = jax.random.split(jax.random.key(seed), 5)
    l2norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = l2norm(jax.random.normal(ks[0], (B, length, hk, dk)))
    k = l2norm(jax.random.normal(ks[1], (B, length, hk, dk)))
    v = jax.random.normal(ks[2], (B, length, hv, dv))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, length, hv)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, length, hv)))
    return q, k, v, g, beta


def _op_kwargs(impl: str, chunk_size: int | None) -> dict:
    # chunk_size None is the call with default arguments (impl="auto", the per-backend chunk length).
    return {} if chunk_size is None else dict(chunk_size=chunk_size, impl=impl)


def forward_fn(impl: str, chunk_size: int | None):
    def f(q, k, v, g, beta):
        return gated_delta_rule(q, k, v, g, beta, **_op_kwargs(impl, chunk_size))

    return jax.jit(f)


def forward_backward_fn(impl: str, chunk_size: int | None):
    def loss(q, k, v, g, beta):
        o, state = gated_delta_rule(q, k, v, g, beta, **_op_kwargs(impl, chunk_size))
        # Non-uniform weights so no gradient term cancels by symmetry.
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(state**2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def best_times_ms(fns: dict[str, object], args, reps: int) -> dict[str, float]:
    """Best wall time of each function over `reps` interleaved rounds, after one warm-up (compile) call each."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: t * 1e3 for name, t in best.items()}


def chunked_flops(length: int, c: int) -> float:
    """Matmul FLOPs of the chunked forward as executed (elementwise work ignored)."""
    c = min(c, length)
    n = -(-length // c)
    per_key_head = 2 * (2 * c * c * DK)  # K K^T and Q K^T
    per_value_head = (
        2 * c**3  # T = (I + M)^-1 by row substitution (each row multiplies the full [C, C] T)
        + 2 * c * c * (DV + DK)  # U = T (beta V) and W = T (... K)
        + 3 * (2 * c * DK * DV)  # W S, Q S and the state update K^T V'
        + 2 * c * c * DV  # intra-chunk attention times V'
    )
    return float(B * n * (HK * per_key_head + HV * per_value_head))


def torch_forward_backward_ms(inputs, reps: int) -> float:
    """Best wall time of transformers' torch chunked gated delta rule, forward + backward of the same loss."""
    import numpy as np
    import torch
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    tensors = [torch.from_numpy(np.array(x)) for x in inputs]

    def run():
        q, k, v, g, beta = (t.clone().requires_grad_() for t in tensors)
        o, state = torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=64, output_final_state=True)
        (torch.sum(o * torch.cos(o)) + torch.sum(state**2)).backward()

    run()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def temp_bytes(fn, args) -> int:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def main() -> None:
    print(keep_freed_memory_for_benchmark())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="also time L=16384")
    parser.add_argument("--mem-len", type=int, default=16384, help="L for the compiled memory comparison")
    parser.add_argument("--chunk-sizes", default="default,64,32",
                        help="comma-separated chunk sizes of the xla impl; 'default' is the call with default "
                             "arguments (impl='auto', the per-backend chunk length)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers (torch) comparison")
    args = parser.parse_args()
    chunk_sizes = [None if c == "default" else int(c) for c in args.chunk_sizes.split(",")]
    memory_budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2

    lengths = [1024, 4096] + ([16384] if args.long else [])
    print(f"gated delta rule, B={B} Hk={HK} Hv={HV} dk={DK} dv={DV} fp32, backend={jax.default_backend()}, "
          f"f32 matmul peak (jnp 2048^3) {measure_peak_flops() / 1e9:.0f} GFLOP/s")
    header = f"{'L':>6} {'pass':>8} {'chunk':>6} {'reference ms':>13} {'xla ms':>9} {'ref/xla':>8} {'xla GFLOP/s':>12}"
    print(header)
    print("-" * len(header))
    for length in lengths:
        inputs = make_inputs(length)
        # fwd+bwd FLOPs: forward, its recomputation inside the rematerialised backward, and ~2x for the backward.
        for name, make, flop_factor in (("fwd", forward_fn, 1.0), ("fwd+bwd", forward_backward_fn, 4.0)):
            fns = {c: make("xla", c) for c in chunk_sizes}
            ref_fn = make("reference", 64)
            ref_needs = temp_bytes(ref_fn, inputs)
            if ref_needs <= memory_budget:
                fns["reference"] = ref_fn
            ms = best_times_ms(fns, inputs, args.reps)
            ref_ms = ms.get("reference")
            ref_text = f"{ref_ms:.1f}" if ref_ms else f"skip:{ref_needs / 2**30:.0f}GiB"
            for c in chunk_sizes:
                ratio = f"{ref_ms / ms[c]:.2f}" if ref_ms else "-"
                size = default_chunk_size() if c is None else c
                gflops = flop_factor * chunked_flops(length, size) / (ms[c] * 1e-3) / 1e9
                label = f"{size}*" if c is None else str(c)
                print(f"{length:>6} {name:>8} {label:>6} {ref_text:>13} {ms[c]:>9.1f} {ratio:>8} {gflops:>12.1f}")
    print("* the call with default arguments: gated_delta_rule(q, k, v, g, beta)")

    if not args.no_torch:
        print(f"\nforward+backward vs transformers' torch_chunk_gated_delta_rule (chunk 64, torch "
              f"{__import__('torch').get_num_threads()} threads):")
        for length in lengths:
            inputs = make_inputs(length)
            qwax_ms = best_times_ms({"auto": forward_backward_fn("auto", None)}, inputs, args.reps)["auto"]
            torch_ms = torch_forward_backward_ms(inputs, args.reps)
            print(f"  L={length:>6}: qwax auto {qwax_ms:.1f} ms, transformers {torch_ms:.1f} ms, "
                  f"transformers/qwax {torch_ms / qwax_ms:.2f}")

    inputs = jax.eval_shape(lambda: make_inputs(args.mem_len))
    ref_bytes = temp_bytes(forward_backward_fn("reference", 64), inputs)
    xla_bytes = temp_bytes(forward_backward_fn("xla", chunk_sizes[0]), inputs)
    size = default_chunk_size() if chunk_sizes[0] is None else chunk_sizes[0]
    print(
        f"\nfwd+bwd compiled temp memory at L={args.mem_len} (chunk {size}): reference "
        f"{ref_bytes / 2**20:.1f} MiB, xla {xla_bytes / 2**20:.1f} MiB, reference/xla {ref_bytes / xla_bytes:.1f}x"
    )


if __name__ == "__main__":
    main()
