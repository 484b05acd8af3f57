"""Orbax checkpoints of a training run: params, optimizer state, step, and the grain iterator state.

`WORKDIR/checkpoints/STEP/` holds one checkpoint: `params` and `opt_state` (orbax PyTree, float32 master
weights), `data` (the grain iterator state, one JSON file per process) and `meta` (step, recipe name). Saves are
asynchronous: the step loop continues while tensorstore writes. Orbax writes each checkpoint into a temporary
directory and renames it only when every item is complete, so a write interrupted mid-way (a crash, SIGKILL)
leaves no STEP directory, and `latest_step` still names the last complete checkpoint; leftover temporary
directories are removed when the next run opens the manager.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class _IteratorSnapshot:
    """The iterator state taken at save time: the async writer must not see the iterator move on."""

    def __init__(self, iterator: Any):
        self._state = json.dumps(iterator.get_state()).encode()

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    """Save every `every` steps (asynchronously), keep the last `keep`, restore the latest complete one."""

    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(1, every), enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, data_iterator: Any, meta: dict | None = None,
             force: bool = False) -> bool:
        """Start saving the state after `step` steps if it is a save step (or `force`); True if started."""
        if not force and (self.every <= 0 or step % self.every):
            return False
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator)),
            meta=ocp.args.JsonSave({"step": step, **(meta or {})}))
        return self.manager.save(step, args=args, force=True)

    def restore(self, step: int, params_like: Any, opt_state_like: Any, data_iterator: Any) -> tuple[Any, Any, dict]:
        """(params, opt_state, meta) of checkpoint `step`; `data_iterator` is moved to the saved position.
        *_like: pytrees of arrays or jax.ShapeDtypeStruct giving structure, shapes, dtypes (and shardings)."""
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(params_like)),
            opt_state=ocp.args.StandardRestore(abstract(opt_state_like)),
            data=grain.checkpoint.CheckpointRestore(data_iterator), meta=ocp.args.JsonRestore()))
        return out.params, out.opt_state, dict(out.meta)

    def wait(self) -> None:
        """Block until pending asynchronous saves are complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
