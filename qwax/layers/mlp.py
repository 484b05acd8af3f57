"""Dense SwiGLU feed-forward (Qwen3.5 dense models, Qwen3-Next `mlp_only_layers`, and the MoE shared expert)."""

from __future__ import annotations

import jax
from flax import nnx

from qwax.config import QwaxConfig
from qwax.layers.common import Linear
from qwax.options import RunOptions


class MLP(nnx.Module):
    """y = down(silu(gate(x)) * up(x)); gate/up [H, I], down [I, H]."""

    def __init__(self, hidden: int, intermediate: int, *, cfg: QwaxConfig, opts: RunOptions, rngs: nnx.Rngs):
        self.gate_proj = Linear(hidden, intermediate, ("embed", "mlp"), cfg=cfg, opts=opts, rngs=rngs)
        self.up_proj = Linear(hidden, intermediate, ("embed", "mlp"), cfg=cfg, opts=opts, rngs=rngs)
        self.down_proj = Linear(intermediate, hidden, ("mlp", "embed"), cfg=cfg, opts=opts, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., H] -> [..., H]."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
