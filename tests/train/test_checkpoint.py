"""Orbax checkpoints: an interrupted write leaves the last complete checkpoint usable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qwax.train.checkpoint import Checkpointer

BIG_BYTES = 16 * 1024 * 1024 * 4  # the step-2 parameters: 64 MiB of float32

# Saves a small complete checkpoint at step 1, then starts writing a large one at step 2 and stops inside that
# write at a chosen point (argv[2]), where it says so and waits to be killed:
#   "iterator": the first item written (the data iterator state): the temporary directory exists, no array yet;
#   "finalize": every array written into the temporary directory, the atomic rename to "2" still to come.
# Each point is a handler method orbax calls during the save; blocking there makes the kill land inside the
# write whatever the machine's speed.
WRITER = textwrap.dedent("""
    import sys, threading
    import grain, numpy as np, orbax.checkpoint as ocp
    from qwax.train.checkpoint import Checkpointer

    stop_at, armed = sys.argv[2], threading.Event()

    def stop_here(original):
        def wrapper(*args, **kwargs):
            if armed.is_set():
                print("inside the step-2 write", flush=True)
                threading.Event().wait()  # until killed
            return original(*args, **kwargs)
        return wrapper

    if stop_at == "iterator":
        grain.checkpoint.CheckpointHandler.save = stop_here(grain.checkpoint.CheckpointHandler.save)
    else:
        ocp.StandardCheckpointHandler.finalize = stop_here(ocp.StandardCheckpointHandler.finalize)
    ckpt = Checkpointer(sys.argv[1], every=1, keep=5)
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    next(it)
    small = {"w": np.arange(1000, dtype=np.float32)}
    ckpt.save(1, small, {"m": np.ones(3, np.float32)}, it)
    ckpt.wait()
    next(it)
    armed.set()
    big = {"w": np.random.default_rng(0).standard_normal((16, 1024, 1024), dtype=np.float32)}
    ckpt.save(2, big, {"m": np.zeros(3, np.float32)}, it)
    ckpt.wait()
    print("finished", flush=True)
""")


def _bytes_under(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@pytest.mark.parametrize("stop_at", ["iterator", "finalize"])
def test_interrupted_checkpoint_write_leaves_the_last_complete_checkpoint_usable(tmp_path, stop_at):
    directory = str(tmp_path / "checkpoints")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, directory, stop_at], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        line = proc.stdout.readline().strip()
        assert line == "inside the step-2 write", f"the writer did not stop inside the write: {line!r}"
        in_progress = [d for d in os.listdir(directory) if d.startswith("2") and d != "2"]
        assert in_progress and all("tmp" in d for d in in_progress), os.listdir(directory)
        written = _bytes_under(os.path.join(directory, in_progress[0]))
        if stop_at == "finalize":  # the arrays are all on disk (zstd shrinks random normals by ~8%), uncommitted
            assert written >= 0.8 * BIG_BYTES, written
        else:
            assert written < BIG_BYTES // 2, written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    leftovers = [d for d in os.listdir(directory) if d != "1"]
    assert "2" not in os.listdir(directory), "the killed write must not look complete"

    import grain
    ckpt = Checkpointer(directory, every=1, keep=5)
    assert ckpt.latest_step() == 1
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    params, opt_state, meta = ckpt.restore(1, {"w": np.zeros(1000, np.float32)}, {"m": np.zeros(3, np.float32)}, it)
    np.testing.assert_array_equal(params["w"], np.arange(1000, dtype=np.float32))
    np.testing.assert_array_equal(opt_state["m"], np.ones(3, np.float32))
    assert meta["step"] == 1 and next(it) == 1  # the iterator continues after the element read before step 1
    # Training goes on: the next save at step 2 succeeds despite the debris of the killed one.
    ckpt.save(2, params, opt_state, it)
    ckpt.close()
    assert Checkpointer(directory, every=1, keep=5).latest_step() == 2
    assert leftovers and all("tmp" in d for d in leftovers), leftovers
    assert sorted(os.listdir(directory)) == ["1", "2"]  # the debris was cleaned up when the manager reopened
