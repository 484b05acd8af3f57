"""Compile time of the forward pass vs depth: scanned layer groups vs unrolled layers.

Prints, for a tiny Qwen3.5-MoE-shaped config at 4 and 48 layers, the time to lower + compile the jitted forward
in each layout, and the 48/4 ratio (target for the scanned layout: < 3x).

    python benchmarks/bench_compile.py [--seq 64]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

import qwax


def compile_seconds(layers: int, scan: bool, seq: int) -> float:
    cfg = qwax.get_preset("tiny-moe", num_hidden_layers=layers)
    opts = qwax.RunOptions(scan_layers=scan)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: qwax.QwaxForCausalLM(cfg, opts, rngs=nnx.Rngs(0))))
    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    start = time.perf_counter()
    jax.jit(qwax.forward, static_argnums=0).lower(graphdef, params, ids).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    compile_seconds(4, True, args.seq + 1)  # warm up JAX itself (another shape: no cache hit below)
    print(f"{'layout':10s} {'4 layers':>10s} {'48 layers':>10s} {'48/4':>6s}")
    for scan in (True, False):
        t4, t48 = compile_seconds(4, scan, args.seq), compile_seconds(48, scan, args.seq)
        print(f"{'scanned' if scan else 'unrolled':10s} {t4:9.2f}s {t48:9.2f}s {t48 / t4:6.2f}")


if __name__ == "__main__":
    main()
