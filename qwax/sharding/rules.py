"""Logical axis names -> mesh axes: the sharding strategies of qwax as tables.

Every parameter carries `logical_axes` (one name per dim; see qwax/layers). A rule table maps each logical name
to a tuple of mesh axes (qwax.sharding.mesh.MESH_AXES), outermost first; a strategy is nothing but such a table.
Resolving a name for one array dim (`partition_spec`) keeps, in order, the table's axes that
  * exist in the mesh with size > 1,
  * are not already used by an earlier dim of the same array (a mesh axis shards at most one dim), and
  * still divide the dim (the longest such prefix is kept, e.g. 2 KV heads are not split over tensor=4).
So one table serves every mesh, and the planner and the real placement always agree. A mesh axis dropped because
it does not divide the dim is logged once per process and case (logger "qwax.sharding", WARNING): the dim is then
replicated over that axis.

Building a model straight into its shards (`init_sharded`) lives in qwax.sharding.init: this module imports no
model code, because the layers import it.

Parameters of the scanned layer stack carry one extra leading dim (the layer-group axis) that is not in their
`logical_axes`; it is named "layers" here and never sharded (no pipeline parallelism).

Strategies (mesh axes data, fsdp, expert, context, tensor; an axis a strategy does not use should have size 1,
or it becomes one more data-parallel axis):
  fsdp        ZeRO-3: every weight sharded on its "embed" dim over fsdp; batch over data x fsdp.
  fsdp_tp     + tensor parallelism (Megatron): heads, MLP widths and the vocabulary over tensor.
  fsdp_ep     + expert parallelism: experts over expert; the expert axis also shards the batch and the dense
              weights (it is a data axis for everything but the routed experts); tokens reach their experts
              through all_to_all (qwax.sharding.expert_parallel).
  fsdp_ep_tp  both: experts over expert, each expert's width over tensor.

Every strategy also shards the sequence over `context` when the mesh has that axis (context parallelism:
"length" of activations and batches, "cache_len" of KV caches; qwax.sharding.context_parallel runs the Gated
DeltaNet and attention mixers across it), and the weights' "embed" dim over it as well, as over fsdp: the
context ranks hold different tokens, so for the weights they are one more data-parallel axis.

Activations and caches use the same mechanism with their own names (ACTIVATION_NAMES, CACHE_NAMES).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from qwax.sharding.mesh import BATCH_AXES, MESH_AXES, mesh_sizes

Rules = Mapping[str, tuple[str, ...]]

logger = logging.getLogger("qwax.sharding")
# (logical name, dim size, mesh axis, axis size) already reported by `partition_spec`: each is logged once per
# process, however many parameters, layers or jit traces hit it.
_REPORTED_DROPS: set[tuple[str, int, str, int]] = set()

# Logical names used by the parameters (qwax/layers) and the extra leading dim of scanned stacks.
PARAM_NAMES = ("layers", "vocab", "embed", "q_heads", "kv_heads", "heads", "mlp", "gdn_qkv", "gdn_heads", "conv",
               "norm", "experts_router", "experts", "expert_mlp", "mtp_concat")
# Main activations: [batch, length, act_embed] hidden states, [.., act_heads] attention / GDN heads,
# [.., act_mlp] MLP hidden, [.., act_vocab] logits.
ACTIVATION_NAMES = ("batch", "length", "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab")
# Inference caches: KV cache [layers, cache_batch, cache_len, cache_kv_heads, head_dim]; GDN recurrent state
# [layers, cache_batch, cache_heads, dk, dv] and conv state [layers, cache_batch, K, conv_dim] (conv_dim: None).
CACHE_NAMES = ("cache_batch", "cache_len", "cache_heads", "cache_kv_heads")

_TENSOR_PARAMS = ("vocab", "q_heads", "kv_heads", "heads", "mlp", "gdn_qkv", "gdn_heads")
_TENSOR_ACTS = ("act_heads", "act_kv_heads", "act_mlp", "act_vocab", "cache_heads", "cache_kv_heads")


def _table(embed: tuple[str, ...], experts: tuple[str, ...], tensor: bool) -> dict[str, tuple[str, ...]]:
    rules: dict[str, tuple[str, ...]] = {name: () for name in PARAM_NAMES + ACTIVATION_NAMES + CACHE_NAMES}
    rules.update(embed=embed + ("context",), mtp_concat=(), experts=experts, batch=BATCH_AXES,
                 cache_batch=BATCH_AXES, length=("context",), cache_len=("context",))
    if tensor:
        for name in _TENSOR_PARAMS + _TENSOR_ACTS + ("expert_mlp",):
            rules[name] = ("tensor",)
    return rules


STRATEGIES: dict[str, dict[str, tuple[str, ...]]] = {
    "fsdp": _table(embed=("fsdp",), experts=(), tensor=False),
    "fsdp_tp": _table(embed=("fsdp",), experts=(), tensor=True),
    # The expert axis is a data axis for dense weights, so they are sharded over it as well.
    "fsdp_ep": _table(embed=("fsdp", "expert"), experts=("expert",), tensor=False),
    "fsdp_ep_tp": _table(embed=("fsdp", "expert"), experts=("expert",), tensor=True),
}


def _as_axes(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = tuple(a for a in value.replace("+", ",").split(",") if a and a != "none")
    value = tuple(value)
    for axis in value:
        if axis not in MESH_AXES:
            raise ValueError(f"rule for logical name {name!r}: mesh axis {axis!r} is not one of {MESH_AXES}")
    return value


def get_rules(strategy: str | Rules = "fsdp", overrides: Mapping[str, Any] | str | None = None) -> Rules:
    """The rule table of a named strategy (or a table), with `overrides` replacing entries.

    overrides: {"vocab": ("tensor",), "embed": None} or the string "vocab=tensor,embed=fsdp+expert,norm=none".
    """
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise KeyError(f"unknown sharding strategy {strategy!r}; available: {sorted(STRATEGIES)}")
        rules = dict(STRATEGIES[strategy])
    else:
        rules = {k: _as_axes(v, k) for k, v in strategy.items()}
    if isinstance(overrides, str):
        parsed = {}
        for part in filter(None, (p.strip() for p in overrides.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"rule override {part!r}: expected NAME=AXIS[+AXIS...] or NAME=none")
            parsed[name.strip()] = value.strip()
        overrides = parsed
    for name, value in (overrides or {}).items():
        rules[name] = _as_axes(value, name)
    return rules


def partition_spec(logical_axes: tuple[str | None, ...], shape: tuple[int, ...], rules: Rules,
                   mesh: Mesh | AbstractMesh) -> PartitionSpec:
    """PartitionSpec of an array of `shape` whose dims are named `logical_axes` (see the module docstring).

    A shape with one more dim than names gets a leading "layers" dim (scanned layer stacks).
    """
    axes = tuple(logical_axes)
    if len(shape) == len(axes) + 1:
        axes = ("layers",) + axes
    if len(shape) != len(axes):
        raise ValueError(f"logical axes {logical_axes} do not match shape {tuple(shape)}")
    sizes = mesh_sizes(mesh)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis name {name!r} has no sharding rule; known: {sorted(rules)}")
        chosen: list[str] = []
        product = 1
        for axis in rules[name]:
            size = sizes.get(axis, 1)
            if size == 1 or axis in used:
                continue
            if dim % (product * size):
                if dim > 1:  # a single entry (one decoded token, one row) has nothing to split: no warning
                    _report_drop(name, dim, axis, size, tuple(chosen))
                break
            chosen.append(axis)
            product *= size
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _report_drop(name: str, dim: int, axis: str, size: int, kept: tuple[str, ...]) -> None:
    """Log (once per process and distinct case) that mesh axis `axis` does not divide a dim and is dropped.

    WARNING, so that `qwax plan` and training runs show it without any logging setup: the dim is then replicated
    over `axis`, which costs memory (e.g. 2 KV heads on tensor=4 are held whole by every tensor rank).
    """
    key = (name, int(dim), axis, int(size))
    if key in _REPORTED_DROPS:
        return
    _REPORTED_DROPS.add(key)
    sharded = f"sharded over {'x'.join(kept)} only" if kept else "not sharded"
    logger.warning("sharding: logical axis %r of size %d is not divisible by mesh axis %r (size %d): that dim is "
                   "%s (replicated over %r)", name, dim, axis, size, sharded, axis)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The `logical_axes` metadata of a parameter; a clear error for a variable without it."""
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
        raise ValueError(f"{type(variable).__name__} of shape {variable.get_value().shape} has no logical_axes "
                         "metadata: create parameters with qwax.layers.common.param")
    return tuple(axes)


def param_specs(params: nnx.State, rules: Rules, mesh: Mesh | AbstractMesh) -> nnx.State:
    """State of the same structure as `params` (concrete or abstract) with PartitionSpec values."""
    return jax.tree.map(
        lambda v: v.replace(partition_spec(logical_axes_of(v), v.get_value().shape, rules, mesh)),
        params, is_leaf=_is_variable)


def param_shardings(params: nnx.State, rules: Rules, mesh: Mesh | AbstractMesh) -> nnx.State:
    """State of the same structure as `params` with NamedSharding values: jit in/out_shardings, device_put."""
    return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, v.get_value())),
                        param_specs(params, rules, mesh), is_leaf=_is_variable)


def _value_of(x: Any) -> Any:
    return x.get_value() if _is_variable(x) else x


def follow_params(tree: Any, params: nnx.State, shardings: nnx.State, mesh: Mesh | AbstractMesh) -> Any:
    """Shardings for a pytree (optimizer state, gradients, EMA...) whose leaves mirror the parameters.

    A leaf whose key path ends with a parameter's key path and has its shape gets the parameter's sharding
    (AdamW moments, fp32 master copies, ...); every other leaf (step counts, scalars) is replicated.
    """
    by_path: dict[tuple, tuple[tuple[int, ...], Any]] = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(shardings)):
        by_path[tuple(path)] = (tuple(leaf.shape), sharding)
    depth = max((len(p) for p in by_path), default=0)
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        path, shape = tuple(path), tuple(getattr(leaf, "shape", ()))
        for start in range(max(0, len(path) - depth), len(path)):
            hit = by_path.get(path[start:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def shard_shapes(params: nnx.State, rules: Rules, mesh: Mesh | AbstractMesh) -> dict[tuple, tuple[int, ...]]:
    """{parameter path: per-device shard shape} (needs no devices: works on an AbstractMesh)."""
    shapes = {path: v.get_value().shape for path, v in nnx.to_flat_state(params)}
    return {path: v.get_value().shard_shape(shapes[path])
            for path, v in nnx.to_flat_state(param_shardings(params, rules, mesh))}


# ------------------------------------------------------------------ activations
_ACTIVE: contextvars.ContextVar[tuple[Mesh | AbstractMesh, Rules] | None] = contextvars.ContextVar(
    "qwax_sharding", default=None)


_CAPACITY: contextvars.ContextVar[float | None] = contextvars.ContextVar("qwax_expert_capacity", default=None)


@contextlib.contextmanager
def use_sharding(mesh: Mesh | AbstractMesh, rules: Rules | str = "fsdp", *,
                 expert_capacity_factor: float | None = None) -> Iterator[None]:
    """Activate a mesh and rule table for `constrain` and for expert parallelism in the MoE layers.

    Trace (call the jitted function for the first time) inside the block. Also sets jax's current mesh.
    expert_capacity_factor: all_to_all capacity of the expert-parallel MoE (None: exact, never drops a token;
    see qwax.sharding.expert_parallel).
    """
    rules = get_rules(rules) if isinstance(rules, str) else rules
    token = _ACTIVE.set((mesh, rules))
    capacity_token = _CAPACITY.set(expert_capacity_factor)
    try:
        if isinstance(mesh, Mesh):
            with jax.set_mesh(mesh):
                yield
        else:
            yield
    finally:
        _ACTIVE.reset(token)
        _CAPACITY.reset(capacity_token)


def active_sharding() -> tuple[Mesh | AbstractMesh, Rules] | None:
    """(mesh, rules) of the innermost `use_sharding` block, or None."""
    return _ACTIVE.get()


def active_capacity_factor() -> float | None:
    """expert_capacity_factor of the innermost `use_sharding` block (None: exact)."""
    return _CAPACITY.get()


def logical_sharding(logical_axes: tuple[str | None, ...], shape: tuple[int, ...], rules: Rules,
                     mesh: Mesh | AbstractMesh) -> NamedSharding:
    """NamedSharding of an activation or cache array whose dims are named `logical_axes`."""
    return NamedSharding(mesh, partition_spec(logical_axes, shape, rules, mesh))


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """`with_sharding_constraint` of x by its logical dim names under `use_sharding`; identity outside it.

    E.g. constrain(hidden, ("batch", "length", "act_embed")) in a layer.
    """
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, logical_sharding(logical_axes, x.shape, rules, mesh))


def _is_axes(x: Any) -> bool:
    return type(x) is tuple and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(tree: Any, logical_axes: Any, rules: Rules | str, mesh: Mesh | AbstractMesh) -> Any:
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) from a same-structure tree of logical-axis
    tuples, e.g. the inference cache with `qwax.inference.cache.cache_logical_axes(cache)`."""
    rules = get_rules(rules) if isinstance(rules, str) else rules
    return jax.tree.map(lambda axes, x: logical_sharding(axes, tuple(x.shape), rules, mesh), logical_axes, tree,
                        is_leaf=_is_axes)
