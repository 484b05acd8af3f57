"""Run options: how a model runs (dtypes, kernels, scan, remat), kept apart from `QwaxConfig`, which is what a
checkpoint's config.json holds.

Two models built from the same `QwaxConfig` with different `RunOptions` hold the same parameters (in different
dtypes, or stacked for `lax.scan`) and compute the same function.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import jax.numpy as jnp
import numpy as np

from qwax.pallas_kernels.dispatch import op_impls

KERNEL_IMPLS = ("auto", "pallas", "xla", "reference")
REMAT_NAMES = ("none", "full", "dots", "dots_no_batch")

# dtype spellings accepted wherever qwax takes a dtype, besides dtype objects (jnp.bfloat16, np.float32, ...).
_DTYPE_NAMES = {
    "float32": "float32", "f32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "f16": "float16", "fp16": "float16", "half": "float16",
}
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


def canonical_dtype(value: Any, name: str = "dtype") -> np.dtype:
    """A floating dtype qwax computes or stores in, from any dtype-like: jnp.bfloat16, np.float32, a numpy dtype,
    "bfloat16", "bf16", "fp32", "torch.float16"... Raises ValueError naming `name` and the value otherwise."""
    spelled = value
    if isinstance(value, str):
        spelled = _DTYPE_NAMES.get(value.lower().removeprefix("torch."), value)
    try:
        dtype = jnp.dtype(spelled)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}={value!r}: expected one of {SUPPORTED_DTYPES} (or a dtype object such as "
                         "jnp.bfloat16)")
    return dtype


class LayerPattern(Protocol):
    """What the run options need of a model config (a QwaxConfig); qwax.config imports this module."""

    num_hidden_layers: int

    @property
    def scan_period(self) -> int: ...


@dataclass(frozen=True)
class RunOptions:
    """How to run a model; nothing here is part of a checkpoint.

    dtype: activation / compute dtype; param_dtype: storage dtype of the parameters (None: `dtype`). A_log and
    the Gated DeltaNet output-norm weight stay float32 whatever these say, as in the published checkpoints.
    gdn_impl, moe_impl: kernel choice for the gated delta rule and the routed experts ("auto" picks per backend,
    see docs/architecture.md); gdn_chunk_size: chunk length of the chunked gated delta rule (None: the kernel's
    per-backend default). scan_layers: stack repeating layer groups and run them with `lax.scan` (compile time
    independent of depth). remat: rematerialisation policy of each scanned group or layer (REMAT_NAMES).
    linear_impl, attention_impl, conv_impl: implementation of every Linear, of the attention softmax and KV
    cache read, and of the GDN short conv ("auto", "xla" or "reference"; see `qwax.pallas_kernels.dispatch`).
    """

    dtype: Any = "float32"
    param_dtype: Any = None
    gdn_impl: str = "auto"
    moe_impl: str = "auto"
    gdn_chunk_size: int | None = None
    scan_layers: bool = True
    remat: str = "none"
    linear_impl: str = "auto"
    attention_impl: str = "auto"
    conv_impl: str = "auto"

    def __post_init__(self) -> None:
        dtype = canonical_dtype(self.dtype, "dtype")
        object.__setattr__(self, "dtype", dtype)
        param = dtype if self.param_dtype is None else canonical_dtype(self.param_dtype, "param_dtype")
        object.__setattr__(self, "param_dtype", param)
        for key in ("gdn_impl", "moe_impl"):
            if getattr(self, key) not in KERNEL_IMPLS:
                raise ValueError(f"run option {key}={getattr(self, key)!r}: expected one of {KERNEL_IMPLS}")
        for key, op in (("linear_impl", "linear"), ("attention_impl", "attention"), ("conv_impl", "causal_conv")):
            if getattr(self, key) not in op_impls(op):
                raise ValueError(f"run option {key}={getattr(self, key)!r}: expected one of {op_impls(op)}")
        size = self.gdn_chunk_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"run option gdn_chunk_size={size!r}: expected a positive int, or None for the "
                             "per-backend default")
        if self.remat not in REMAT_NAMES:
            raise ValueError(f"run option remat={self.remat!r}: expected one of {REMAT_NAMES}")

    def uses_scan(self, cfg: LayerPattern) -> bool:
        """True when the decoder stores stacked layer groups: scan_layers, and the layer pattern repeats."""
        return self.scan_layers and cfg.num_hidden_layers // cfg.scan_period > 1

    def replace(self, **changes: Any) -> "RunOptions":
        return dataclasses.replace(self, **changes)


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(RunOptions))


def split_overrides(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword overrides into (QwaxConfig fields, RunOptions fields), for the APIs that take both."""
    config = {k: v for k, v in overrides.items() if k not in OPTION_NAMES}
    options = {k: v for k, v in overrides.items() if k in OPTION_NAMES}
    return config, options
