"""Write a synthetic Qwen3.5-MoE safetensors checkpoint: random bf16 weights, the published key layout.

    python benchmarks/make_synthetic_checkpoint.py OUT [--gb 5] [--shard-size-gb 1]

Keys, shapes and dtypes are those of a published Qwen3.5-MoE text checkpoint (fused experts
`mlp.experts.gate_up_proj` [E, 2I, H], A_log and the GDN norm weight in float32, the rest bfloat16) at
Qwen3.5-35B-A3B widths (hidden 2048, 248320-token vocabulary, 512-wide experts); the number of experts and layers
is chosen so the checkpoint has about --gb gigabytes. Values are random bit patterns of finite bf16 numbers of
magnitude ~0.01, generated one tensor at a time (no model is built), so writing is limited by the disk.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np


def synthetic_config(gb: float = 5.0, *, hidden: int = 2048, vocab: int = 248320, moe_intermediate: int = 512,
                     layers: int = 8, full_attention_interval: int = 4):
    """A QwaxConfig at real widths whose checkpoint is about `gb` GB (experts chosen to fill the budget)."""
    from qwax import QwaxConfig

    def build(experts: int) -> QwaxConfig:
        return QwaxConfig(
            model_type="qwen3_5_moe_text", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
            full_attention_interval=full_attention_interval, num_attention_heads=16, num_key_value_heads=2,
            head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
            linear_value_head_dim=128, num_experts=experts, num_experts_per_tok=8,
            moe_intermediate_size=moe_intermediate, shared_expert_intermediate_size=moe_intermediate,
            tie_word_embeddings=False, rope_theta=10_000_000.0, mrope_section=(11, 11, 10))

    base = build(8)
    per_expert = 3 * hidden * moe_intermediate * 2 * layers  # bf16 bytes of one expert in every layer
    experts = max(8, int((gb * 1e9 - 2 * base.param_count()[0] + 8 * per_expert) // per_expert) // 8 * 8)
    return build(experts)


def checkpoint_tensors(cfg):
    """(key, shape, dtype) of every tensor, in checkpoint order: the parameters of a bf16 model (A_log and the GDN
    norm weight float32), unscanned, in the published layout."""
    from flax import nnx

    from qwax.convert.keymap import CheckpointLayout, hf_shape, slice_shape, tensor_maps
    from qwax.convert.placement import abstract_model
    from qwax.options import RunOptions

    _, abstract = abstract_model(cfg, RunOptions(dtype="bfloat16", scan_layers=False))
    params = {p: v.get_value() for p, v in nnx.to_flat_state(abstract)}
    for m in tensor_maps(cfg, CheckpointLayout.default_for(cfg), scanned=False):
        spec = params[m.path]
        yield m.hf_key, hf_shape(m, slice_shape(spec.shape, m.index)), np.dtype(spec.dtype)


def _random(shape, dtype, rng) -> np.ndarray:
    n = math.prod(shape)
    if dtype == np.float32:
        return rng.standard_normal(n, dtype=np.float32).reshape(shape) * np.float32(0.1)
    # bf16 bit patterns: random sign and mantissa, exponent fixed at 2^-7 (finite, ~0.008-0.016 in magnitude).
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16) & np.uint16(0x807F) | np.uint16(0x3C00)
    return bits.view(dtype).reshape(shape)


def make_checkpoint(out: str | Path, cfg, *, shard_bytes: int = 1 << 30, seed: int = 0) -> dict:
    """Writes config.json + sharded safetensors into `out` (atomically); returns a summary."""
    import ml_dtypes  # noqa: F401  (bf16 dtype)
    from qwax.convert.safetensors_io import atomic_directory, write_checkpoint

    out = Path(out)
    rng = np.random.default_rng(seed)
    entries = list(checkpoint_tensors(cfg))
    sizes = [math.prod(s) * d.itemsize for _, s, d in entries]
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(dtype="bfloat16"), indent=2) + "\n")
        write_checkpoint(tmp, ((k, _random(s, d, rng)) for k, s, d in entries), max_shard_bytes=shard_bytes)
    return {"tensors": len(entries), "bytes": sum(sizes), "largest_bytes": max(sizes),
            "largest": entries[int(np.argmax(sizes))][0], "files": len(list(out.glob("*.safetensors")))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--gb", type=float, default=5.0, help="approximate checkpoint size in GB")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shard-size-gb", type=float, default=1.0)
    parser.add_argument("--vocab", type=int, default=248320)
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args(argv)
    import ml_dtypes

    cfg = synthetic_config(args.gb, layers=args.layers, vocab=args.vocab, hidden=args.hidden)
    start = time.perf_counter()
    info = make_checkpoint(args.out, cfg, shard_bytes=int(args.shard_size_gb * 1e9))
    seconds = time.perf_counter() - start
    print(f"{args.out}: {info['tensors']} tensors, {info['bytes'] / 1e9:.2f} GB in {info['files']} shards "
          f"({cfg.num_experts} experts x {cfg.num_hidden_layers} layers); largest tensor {info['largest']} "
          f"{info['largest_bytes'] / 1e9:.2f} GB; written in {seconds:.1f} s", file=sys.stderr)
    del ml_dtypes
    return 0


if __name__ == "__main__":
    sys.exit(main())
