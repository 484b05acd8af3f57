"""`train()` with a recipe mesh on 8 simulated CPU devices: the per-step losses equal the single-device run's,
parameters and optimizer state are really sharded, and a sharded run resumes from its checkpoint exactly.

The pytest process has one device (tests/conftest.py), so the runs happen in a subprocess: this file run as a
script (`python test_sharded_training.py WORKDIR`) prints `RESULT {json}`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

# Multi-device training runs in subprocesses: the slow tier.
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

HERE = os.path.dirname(os.path.abspath(__file__))
# (mesh, strategy): data + fsdp + Megatron tensor parallelism; and expert parallelism (all_to_all) with tensor.
MESHES = (("data=2,fsdp=2,tensor=2", "fsdp_tp"), ("fsdp=2,expert=2,tensor=2", "fsdp_ep_tp"))
STEPS = 4
# 4 rows: divisible by the batch axes of both meshes (data x fsdp = fsdp x expert = 4).
# Only the final checkpoint, except in the run that is resumed from step 2.
OVERRIDES = [f"steps={STEPS}", "seq_len=32", "batch_size=4", "checkpoint_every=0", "keep_checkpoints=5",
             "eval_every=0", "eval_batches=1"]


def _losses(workdir: str) -> dict[int, float]:
    sys.path.insert(0, HERE)
    from train_helpers import logged_losses
    return logged_losses(workdir)


def worker(root: str) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    # Cheaper LLVM code generation: compile time dominates these runs (as in tests/sharding).
    os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                               "--xla_llvm_disable_expensive_passes=true")
    # The resumed run compiles the programs of the run it continues: share them through the persistent cache.
    os.environ.update(JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax_cache"),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    import shutil
    import time

    import jax
    from jax.sharding import PartitionSpec

    sys.path.insert(0, HERE)
    from train_helpers import TEST_OVERRIDES

    from qwax.train import loop
    from qwax.train.recipes import get_recipe

    assert jax.device_count() == 8
    seen: dict[str, dict] = {}

    class Recording(loop.Checkpointer):
        """Records how the saved and the restored parameters and optimizer state are laid out."""

        def save(self, step, params, opt_state, data_iterator, meta=None, force=False):
            seen["saved"] = layout(params, opt_state)
            return super().save(step, params, opt_state, data_iterator, meta, force)

        def restore(self, step, params_like, opt_state_like, data_iterator):
            out = super().restore(step, params_like, opt_state_like, data_iterator)
            seen["restored"] = layout(out[0], out[1])
            return out

    def layout(params, opt_state):
        leaves = jax.tree.leaves(params) + jax.tree.leaves(opt_state)
        specs = [x.sharding.spec for x in leaves if hasattr(x.sharding, "spec")]
        return {"sharded": sum(spec != PartitionSpec() for spec in specs), "arrays": len(leaves),
                "devices": len(leaves[0].sharding.device_set),
                "embed": str(jax.tree.leaves(params)[0].sharding)}

    loop.Checkpointer = Recording
    base = TEST_OVERRIDES + OVERRIDES
    result: dict = {"runs": {}}

    def run(name: str, extra: list[str], **kw) -> None:
        start = time.perf_counter()
        recipe = get_recipe("tiny", base + extra)
        seen.clear()
        out = loop.train(recipe, os.path.join(root, name), progress=False, export=False, sample=False,
                         verbose=False, **kw)
        result["runs"][name] = {"seconds": time.perf_counter() - start, "losses": _losses(os.path.join(root, name)),
                                "eval_loss": out.eval_loss, **seen}

    run("single", [])
    for i, (mesh, strategy) in enumerate(MESHES):
        run(f"mesh{i}", [f"mesh={mesh}", f"sharding_strategy={strategy}"] + ["checkpoint_every=2"] * (i == 0))
    # Resume the first sharded run from its step-2 checkpoint (restored into the sharded layout).
    shutil.copytree(os.path.join(root, "mesh0"), os.path.join(root, "resumed"))
    shutil.rmtree(os.path.join(root, "resumed", "checkpoints", str(STEPS)))
    run("resumed", [f"mesh={MESHES[0][0]}", f"sharding_strategy={MESHES[0][1]}", "checkpoint_every=2"], resume=True)
    # A mesh that does not fit the devices is a clear error.
    try:
        loop.train(get_recipe("tiny", base + ["mesh=data=3,fsdp=2"]), os.path.join(root, "bad"), progress=False,
                   export=False, sample=False, verbose=False)
        result["bad_mesh"] = ""
    except loop.TrainingError as e:
        result["bad_mesh"] = str(e)
    print("RESULT " + json.dumps(result), flush=True)


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("sharded_training"))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), root], env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(MESHES)), ids=[m[1] for m in MESHES])
def test_sharded_losses_equal_the_single_device_losses(sharded_runs, index):
    single = sharded_runs["runs"]["single"]["losses"]
    sharded = sharded_runs["runs"][f"mesh{index}"]["losses"]
    assert sorted(single) == sorted(sharded) == [str(s) for s in range(1, STEPS + 1)]
    a = np.asarray([single[k] for k in sorted(single)])
    b = np.asarray([sharded[k] for k in sorted(single)])
    np.testing.assert_allclose(b, a, rtol=1e-4)  # fp32 reassociation of the sharded reductions only
    eval_single = sharded_runs["runs"]["single"]["eval_loss"]
    assert eval_single is not None
    np.testing.assert_allclose(sharded_runs["runs"][f"mesh{index}"]["eval_loss"], eval_single, rtol=1e-4)


@pytest.mark.parametrize("index", range(len(MESHES)), ids=[m[1] for m in MESHES])
def test_parameters_and_optimizer_state_are_sharded_over_the_mesh(sharded_runs, index):
    saved = sharded_runs["runs"][f"mesh{index}"]["saved"]
    assert saved["devices"] == 8
    # Every weight matrix and its two AdamW moments are split; only small vectors and counters stay replicated.
    assert saved["sharded"] > saved["arrays"] // 2, saved
    single = sharded_runs["runs"]["single"]["saved"]
    assert single["devices"] == 1 and single["sharded"] == 0


def test_sharded_run_resumes_exactly_into_the_sharded_layout(sharded_runs):
    runs = sharded_runs["runs"]
    assert runs["resumed"]["restored"] == runs["mesh0"]["saved"]
    for step in range(3, STEPS + 1):
        assert runs["resumed"]["losses"][str(step)] == runs["mesh0"]["losses"][str(step)], step


def test_a_mesh_that_does_not_fit_the_devices_is_a_clear_error(sharded_runs):
    message = sharded_runs["bad_mesh"]
    assert "data=3,fsdp=2" in message and "8 devices" in message, message


if __name__ == "__main__":
    worker(sys.argv[1])
