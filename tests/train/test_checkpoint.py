"""Orbax checkpoints: an interrupted write leaves the last complete checkpoint usable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from qwax.train.checkpoint import Checkpointer

# Saves a small complete checkpoint at step 1, then starts writing a large one at step 2 and is killed mid-way.
WRITER = textwrap.dedent("""
    import sys, numpy as np, grain
    from qwax.train.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], every=1, keep=5)
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    next(it)
    small = {"w": np.arange(1000, dtype=np.float32)}
    ckpt.save(1, small, {"m": np.ones(3, np.float32)}, it)
    ckpt.wait()
    next(it)
    big = {"w": np.random.default_rng(0).standard_normal((64, 1024, 1024), dtype=np.float32)}  # 256 MiB
    ckpt.save(2, big, {"m": np.zeros(3, np.float32)}, it)
    print("writing", flush=True)
    ckpt.wait()
    print("finished", flush=True)
""")


def test_interrupted_checkpoint_write_leaves_the_last_complete_checkpoint_usable(tmp_path):
    directory = str(tmp_path / "checkpoints")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, directory], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)  # the step-2 write is under way
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
    assert leftovers == [] or all("tmp" in d for d in leftovers), leftovers
