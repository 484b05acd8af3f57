"""Training metrics: model FLOPs per token, the device's peak FLOP/s, MFU, and the metric sinks
(tqdm progress bar, WORKDIR/metrics.jsonl, TensorBoard event files).

Model FLOPs count the matmuls of one training step per token (forward x 3 for forward + backward), from the
config alone, as an MFU numerator should (recomputation from remat is not counted):
  * 2 x every weight matrix a token touches: attention and GDN projections, the router, the top-k routed
    experts and the shared expert (or the dense MLP), and the LM head; embedding lookups are free;
  * causal attention: QK^T and PV over on average (L+1)/2 keys: 2 * 2 * Nq * D * (L+1)/2 per layer;
  * the chunked gated delta rule with chunk C, per value head: 3 state products (W S, Q S, K^T V': 2*dk*dv each)
    and the intra-chunk products (K K^T, Q K^T, T(beta V), T(beta K), A V': ~2*C*(3*dk + 2*dv)).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from qwax.config import QwaxConfig
from qwax.options import RunOptions
from qwax.pallas_kernels.gated_delta_rule import default_chunk_size


def flops_per_token(cfg: QwaxConfig, seq_len: int, training: bool = True, *,
                    options: RunOptions | None = None) -> float:
    """Model FLOPs per token of one forward (training=False) or forward+backward (training=True) pass of
    `seq_len`-token rows; `options` (None: RunOptions()) gives the GDN kernel and chunk size."""
    opts = RunOptions() if options is None else options
    h = cfg.hidden_size
    attn_proj = h * cfg.num_attention_heads * cfg.head_dim * 2 + 2 * h * cfg.num_key_value_heads * cfg.head_dim \
        + cfg.num_attention_heads * cfg.head_dim * h
    gdn_proj = h * cfg.linear_conv_dim + h * cfg.linear_value_dim + 2 * h * cfg.linear_num_value_heads \
        + cfg.linear_value_dim * h
    moe = h * cfg.num_experts + cfg.num_experts_per_tok * 3 * h * cfg.moe_intermediate_size \
        + 3 * h * cfg.shared_expert_intermediate_size + h
    dense = 3 * h * cfg.intermediate_size
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    c = opts.gdn_chunk_size or default_chunk_size(opts.gdn_impl)
    attn_seq = 2 * 2 * cfg.num_attention_heads * cfg.head_dim * (seq_len + 1) / 2
    gdn_seq = cfg.linear_num_value_heads * (3 * 2 * dk * dv + 2 * min(c, seq_len) * (3 * dk + 2 * dv))
    fwd = 2 * h * cfg.vocab_size  # LM head
    for mixer, ffn in cfg.layer_kinds:
        if mixer == "full_attention":
            fwd += 2 * attn_proj + attn_seq
        else:
            fwd += 2 * gdn_proj + gdn_seq + 2 * cfg.linear_conv_dim * cfg.linear_conv_kernel_dim
        fwd += 2 * (moe if ffn == "moe" else dense)
    return float(3 * fwd if training else fwd)


@functools.lru_cache(maxsize=None)
def measure_peak_flops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of the default device on a [n, n] @ [n, n] matmul, best of `repeats` (cached per process).

    Measured at every start rather than stored: on a shared machine the peak available now is the honest
    denominator for the throughput measured now. On accelerators a 2048^3 matmul takes microseconds and
    measures dispatch, not the chip: use `peak_flops()`, which takes the published peak there."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    matmul = jax.jit(jnp.dot)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# Published dense bfloat16 peak FLOP/s of one JAX device (a TPU chip, a GPU), matched in this order as a
# substring of `device.device_kind` (e.g. "TPU v5 lite", "TPU v5", "NVIDIA H100 80GB HBM3").
PUBLISHED_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5", 459e12),  # v5p
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
    ("B200", 2250e12),
)


def peak_flops(device: jax.Device | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from), the denominator of MFU.

    CPU: measured now (`measure_peak_flops`). TPU/GPU: the published dense bf16 peak of the device kind; for a
    kind not in `PUBLISHED_PEAK_FLOPS`, an 8192^3 bfloat16 matmul, long enough that dispatch does not count.
    """
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measure_peak_flops(), "measured: float32 2048^3 matmul"
    kind = device.device_kind
    for name, flops in PUBLISHED_PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops, f"published bf16 peak of {kind}"
    return measure_peak_flops(8192, 5, "bfloat16"), f"measured: bf16 8192^3 matmul (no published peak for {kind!r})"


class MetricsLogger:
    """Writes one JSON object per line to WORKDIR/metrics.jsonl, TensorBoard scalars to WORKDIR/tensorboard,
    and shows a tqdm progress bar (only on process 0)."""

    def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 progress: bool = True):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)
        except ImportError:
            self.tb = None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                            mininterval=1.0)

    def write(self, step: int, values: dict[str, Any]) -> None:
        """Record `values` (floats) for `step` in the jsonl file and TensorBoard."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k.replace("eval_", "eval/") if k.startswith("eval_") else f"train/{k}",
                                       v, step)

    def progress(self, step: int, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
