"""Expert parallelism: routed experts sharded over the `expert` mesh axis, tokens moved with all_to_all.

With `ep` expert shards, shard r holds experts [r * E/ep, (r+1) * E/ep). Inside a shard_map over the whole mesh
each device holds its own tokens (the batch is split over data x fsdp x expert, and each row over context) and:

  1. dispatch: lays its token-slots (token, choice) out in a send buffer [ep, C, H], block d holding the slots
     routed to experts of shard d (in slot order), and exchanges the blocks with `all_to_all` over `expert`;
  2. compute: runs its local experts on the received rows with `qwax.pallas_kernels.moe.routed_experts`
     (k = 1, weight 1; empty rows carry an out-of-range expert id and contribute nothing);
  3. combine: sends the rows back with a second `all_to_all` and sums each token's k rows with its router
     weights.

C, the rows per (source, destination) block, is static. By default it is the worst case (every slot of a shard
going to one destination, C = T_local * k): no token is ever dropped and the result equals the unsharded layer,
at the price of ep x larger buffers. `capacity_factor=f` sets C = ceil(f * T_local * k / ep) and drops the slots
beyond it (they contribute zero, as in capacity-limited MoE training).

With tensor parallelism (a `tensor` axis > 1 dividing the expert width I) each expert's gate/up columns and
down rows are split over tensor; every tensor rank computes a partial output for the same tokens, summed by a
psum. When the tokens cannot be split evenly over the batch axes (e.g. decoding one sequence), every device
keeps all tokens, runs only its local experts, and the partial outputs are summed over `expert` (no all_to_all).

Gradients come from autodiff through shard_map (all_to_all transposes to all_to_all). The shard_maps run with
check_vma=False because the per-shard kernels' loop carries are not annotated with varying mesh axes; the
tests compare forward and gradients with the unsharded layer on 8 devices for every mesh layout used here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from qwax.pallas_kernels.moe import routed_experts as routed_experts_local
from qwax.sharding.mesh import BATCH_AXES, mesh_sizes
from qwax.sharding.rules import active_capacity_factor, active_sharding


def expert_mesh() -> Mesh | AbstractMesh | None:
    """The active mesh if it shards experts (an `expert` axis > 1 and rules mapping "experts" to it), else None.

    The mesh comes from `qwax.sharding.use_sharding`, or else from jax's current mesh (`jax.set_mesh`).
    """
    active = active_sharding()
    if active is not None:
        mesh, rules = active
        if "expert" not in rules.get("experts", ()):
            return None
    else:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty:
            return None
    return mesh if mesh_sizes(mesh).get("expert", 1) > 1 else None


def routed_experts(x: jax.Array, expert_idx: jax.Array, expert_weights: jax.Array, w_gate_up: jax.Array,
                   w_down: jax.Array, *, mesh: Mesh | AbstractMesh, impl: str = "auto",
                   capacity_factor: float | None = None) -> jax.Array:
    """Expert-parallel `qwax.pallas_kernels.moe.routed_experts` (same arguments and result) over `mesh`.

    x [T, H]; expert_idx, expert_weights [T, k]; w_gate_up [E, H, 2I] (gate columns, then up); w_down [E, I, H].
    E must be divisible by the mesh's `expert` size. capacity_factor defaults to the one given to
    `use_sharding` (None: exact). Returns [T, H] in x.dtype.
    """
    if capacity_factor is None:
        capacity_factor = active_capacity_factor()
    sizes = mesh_sizes(mesh)
    ep, tp = sizes.get("expert", 1), sizes.get("tensor", 1)
    e, h, i2 = w_gate_up.shape
    i = i2 // 2
    if e % ep:
        raise ValueError(f"num_experts={e} is not divisible by the mesh's expert axis ({ep})")
    t, k = expert_idx.shape
    e_local = e // ep
    split_width = tp > 1 and i % tp == 0
    tensor = "tensor" if split_width else None
    # [E, H, 2, I]: splitting I over tensor keeps each rank's gate and up columns together.
    w_gate_up = w_gate_up.reshape(e, h, 2, i)
    w_specs = (P("expert", None, None, tensor), P("expert", tensor, None))
    # Tokens [B * L] come split over the batch axes and, with context parallelism, over context within a row.
    token_axes = tuple(a for a in BATCH_AXES + ("context",) if sizes.get(a, 1) > 1)
    shards = math.prod(sizes[a] for a in token_axes)

    def local_weights(wgu, wd):
        return wgu.reshape(wgu.shape[0], h, -1).astype(x.dtype), wd.astype(x.dtype)

    def reduce_tensor(y):
        return jax.lax.psum(y, "tensor") if split_width else y

    if t % shards == 0 and "expert" in token_axes:
        t_local = t // shards
        s = t_local * k
        capacity = s if capacity_factor is None else max(1, min(s, math.ceil(capacity_factor * s / ep)))

        def dispatch_compute_combine(x, idx, weights, wgu, wd):
            wgu, wd = local_weights(wgu, wd)
            flat = idx.reshape(s)
            valid = (flat >= 0) & (flat < e)
            dest = jnp.where(valid, flat // e_local, ep)  # ep: dropped
            onehot = jax.nn.one_hot(dest, ep, dtype=jnp.int32)  # [S, ep]; dropped slots are all-zero rows
            pos = jnp.sum((jnp.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)  # rank within destination
            keep = valid & (pos < capacity)
            sentinel = ep * capacity
            buf_index = jnp.where(keep, dest * capacity + pos, sentinel)
            slot_of_buf = jnp.full((sentinel + 1,), s, jnp.int32).at[buf_index].set(
                jnp.arange(s, dtype=jnp.int32))[:sentinel]
            send_x = jnp.take(x, slot_of_buf // k, axis=0, mode="fill", fill_value=0)
            local_id = jnp.take(flat % e_local, slot_of_buf, mode="fill", fill_value=e_local)
            recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0, tiled=True)
            recv_id = jax.lax.all_to_all(local_id, "expert", 0, 0, tiled=True)
            rows = routed_experts_local(recv_x, recv_id[:, None], jnp.ones((sentinel, 1), x.dtype), wgu, wd,
                                        impl=impl)
            back = jax.lax.all_to_all(rows, "expert", 0, 0, tiled=True)
            per_slot = jnp.take(back, buf_index, axis=0, mode="fill", fill_value=0).reshape(t_local, k, h)
            y = jnp.einsum("tkh,tk->th", per_slot.astype(jnp.float32), weights.astype(jnp.float32))
            return reduce_tensor(y).astype(x.dtype)

        tokens = P(token_axes, None)
        fn = jax.shard_map(dispatch_compute_combine, mesh=mesh, in_specs=(tokens, tokens, tokens) + w_specs,
                           out_specs=tokens, check_vma=False)
        return fn(x, expert_idx, expert_weights, w_gate_up, w_down)

    def local_experts_only(x, idx, weights, wgu, wd):
        wgu, wd = local_weights(wgu, wd)
        local = idx - jax.lax.axis_index("expert") * e_local
        local = jnp.where((local >= 0) & (local < e_local), local, e_local)  # other shards' experts: dropped
        y = routed_experts_local(x, local, weights, wgu, wd, impl=impl).astype(jnp.float32)
        return jax.lax.psum(reduce_tensor(y), "expert").astype(x.dtype)

    fn = jax.shard_map(local_experts_only, mesh=mesh, in_specs=(P(), P(), P()) + w_specs, out_specs=P(), check_vma=False)
    return fn(x, expert_idx, expert_weights, w_gate_up, w_down)
