"""Several processes (hosts) as one JAX program: start-up, per-process data, checkpoints from every process.

Every process runs the same program; `jax.devices()` lists the devices of all processes and a mesh spans them,
while each process only touches its own (addressable) devices:

    multihost.initialize()                      # from flags or QWAX_* / JAX_* environment variables
    mesh = make_mesh("data=4,fsdp=-1")          # all devices of all processes
    rows = multihost.process_rows(batch_sharding, global_batch_size)   # the rows this process loads
    batch = multihost.global_array(load(rows), batch_sharding, (global_batch_size, seq))
    multihost.save_checkpoint(path, params)     # called by every process, each writes its shards

On CPU the collectives between processes go through gloo (jax's default), so the same code runs as several
local processes in the tests.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

ENV_COORDINATOR = ("QWAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
ENV_NUM_PROCESSES = ("QWAX_NUM_PROCESSES", "JAX_NUM_PROCESSES")
ENV_PROCESS_ID = ("QWAX_PROCESS_ID", "JAX_PROCESS_ID")


def _env(names: tuple[str, ...]) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None,
               auto: bool = False) -> bool:
    """Join the distributed runtime; returns True when running as several processes.

    Arguments default to QWAX_COORDINATOR_ADDRESS / QWAX_NUM_PROCESSES / QWAX_PROCESS_ID (or the JAX_* names).
    With none of them, `auto=True` lets jax detect the cluster (TPU pods, SLURM, Open MPI, Kubernetes);
    otherwise this is a single-process run and nothing happens. Call it before any other JAX call.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    coordinator_address = coordinator_address or _env(ENV_COORDINATOR)
    if num_processes is None and _env(ENV_NUM_PROCESSES) is not None:
        num_processes = int(_env(ENV_NUM_PROCESSES))
    if process_id is None and _env(ENV_PROCESS_ID) is not None:
        process_id = int(_env(ENV_PROCESS_ID))
    if coordinator_address is None:
        if not auto:
            return False
        jax.distributed.initialize(local_device_ids=local_device_ids)
        return jax.process_count() > 1
    if num_processes is None or process_id is None:
        raise ValueError(f"coordinator {coordinator_address!r} given, but num_processes={num_processes} and "
                         f"process_id={process_id}: set both (flags or QWAX_NUM_PROCESSES / QWAX_PROCESS_ID)")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
    return num_processes > 1


def process_rows(sharding: NamedSharding, global_batch: int, shape_tail: tuple[int, ...] = ()) -> np.ndarray:
    """Sorted indices of the batch rows (dim 0) that this process's devices hold under `sharding`.

    A data loader reads exactly these rows; `global_array` assembles them into the global batch.
    """
    rows: set[int] = set()
    index_map = sharding.addressable_devices_indices_map((global_batch,) + tuple(shape_tail))
    for index in index_map.values():
        rows.update(range(global_batch)[index[0]])
    return np.asarray(sorted(rows), dtype=np.int64)


def global_array(local_rows: np.ndarray, sharding: NamedSharding, global_shape: tuple[int, ...]) -> jax.Array:
    """The global batch array from each process's rows (`process_rows` order); every process calls it."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(local_rows), tuple(global_shape))


def _to_tree(tree: Any) -> Any:
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def save_checkpoint(directory: str | os.PathLike, tree: Any, *, force: bool = True) -> None:
    """Save a pytree of (sharded) arrays, or an nnx.State, with orbax. Every process must call it: each writes
    its own shards and process 0 the metadata. Returns when the checkpoint is complete on disk."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(os.fspath(directory)), _to_tree(tree), force=force)
        ckptr.wait_until_finished()


def restore_checkpoint(directory: str | os.PathLike, target: Any, shardings: Any = None) -> Any:
    """Restore a checkpoint into the structure of `target` (arrays or ShapeDtypeStructs, or an nnx.State).

    `shardings` (same structure, e.g. from `param_shardings`) places each array; by default the target arrays'
    own shardings are used. Every process calls it and reads only its shards. Returns the target's type.
    """
    import orbax.checkpoint as ocp

    shardings = target if shardings is None else shardings

    def abstract(leaf, sharding):
        sharding = sharding.sharding if hasattr(sharding, "sharding") and not isinstance(
            sharding, jax.sharding.Sharding) else sharding
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    abstract_tree = jax.tree.map(abstract, _to_tree(target), _to_tree(shardings))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.abspath(os.fspath(directory)), abstract_tree)
    if isinstance(target, nnx.State):
        out = jax.tree.map(lambda x: x, target)
        nnx.replace_by_pure_dict(out, restored)
        return out
    return restored
