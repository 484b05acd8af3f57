"""The implementation resolver shared by every op in qwax.pallas_kernels.

An op has some of these implementations: "reference" (plain JAX, the test oracle), "xla" (plain JAX written
for XLA's compilers, with per-platform variants inside the op) and "pallas" (Pallas kernels). Callers ask for
one of them or for "auto"; `resolve_impl` says which one runs:

    impl                 platform                 runs
    "auto"               TPU, Hopper GPU          "pallas" if the op has kernels that take the operands, else "xla"
    "auto"               CPU, other GPUs          "xla"
    "pallas" / "xla" /   any                      itself, when the op has it ("pallas" on the CPU runs the
    "reference"                                   kernels in interpret mode: tests only)

Layers pass the impl through unchanged (normally "auto"), so no layer branches on the platform.
"""

from __future__ import annotations

from collections.abc import Callable

from qwax.pallas_kernels.platform import pallas_platform

IMPLS = ("auto", "pallas", "xla", "reference")

# The implementations of each op (in IMPLS order, "auto" first).
OP_IMPLS: dict[str, tuple[str, ...]] = {
    "linear": ("auto", "xla", "reference"),
    "attention": ("auto", "xla", "reference"),
    "causal_conv": ("auto", "xla", "reference"),
    "gated_delta_rule": IMPLS,
    "moe": IMPLS,
}


def op_impls(op_name: str) -> tuple[str, ...]:
    """The impl names `op_name` accepts, "auto" first."""
    if op_name not in OP_IMPLS:
        raise ValueError(f"op_name={op_name!r}: expected one of {tuple(OP_IMPLS)}")
    return OP_IMPLS[op_name]


def resolve_impl(op_name: str, impl: str, platform: str | None = None, *,
                 pallas_takes: Callable[[str], bool] | None = None) -> str:
    """The implementation `op_name` runs for `impl` on `platform`: "pallas", "xla" or "reference".

    platform: "cpu" | "gpu" | "tpu", or None for the current devices (see `platform.pallas_platform`).
    pallas_takes: for "auto", whether the op's kernels of a family ("tpu" | "gpu") take the operands at hand
    (e.g. their dtypes); None: they take anything. Raises ValueError naming `impl` when the op lacks it.
    """
    impls = op_impls(op_name)
    if impl not in impls:
        raise ValueError(f"impl={impl!r} for the {op_name} op: expected one of {impls}")
    if impl != "auto":
        return impl
    family = pallas_platform(platform)
    if "pallas" in impls and family is not None and (pallas_takes is None or pallas_takes(family)):
        return "pallas"
    return "xla"
