"""Training throughput: qwax's jitted train step vs transformers' training step, same config, same CPU.

Bench config (Qwen3.5-MoE shape): hidden 512, 8 layers (3 Gated DeltaNet : 1 gated attention, so 2 attention
layers), 32 experts top-4 of width 256 plus a shared expert of width 256, vocab 8192, one sequence of 2048
tokens, float32, unrolled layers, GDN chunks of 32. qwax: forward + backward + AdamW (clipping, weight decay) in
one jitted step (qwax.train.step). transformers: Qwen3_5MoeForCausalLM loaded from qwax's export of the same weights,
loss.backward() + torch.optim.AdamW, torch in float32 on the same threads.

Prints each side's steady-state seconds/step, tokens/s and MFU (model FLOPs from qwax.train.metrics.flops_per_token
over the highest f32 matmul peak measured before and after each side), then, last line:
`train tokens/s qwax/transformers: X`. Both sides run with the host allocator keeping freed memory
(qwax.cpu_allocator; QWAX_KEEP_FREED_MEMORY=0 for glibc's defaults).

    python benchmarks/bench_train.py [--steps 5] [--seq 2048] [--skip-hf] [model.FIELD=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import qwax
from qwax.cpu_allocator import keep_freed_memory_for_benchmark
from qwax.options import split_overrides
from qwax.train.metrics import flops_per_token, measure_peak_flops
from qwax.train.optim import make_optimizer
from qwax.train.recipes import parse_model_override
from qwax.train.step import LossWeights, make_train_step

BENCH = dict(model_type="qwen3_5_moe_text", vocab_size=8192, hidden_size=512, num_hidden_layers=8,
             full_attention_interval=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
             linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64,
             num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256, shared_expert_intermediate_size=256,
             mrope_section=(3, 3, 2), mrope_interleaved=True, max_position_embeddings=8192)
# Run options (qwax.RunOptions), overridable with model.FIELD=value like the config fields.
BENCH_OPTIONS = dict(dtype="float32", param_dtype="float32",
                     # CPU choices, measured on this config (seconds per step): unrolled layers 5.8 vs 6.7 scanned (the
             # scan copies each layer's weights out of the stack, and their gradients back, every step); GDN
             # chunks of 32 6.4 vs 6.7 with 64 (the xla path's intra-chunk work is cheaper at 32 on the CPU).
                     scan_layers=False, gdn_chunk_size=32)


def qwax_step_seconds(cfg: qwax.QwaxConfig, opts: qwax.RunOptions, ids: np.ndarray, steps: int
                      ) -> tuple[float, float, qwax.QwaxForCausalLM]:
    """(compile seconds, median steady-state seconds per step, model)."""
    model = qwax.QwaxForCausalLM(cfg, opts, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    opt = make_optimizer(learning_rate=1e-4, warmup_steps=0, total_steps=1000)
    step = jax.jit(make_train_step(graphdef, opt, LossWeights(cfg.router_aux_loss_coef), opts.dtype),
                   donate_argnums=(0, 1))
    b, l = ids.shape
    batch = {"input_ids": ids[None, :, :-1], "targets": ids[None, :, 1:],
             "segment_ids": np.ones((1, b, l - 1), np.int32),
             "position_ids": np.broadcast_to(np.arange(l - 1, dtype=np.int32), (1, b, l - 1)).copy(),
             "weights": np.ones((1, b, l - 1), np.float32)}
    p, s = jax.tree.map(jnp.copy, params), opt.init(params)  # the step donates its inputs; keep the model
    start = time.perf_counter()
    p, s, m = step(p, s, batch, jax.random.key(0))
    float(m["loss"])
    compile_s = time.perf_counter() - start
    for i in range(2):  # warm-up: the host allocator settles on reusing its freed blocks (qwax.cpu_allocator)
        p, s, m = step(p, s, batch, jax.random.key(i))
        float(m["loss"])
    times = []
    for i in range(steps):
        start = time.perf_counter()
        p, s, m = step(p, s, batch, jax.random.key(i))
        float(m["loss"])
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times), model


def transformers_step_seconds(model: qwax.QwaxForCausalLM, ids: np.ndarray, steps: int) -> float:
    import torch
    import transformers

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as d:
        qwax.save_hf(model, d)
        ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ref.train()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.1)
    x = torch.from_numpy(ids.astype(np.int64))

    def one():
        opt.zero_grad(set_to_none=True)
        loss = ref(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # labels are shifted inside the model
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        return float(loss)

    for _ in range(2):  # warm-up (allocations, optimizer state), as many steps as the qwax side after its compile
        one()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        one()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    print(keep_freed_memory_for_benchmark())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("overrides", nargs="*", help="model.FIELD=value config overrides (e.g. model.remat=dots)")
    args = parser.parse_args()
    fields = dict(BENCH, **BENCH_OPTIONS)
    for item in args.overrides:
        name, value = parse_model_override(item, fields)
        fields[name] = value
    config_fields, option_fields = split_overrides(fields)
    cfg, opts = qwax.QwaxConfig(**config_fields), qwax.RunOptions(**option_fields)
    tokens = args.seq
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, tokens + 1)).astype(np.int32)
    # The matmul peak is measured before and after each side and the highest is used: one short measurement
    # on a shared machine can land in a slow moment, which would inflate MFU.
    peaks = [measure_peak_flops()]
    fpt = flops_per_token(cfg, tokens, options=opts)
    total, active = cfg.param_count()
    print(f"bench config: {total / 1e6:.1f}M params ({active / 1e6:.1f}M active), seq {tokens}, "
          f"model FLOPs/token {fpt / 1e6:.1f}M; f32 matmul peak {peaks[0] / 1e9:.1f} GFLOP/s")
    compile_s, q_s, model = qwax_step_seconds(cfg, opts, ids, args.steps)
    peaks.append(measure_peak_flops.__wrapped__())
    q_tps = tokens / q_s

    def qwax_line(peak: float) -> str:
        return (f"qwax         {q_s:7.3f} s/step  {q_tps:8.1f} tokens/s  MFU {fpt * q_tps / peak:6.1%}  "
                f"(compile {compile_s:.1f} s; gdn_impl={opts.gdn_impl}, moe_impl={opts.moe_impl}, remat={opts.remat})")

    print(qwax_line(max(peaks)), flush=True)
    if args.skip_hf:
        return
    t_s = transformers_step_seconds(model, ids, args.steps)
    peaks.append(measure_peak_flops.__wrapped__())
    peak = max(peaks)
    t_tps = tokens / t_s
    print(f"peak {peak / 1e9:.1f} GFLOP/s (highest of {', '.join(f'{p / 1e9:.0f}' for p in peaks)})")
    print(qwax_line(peak))  # again, with the final peak: transformers' warnings came in between
    print(f"transformers {t_s:7.3f} s/step  {t_tps:8.1f} tokens/s  MFU {fpt * t_tps / peak:6.1%}")
    print(f"train tokens/s qwax/transformers: {q_tps / t_tps:.2f}")


if __name__ == "__main__":
    main()
