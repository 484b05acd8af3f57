"""The one implementation resolver: impl x platform -> implementation, for every op."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from qwax.pallas_kernels.dispatch import OP_IMPLS, op_impls, resolve_impl
from qwax.pallas_kernels.gated_delta_rule import default_chunk_size
from qwax.pallas_kernels.moe.common import pallas_takes

KERNEL_OPS = ("gated_delta_rule", "moe")
XLA_OPS = ("linear", "attention", "causal_conv")


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_auto_picks_pallas_only_where_kernels_compile(platform):
    for op in KERNEL_OPS:
        assert resolve_impl(op, "auto", platform) == ("xla" if platform == "cpu" else "pallas")
    for op in XLA_OPS:
        assert resolve_impl(op, "auto", platform) == "xla"


def test_explicit_impls_run_as_asked_on_every_platform():
    for op, impls in OP_IMPLS.items():
        for impl in impls[1:]:
            for platform in ("cpu", "gpu", "tpu", None):
                assert resolve_impl(op, impl, platform) == impl


def test_auto_falls_back_to_xla_when_the_kernels_refuse_the_operands():
    f32 = lambda family: pallas_takes(family, (jnp.float32,))
    assert resolve_impl("moe", "auto", "gpu", pallas_takes=f32) == "xla"  # Hopper kernels: bf16 / f16 only
    assert resolve_impl("moe", "auto", "tpu", pallas_takes=f32) == "pallas"


def test_default_chunk_size_follows_the_resolved_impl():
    assert default_chunk_size("auto", "cpu") == 32
    assert default_chunk_size("pallas", "cpu") == 64
    assert default_chunk_size("auto", "tpu") == 64


def test_bad_names_raise_naming_the_argument():
    with pytest.raises(ValueError, match=r"impl='pallas' for the attention op: expected one of"):
        resolve_impl("attention", "pallas")
    with pytest.raises(ValueError, match="op_name='conv'"):
        op_impls("conv")
    with pytest.raises(ValueError, match="platform='cuda'"):
        resolve_impl("linear", "auto", "cuda")
