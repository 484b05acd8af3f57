"""Benchmark: qwax routed experts (impl="xla", the CPU path) vs transformers' Qwen3.5-MoE sparse block.

Shapes (defaults): 4096 tokens, hidden 512, expert width 256, top-8, E in {8, 64, 256}, float32.

What is timed (each jitted / run with torch.no_grad for forward; forward+backward = value and grads):

* ``qwax experts``: ``routed_experts(x, idx, w, w_gate_up, w_down, impl="xla")`` with the routing given.
* ``torch experts``: ``block.experts(x, idx, w)`` of ``Qwen3_5MoeSparseMoeBlock`` -- the same computation.
* ``qwax block`` / ``torch block``: the whole MoE block. For qwax it is built in this script with jnp
  around ``routed_experts``: router logits, softmax, top-k, renormalise, plus the shared SwiGLU expert
  with its sigmoid gate, i.e. the computation of ``Qwen3_5MoeSparseMoeBlock.forward``. Both sides use
  the same weights and the outputs are compared.

transformers runs with the experts implementation a loaded model uses by default ("grouped_mm"); pass
``--torch-experts eager`` for the per-expert Python loop. torch runs in float32 with its default
thread count. Timings are the minimum over ``--reps`` runs (the machines are shared and noisy; the
minimum is the least disturbed run), with all variants interleaved in each repetition so that load
changes hit them alike. Achieved GFLOP/s count the 3 expert matmuls, ``3 * 2 * T * k * H * I`` flops
forward and 3x that forward+backward, and are printed next to a 2048^3 f32 jnp matmul measured in the
same run.

Usage: python benchmarks/bench_moe.py [--experts 8 64 256] [--reps 5] [--no-torch]
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwax.cpu_allocator import keep_freed_memory_for_benchmark
from qwax.pallas_kernels.moe import routed_experts


def _timeit(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds over all threads) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0, time.process_time() - c0


def make_weights(rng: np.random.Generator, t: int, h: int, i: int, e: int, i_shared: int) -> dict[str, np.ndarray]:
    std = 0.02
    return {
        "x": rng.standard_normal((t, h)).astype(np.float32),
        "router": (rng.standard_normal((h, e)) * std).astype(np.float32),  # [H, E]
        "w_gate_up": (rng.standard_normal((e, h, 2 * i)) * std).astype(np.float32),
        "w_down": (rng.standard_normal((e, i, h)) * std).astype(np.float32),
        "shared_gate_up": (rng.standard_normal((h, 2 * i_shared)) * std).astype(np.float32),
        "shared_down": (rng.standard_normal((i_shared, h)) * std).astype(np.float32),
        "shared_gate": (rng.standard_normal((h, 1)) * std).astype(np.float32),
        "dy": rng.standard_normal((t, h)).astype(np.float32),
    }


def route(x: jax.Array, router: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Softmax over experts, top-k, renormalise (as Qwen3.5-MoE)."""
    probs = jax.nn.softmax(x @ router, axis=-1)
    top_w, top_i = jax.lax.top_k(probs, k)
    return top_i.astype(jnp.int32), top_w / jnp.sum(top_w, axis=-1, keepdims=True)


def qwax_block(p: dict, x: jax.Array, k: int) -> jax.Array:
    """The full MoE block with jnp around routed_experts (router + routed experts + gated shared expert)."""
    idx, w = route(x, p["router"], k)
    y = routed_experts(x, idx, w, p["w_gate_up"], p["w_down"], impl="xla")
    i_s = p["shared_down"].shape[0]
    hs = x @ p["shared_gate_up"]
    shared = (jax.nn.silu(hs[:, :i_s]) * hs[:, i_s:]) @ p["shared_down"]
    return y + jax.nn.sigmoid(x @ p["shared_gate"]) * shared


def build_torch_block(p: dict, h: int, i: int, e: int, k: int, i_shared: int, experts_impl: str):
    import torch
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

    cfg = Qwen3_5MoeTextConfig(
        hidden_size=h,
        moe_intermediate_size=i,
        num_experts=e,
        num_experts_per_tok=k,
        shared_expert_intermediate_size=i_shared,
    )
    cfg._experts_implementation = experts_impl
    block = Qwen3_5MoeSparseMoeBlock(cfg).float()
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    with torch.no_grad():
        # torch Linear / expert weights are [out, in]; ours are [in, out].
        block.gate.weight.copy_(t(p["router"].T))
        block.experts.gate_up_proj.copy_(t(p["w_gate_up"].transpose(0, 2, 1)))
        block.experts.down_proj.copy_(t(p["w_down"].transpose(0, 2, 1)))
        i_s = i_shared
        block.shared_expert.gate_proj.weight.copy_(t(p["shared_gate_up"][:, :i_s].T))
        block.shared_expert.up_proj.weight.copy_(t(p["shared_gate_up"][:, i_s:].T))
        block.shared_expert.down_proj.weight.copy_(t(p["shared_down"].T))
        block.shared_expert_gate.weight.copy_(t(p["shared_gate"].T))
    return block


def main() -> None:
    print(keep_freed_memory_for_benchmark())
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--shared-inter", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-experts", default="grouped_mm", help='transformers experts impl: "grouped_mm" | "eager"')
    args = ap.parse_args()
    t, h, i, k, i_s = args.tokens, args.hidden, args.inter, args.topk, args.shared_inter
    flops_fwd = 3 * 2 * t * k * h * i

    if not args.no_torch:
        import torch

        print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, experts impl={args.torch_experts}")
    print(f"jax {jax.__version__} on {jax.default_backend()}; T={t} H={h} I={i} k={k} shared I={i_s}; "
          f"min over {args.reps} interleaved reps")

    # ---- build every variant, check outputs, warm up (compile) --------------------------------------
    cases: dict[tuple, callable] = {}
    a2048 = jnp.asarray(np.random.default_rng(0).standard_normal((2048, 2048)), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    cases[("peak",)] = lambda: matmul(a2048)

    for e in args.experts:
        p_np = make_weights(np.random.default_rng(e), t, h, i, e, i_s)
        p = {n: jnp.asarray(v) for n, v in p_np.items()}
        idx, w = jax.jit(route, static_argnums=2)(p["x"], p["router"], k)

        experts_fwd = jax.jit(functools.partial(routed_experts, impl="xla"))

        @jax.jit
        def experts_fwd_bwd(x, idx, w, wgu, wd, dy):
            y, vjp = jax.vjp(lambda x, w, wgu, wd: routed_experts(x, idx, w, wgu, wd, impl="xla"), x, w, wgu, wd)
            return y, vjp(dy)

        block_fwd = jax.jit(qwax_block, static_argnums=2)

        @functools.partial(jax.jit, static_argnums=2)
        def block_fwd_bwd(p, x, k):
            y, vjp = jax.vjp(lambda p, x: qwax_block(p, x, k), p, x)
            return y, vjp(p["dy"])

        ea = (p["x"], idx, w, p["w_gate_up"], p["w_down"])
        cases[("qwax", "experts", "fwd", e)] = functools.partial(experts_fwd, *ea)
        cases[("qwax", "experts", "fwd+bwd", e)] = functools.partial(experts_fwd_bwd, *ea, p["dy"])
        cases[("qwax", "block", "fwd", e)] = functools.partial(block_fwd, p, p["x"], k)
        cases[("qwax", "block", "fwd+bwd", e)] = functools.partial(block_fwd_bwd, p, p["x"], k)

        if not args.no_torch:
            import torch

            block = build_torch_block(p_np, h, i, e, k, i_s, args.torch_experts)
            xt = torch.from_numpy(p_np["x"])
            dyt = torch.from_numpy(p_np["dy"])
            idx_t = torch.from_numpy(np.array(idx)).long()
            w_t = torch.from_numpy(np.array(w))

            def t_experts_fwd(block=block, xt=xt, idx_t=idx_t, w_t=w_t):
                with torch.no_grad():
                    return block.experts(xt, idx_t, w_t)

            def t_experts_fwd_bwd(block=block, xt=xt, idx_t=idx_t, w_t=w_t, dyt=dyt):
                x_ = xt.clone().requires_grad_(True)
                w_ = w_t.clone().requires_grad_(True)
                block.zero_grad(set_to_none=True)
                (block.experts(x_, idx_t, w_) * dyt).sum().backward()
                return x_.grad

            def t_block_fwd(block=block, xt=xt):
                with torch.no_grad():
                    return block(xt[None])

            def t_block_fwd_bwd(block=block, xt=xt, dyt=dyt):
                x_ = xt[None].clone().requires_grad_(True)
                block.zero_grad(set_to_none=True)
                (block(x_) * dyt).sum().backward()
                return x_.grad

            # Same weights and routing on both sides: the outputs must agree.
            y_q = np.asarray(experts_fwd(*ea))
            y_t = t_experts_fwd().numpy()
            b_q = np.asarray(block_fwd(p, p["x"], k))
            b_t = t_block_fwd()[0].numpy()
            print(f"E={e}: max|qwax - torch| experts {np.abs(y_q - y_t).max():.2e}, block {np.abs(b_q - b_t).max():.2e}")
            cases[("torch", "experts", "fwd", e)] = t_experts_fwd
            cases[("torch", "experts", "fwd+bwd", e)] = t_experts_fwd_bwd
            cases[("torch", "block", "fwd", e)] = t_block_fwd
            cases[("torch", "block", "fwd+bwd", e)] = t_block_fwd_bwd

    for fn in cases.values():  # compile / warm up
        jax.block_until_ready(fn())

    # ---- time, interleaved ---------------------------------------------------------------------------
    best = {key: float("inf") for key in cases}
    cpu = {key: float("inf") for key in cases}
    load0 = os.getloadavg()[0]
    for _ in range(args.reps):
        for key, fn in cases.items():
            wall, c = _timeit(fn)
            best[key], cpu[key] = min(best[key], wall), min(cpu[key], c)
    load1 = os.getloadavg()[0]

    peak = 2 * 2048**3 / best[("peak",)] / 1e9
    print(f"\nload average (1 min) before/after timing: {load0:.1f} / {load1:.1f} on {os.cpu_count()} cores")
    print(f"f32 matmul peak (jnp 2048^3): {peak:.0f} GFLOP/s")
    print("experts = routed experts only (same routing on both sides); block = whole sparse MoE block "
          "(router + routed experts + gated shared expert; qwax side built with jnp around routed_experts)")
    hdr = f"{'E':>4} {'pass':>8} | {'qwax experts':>22} | {'torch experts':>22} | {'torch/qwax':>10} | " \
          f"{'qwax block':>10} | {'torch block':>11} | {'torch/qwax':>10}"
    print(hdr)
    print("-" * len(hdr))
    for e in args.experts:
        for ps, mult in (("fwd", 1), ("fwd+bwd", 3)):
            q = best[("qwax", "experts", ps, e)]
            qb = best[("qwax", "block", ps, e)]
            gf = mult * flops_fwd / q / 1e9
            row = f"{e:>4} {ps:>8} | {q * 1e3:8.1f} ms {gf:5.0f} GF/s |"
            if not args.no_torch:
                tt = best[("torch", "experts", ps, e)]
                tb = best[("torch", "block", ps, e)]
                row += f" {tt * 1e3:8.1f} ms {mult * flops_fwd / tt / 1e9:5.0f} GF/s | {tt / q:9.2f}x |"
                row += f" {qb * 1e3:7.1f} ms | {tb * 1e3:8.1f} ms | {tb / qb:9.2f}x"
            else:
                row += f" {'-':>22} | {'-':>10} | {qb * 1e3:7.1f} ms |"
            print(row)
    # Process CPU time (all threads) is less disturbed by other jobs than wall time on a shared machine,
    # but counts spinning threads too (OpenMP in torch), so it is a hint, not the headline.
    print("\nprocess CPU seconds (min over reps), experts part:")
    for e in args.experts:
        row = "  ".join(
            f"{lib} {ps} {cpu[(lib, 'experts', ps, e)] * 1e3:7.0f} ms"
            for lib in (("qwax",) if args.no_torch else ("qwax", "torch"))
            for ps in ("fwd", "fwd+bwd")
        )
        print(f"  E={e:>3}: {row}")
    if 8 in args.experts and 64 in args.experts:
        for ps in ("fwd", "fwd+bwd"):
            r = best[("qwax", "experts", ps, 64)] / best[("qwax", "experts", ps, 8)]
            rc = cpu[("qwax", "experts", ps, 64)] / cpu[("qwax", "experts", ps, 8)]
            print(f"qwax experts {ps}: time(E=64) / time(E=8) = {r:.2f} wall, {rc:.2f} CPU time")


if __name__ == "__main__":
    main()
