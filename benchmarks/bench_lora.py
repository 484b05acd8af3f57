"""LoRA vs full fine-tuning: step time and optimizer-state bytes of the same model and batch, measured in one run.

Model: bench_train's Qwen3.5-MoE shape (hidden 512, 8 layers of 3 Gated DeltaNet : 1 gated attention, 32 experts
top-4 of width 256 + a shared expert, vocab 8192; 120M parameters), or with `--tiny` the main job's (hidden 128,
4 layers, 8 experts top-2; 2.6M parameters, where fixed per-step costs dominate). Batch: 4 rows of 512 tokens,
float32, one device, unrolled layers.

Full fine-tuning differentiates every parameter and keeps AdamW moments for each; LoRA (rank 8, alpha 16, the
default targets: attention q/k/v/o, GDN projections, shared-expert MLPs) differentiates the adapters only, so no
weight gradient of the base is computed and the optimizer state covers the adapters alone. Both use the same
jitted qwax.train.step with the same loss.

Prints each side's median seconds/step, and last the two ratios:
`lora speedup (full s/step / lora s/step): X` and `lora optimizer state / full: Y`.

    python benchmarks/bench_lora.py [--steps 5] [--rank 8] [--tiny] [--seq 512] [--batch 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import qwax
from qwax.cpu_allocator import keep_freed_memory_for_benchmark
from qwax.layers.lora import LoRAConfig
from qwax.lora import apply_lora
from qwax.train.loop import split_trainable
from qwax.train.optim import make_optimizer
from qwax.train.recipes import get_recipe
from qwax.train.step import LossWeights, make_train_step

BENCH = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=8, full_attention_interval=4,
             num_attention_heads=8, num_key_value_heads=2, head_dim=64, linear_num_key_heads=4,
             linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64, num_experts=32,
             num_experts_per_tok=4, moe_intermediate_size=256, shared_expert_intermediate_size=256,
             mrope_section=(3, 3, 2))


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def measure(cfg: qwax.QwaxConfig, lora: LoRAConfig | None, batch: dict, steps: int) -> tuple[float, int, int]:
    """(median seconds per step, optimizer-state bytes, trained parameter count)."""
    model = qwax.QwaxForCausalLM(cfg, qwax.RunOptions(scan_layers=False), rngs=nnx.Rngs(0))
    if lora is not None:
        apply_lora(model, lora, seed=0)
    graphdef, params, frozen = split_trainable(model)
    opt = make_optimizer(learning_rate=1e-4, warmup_steps=0, total_steps=1000)
    opt_state = opt.init(params)
    state_bytes = nbytes(opt_state)
    trained = sum(x.size for x in jax.tree.leaves(params))
    step = jax.jit(make_train_step(graphdef, opt, LossWeights(cfg.router_aux_loss_coef)), donate_argnums=(0, 1))
    times = []
    for i in range(steps + 2):  # two warm-up steps: compile, then the allocator settles
        start = time.perf_counter()
        params, opt_state, m = step(params, opt_state, batch, jax.random.key(i), frozen)
        float(m["loss"])
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]), state_bytes, trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="the main job's model shape instead of bench_train's")
    args = parser.parse_args()
    keep_freed_memory_for_benchmark()
    recipe = get_recipe("tiny")
    cfg = recipe.model_config(recipe.vocab_size if args.tiny else 8192)
    if not args.tiny:
        cfg = cfg.replace(**BENCH)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (1, args.batch, args.seq + 1)).astype(np.int32)
    shape = (1, args.batch, args.seq)
    batch = {"input_ids": jnp.asarray(ids[..., :-1]), "targets": jnp.asarray(ids[..., 1:]),
             "segment_ids": jnp.ones(shape, jnp.int32),
             "position_ids": jnp.broadcast_to(jnp.arange(args.seq, dtype=jnp.int32), shape),
             "weights": jnp.ones(shape, jnp.float32)}
    n_params = cfg.param_count()[0]
    print(f"model: {n_params / 1e6:.2f}M parameters, batch {args.batch} x {args.seq} tokens, "
          f"{jax.devices()[0].platform}, float32")
    full_s, full_bytes, full_n = measure(cfg, None, batch, args.steps)
    print(f"full fine-tuning: {full_s:.3f} s/step, {full_n / 1e6:.2f}M trained, optimizer state "
          f"{full_bytes / 2**20:.1f} MiB")
    lora = LoRAConfig(rank=args.rank, alpha=2.0 * args.rank)
    lora_s, lora_bytes, lora_n = measure(cfg, lora, batch, args.steps)
    print(f"LoRA rank {args.rank}:      {lora_s:.3f} s/step, {lora_n / 1e6:.3f}M trained, optimizer state "
          f"{lora_bytes / 2**20:.2f} MiB")
    print(f"lora speedup (full s/step / lora s/step): {full_s / lora_s:.2f}")
    print(f"lora optimizer state / full: {lora_bytes / full_bytes:.4f}")


if __name__ == "__main__":
    main()
