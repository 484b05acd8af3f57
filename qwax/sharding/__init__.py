"""Device meshes, logical-axis sharding rules, expert parallelism, multi-host helpers and a memory planner.

    from qwax.sharding.init import init_sharded

    mesh = make_mesh("data=2,fsdp=2,expert=2")
    graphdef, params, shardings = init_sharded(cfg, mesh, "fsdp_ep")
    with use_sharding(mesh, "fsdp_ep"):
        loss = jax.jit(loss_fn, in_shardings=(shardings, batch_sharding))(params, batch)

The layers import this package (rules, expert_parallel), so it must not import the model: `init` (building a
model into its shards), `planner` (memory per device, `qwax plan`) and `multihost` are imported by name, e.g.
`from qwax.sharding.init import init_sharded`.
"""

from qwax.sharding.mesh import BATCH_AXES, MESH_AXES, abstract_mesh, make_mesh, parse_mesh_spec
from qwax.sharding.rules import (
    STRATEGIES,
    active_sharding,
    constrain,
    follow_params,
    get_rules,
    logical_sharding,
    param_shardings,
    param_specs,
    partition_spec,
    shard_shapes,
    tree_shardings,
    use_sharding,
)

__all__ = [
    "BATCH_AXES", "MESH_AXES", "STRATEGIES", "abstract_mesh", "active_sharding", "constrain", "follow_params",
    "get_rules", "logical_sharding", "make_mesh", "param_shardings", "param_specs",
    "parse_mesh_spec", "partition_spec", "shard_shapes", "tree_shardings", "use_sharding",
]
