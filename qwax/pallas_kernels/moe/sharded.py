"""Routed experts under whatever mesh is active: the entry the MoE layer calls.

When the active mesh shards the experts (`qwax.sharding.expert_parallel.expert_mesh()`), tokens go to the
experts' devices with all_to_all (`qwax.sharding.expert_parallel.routed_experts`); otherwise every device runs
the routed experts it holds (`qwax.pallas_kernels.moe.routed_experts`). Same arguments and result either way.

Not imported by `qwax.pallas_kernels.moe` nor `qwax.pallas_kernels`: expert parallelism is built on the local
op, so this module sits above both.
"""

from __future__ import annotations

import jax

from qwax.pallas_kernels.moe import routed_experts
from qwax.sharding import expert_parallel


def sharded_routed_experts(x: jax.Array, expert_idx: jax.Array, expert_weights: jax.Array, w_gate_up: jax.Array,
                           w_down: jax.Array, *, impl: str = "auto") -> jax.Array:
    """`routed_experts` (x [T, H]; expert_idx, expert_weights [T, k]; w_gate_up [E, H, 2I]; w_down [E, I, H]
    -> [T, H]), expert-parallel when the active mesh shards the experts."""
    mesh = expert_parallel.expert_mesh()
    if mesh is not None:
        return expert_parallel.routed_experts(x, expert_idx, expert_weights, w_gate_up, w_down, mesh=mesh, impl=impl)
    return routed_experts(x, expert_idx, expert_weights, w_gate_up, w_down, impl=impl)
