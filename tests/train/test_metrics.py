"""MFU's denominator: measured on the CPU, the published peak on accelerators (never a dispatch-bound matmul)."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import pytest

from qwax.train.metrics import PUBLISHED_PEAK_FLOPS, peak_flops


@pytest.mark.parametrize("kind, expected", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v6 lite", 918e12),
])
def test_accelerators_use_the_published_peak_of_their_kind(kind, expected):
    flops, source = peak_flops(SimpleNamespace(platform="gpu" if "NVIDIA" in kind else "tpu", device_kind=kind))
    assert flops == expected
    assert kind in source and "published" in source


def test_the_cpu_peak_is_measured_and_plausible():
    flops, source = peak_flops(jax.devices("cpu")[0])
    assert "measured" in source
    # A 2-core CPU does 1-1000 GFLOP/s; far below any accelerator entry.
    assert 1e9 < flops < min(f for _, f in PUBLISHED_PEAK_FLOPS)


def test_flops_per_token_counts_the_gdn_chunk_of_the_run_options():
    import qwax
    from qwax.train.metrics import flops_per_token
    cfg = qwax.get_preset("tiny-moe")  # 3 GDN layers of 4 value heads, dk = dv = 16
    seq = 256
    small = flops_per_token(cfg, seq, options=qwax.RunOptions(gdn_chunk_size=32))
    large = flops_per_token(cfg, seq, options=qwax.RunOptions(gdn_chunk_size=64))
    # Intra-chunk products: 2 * C * (3 dk + 2 dv) per value head and token, x3 for forward + backward.
    assert large - small == 3 * 3 * 4 * 2 * (64 - 32) * (3 * 16 + 2 * 16)
