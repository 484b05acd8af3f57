"""Low-rank adapters (LoRA; Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen weight W [in, out] is adapted as W + s * A B with A [in, r], B [r, out] and r << min(in, out):

    h = x W + s * dropout(x) A B,        s = alpha / r    (rsLoRA, Kalajdzievski 2023: s = alpha / sqrt(r)).

A starts as PEFT's default (kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))) and B at zero, so
an attached adapter leaves the model's function unchanged until B is trained. qwax stores kernels as [in, out]
(the transpose of torch's [out, in] weight), so qwax's A is PEFT's lora_A.weight transposed, and B likewise.

Routed experts hold one weight per expert; their adapters hold per-expert factors A_e [in, r], B_e [r, out], and
the experts run with W_e + s * A_e B_e. That sum is formed on the fly (`ExpertsLoRA`): it materialises the
merged expert stack [E, in, out] once per forward (and its gradient in the backward), as PEFT's ParamWrapper does,
which costs one expert-stack-sized buffer but keeps the routed-experts kernels unchanged. Dropout cannot act on
the input of a merged weight, so expert adapters take none (PEFT refuses it too).

Dropout is pure-functional: a training step enters `lora_dropout(key)` while it traces the forward; outside such a
block (evaluation, inference) dropout is off. Each adapter folds its own `salt` (an int, stacked over the layer
groups of a scanned stack and distinct per group and per adapter) into the key, so no two adapters, and no two
scanned layer groups, draw the same mask.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["LoRAParam", "LoRASalt", "LoRAConfig", "LoRA", "ExpertsLoRA", "lora_dropout", "DEFAULT_TARGETS",
           "EXPERTS_TARGET", "KNOWN_TARGETS"]

# Hugging Face module names (the last component) of the Linear layers qwax adapts by default: attention q/k/v/o,
# the Gated DeltaNet projections (Qwen3.5's flat and Qwen3-Next's grouped layouts), the dense and shared-expert MLP.
DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj",
    "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "in_proj_qkvz", "in_proj_ba", "out_proj",
    "gate_proj", "up_proj", "down_proj",
)
# Adapts the routed experts (both the gate_up and the down stack); not a default, as it costs a merged expert stack.
EXPERTS_TARGET = "experts"
KNOWN_TARGETS: tuple[str, ...] = DEFAULT_TARGETS + (EXPERTS_TARGET,)


class LoRAParam(nnx.Param):
    """An adapter weight. A subclass of nnx.Param, so code handling every parameter (sharding, checkpoints) sees
    it; training selects the adapters with this type (qwax.lora.TRAINABLE)."""


class LoRASalt(nnx.Variable):
    """The int32 an adapter folds into the dropout key (not trained); shape = the layer-group lead dims."""


@dataclass(frozen=True)
class LoRAConfig:
    """rank r > 0; alpha: the scale numerator; targets: HF module names to adapt (DEFAULT_TARGETS, and
    EXPERTS_TARGET for the routed experts); dropout in [0, 1) on the adapter input (0 with "experts");
    use_rslora: scale by alpha / sqrt(r) instead of alpha / r."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRAConfig.rank={self.rank!r}: expected a positive int")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"LoRAConfig.alpha={self.alpha!r}: expected a finite number")
        object.__setattr__(self, "alpha", float(self.alpha))
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout={self.dropout!r}: expected a probability in [0, 1)")
        object.__setattr__(self, "dropout", float(self.dropout))
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets:
            raise ValueError(f"LoRAConfig.targets is empty: name at least one of {KNOWN_TARGETS}")
        unknown = [t for t in targets if t not in KNOWN_TARGETS]
        if unknown:
            raise ValueError(f"LoRAConfig.targets: unknown module name(s) {unknown}; known: {KNOWN_TARGETS}")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))  # drop repeats, keep order
        if EXPERTS_TARGET in self.targets and self.dropout:
            raise ValueError(f"LoRAConfig: target {EXPERTS_TARGET!r} needs dropout=0 (got {self.dropout}): "
                             "routed-expert adapters are merged into the expert weights, where no input dropout "
                             "can act (as PEFT's ParamWrapper)")

    @property
    def scaling(self) -> float:
        """s in W + s * A B: alpha / r, or alpha / sqrt(r) with use_rslora."""
        return scaling(self.alpha, self.rank, self.use_rslora)


def scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


# ------------------------------------------------------------------------------------------------- dropout
_DROPOUT_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("qwax_lora_dropout", default=None)


@contextlib.contextmanager
def lora_dropout(key: jax.Array | None) -> Iterator[None]:
    """Turn adapter dropout on (with `key`, a jax PRNG key) for forwards traced inside the block.

    Enter it inside the traced function (the train step), so the key is that trace's value. None, or no block:
    dropout is off.
    """
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


def _dropout(x: jax.Array, rate: float, salt: jax.Array) -> jax.Array:
    """Inverted dropout of x with the active key folded with `salt`; identity when off."""
    key = _DROPOUT_KEY.get()
    if key is None or rate == 0.0:
        return x
    if salt.ndim:
        raise ValueError(f"LoRA dropout: the adapter's salt has shape {salt.shape}, expected a scalar; run a "
                         "scanned stack through the decoder's scan, which slices its layer groups")
    keep = jax.random.bernoulli(jax.random.fold_in(key, salt), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


# ------------------------------------------------------------------------------------------------- adapters
class LoRA(nnx.Module):
    """The adapter of one weight W [*stack, in, out] (stack: () for a Linear, (E,) for routed experts).

    lora_a [*groups, *stack, in, r] (U(-1/sqrt(in), 1/sqrt(in))), lora_b [*groups, *stack, r, out] (zeros), salt
    [*groups] int32. `groups` are the layer-group dims of a scanned stack, not in the logical axes (as for every
    stacked parameter). `axes` = the base weight's logical axes (*stack_axes, in_axis, out_axis): lora_a is
    sharded as (*stack_axes, in_axis, None), lora_b as (*stack_axes, None, out_axis), i.e. along the base weight.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, scaling: float,
                 axes: tuple[str | None, ...], key: jax.Array, salt: jax.Array, groups: tuple[int, ...] = (),
                 stack: tuple[int, ...] = (), dropout: float = 0.0, param_dtype: jnp.dtype = jnp.float32,
                 dtype: jnp.dtype = jnp.float32):
        if len(axes) != len(stack) + 2:
            raise ValueError(f"LoRA: logical axes {axes} must name the stack dims {stack} and (in, out)")
        if tuple(jnp.shape(salt)) != tuple(groups):
            raise ValueError(f"LoRA: salt shape {tuple(jnp.shape(salt))}, expected the layer-group dims {groups}")
        if dropout and stack:
            raise ValueError("LoRA: routed-expert adapters take no dropout (it cannot act on a merged weight)")
        *stack_axes, in_axis, out_axis = axes
        lead = (*groups, *stack)
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)) on PEFT's [r, in] lora_A weight
        a = jax.random.uniform(key, (*lead, in_features, rank), jnp.float32, -bound, bound)
        self.lora_a = LoRAParam(a.astype(param_dtype), logical_axes=(*stack_axes, in_axis, None))
        self.lora_b = LoRAParam(jnp.zeros((*lead, rank, out_features), param_dtype),
                                logical_axes=(*stack_axes, None, out_axis))
        self.salt = LoRASalt(jnp.asarray(salt, jnp.int32), logical_axes=())
        self.rank, self.scaling, self.dropout, self.dtype = rank, float(scaling), float(dropout), dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> s * (dropout(x) @ A) @ B [..., out] in the compute dtype (a Linear's adapter)."""
        x = _dropout(x.astype(self.dtype), self.dropout, self.salt[...])
        h = jnp.matmul(x, self.lora_a[...].astype(self.dtype))
        # Scale the narrow [..., r] intermediate rather than the output: the same value, r/out of the work.
        return jnp.matmul(h * jnp.asarray(self.scaling, self.dtype), self.lora_b[...].astype(self.dtype))

    def delta(self, dtype: jnp.dtype | None = None, precision: jax.lax.Precision | None = None) -> jax.Array:
        """s * A @ B [*lead, in, out]: the update to add to the base weight (in `dtype`, default compute)."""
        dtype = self.dtype if dtype is None else dtype
        ab = jnp.matmul(self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype), precision=precision)
        return ab * jnp.asarray(self.scaling, dtype)


class ExpertsLoRA(nnx.Module):
    """Adapters of the routed experts: gate_up over experts_gate_up [E, H, 2I], down over experts_down [E, I, H]
    (either may be None, e.g. a PEFT adapter targeting one of the two stacks)."""

    def __init__(self, gate_up: LoRA | None, down: LoRA | None):
        if gate_up is None and down is None:
            raise ValueError("ExpertsLoRA needs an adapter for gate_up, down or both")
        self.gate_up = nnx.data(gate_up)
        self.down = nnx.data(down)

    def __call__(self, w_gate_up: jax.Array, w_down: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Effective expert weights W_e + s * A_e B_e, in the weights' dtype; materialises the merged stacks."""
        if self.gate_up is not None:
            w_gate_up = w_gate_up + self.gate_up.delta(w_gate_up.dtype)
        if self.down is not None:
            w_down = w_down + self.down.delta(w_down.dtype)
        return w_gate_up, w_down
