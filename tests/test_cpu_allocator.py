"""keep_freed_memory(): XLA:CPU's freed temporaries stay mapped, so repeated executions stop page-faulting."""

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import pytest

from qwax.cpu_allocator import keep_freed_memory

# The loop carries 32M floats: two 128 MiB temporaries, above the 64 MiB that glibc serves from a thread's arena.
# With the settings glibc mostly reuses the freed blocks after a few executions, but now and then still grows its
# heap by one execution's temporaries (1-3 of 34 executions after the first six, in three runs): so 12 warm-up
# executions, then 12 measured.
CHILD = textwrap.dedent("""
    import json, resource, sys
    import jax, jax.numpy as jnp
    from qwax.cpu_allocator import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else False
    f = jax.jit(lambda x: jax.lax.fori_loop(0, 2, lambda i, c: jnp.roll(c, 1) * 1.5, x).sum())
    x = jnp.arange(2**25, dtype=jnp.float32)
    for _ in range(12):
        f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(12):
        f(x).block_until_ready()
    print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
""")


def run_child(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_kept_memory_is_not_faulted_in_again():
    plain, kept = run_child("plain"), run_child("keep")
    assert kept["applied"]
    # Without the settings each execution faults its 256 MiB of temporaries (64k pages of 4 KiB) in again.
    assert plain["faults"] > 12 * 2**16 // 2, plain
    assert kept["faults"] < plain["faults"] / 3, (kept, plain)


@pytest.mark.slow
def test_opt_out_and_late_call_change_nothing():
    assert not run_child("keep", QWAX_KEEP_FREED_MEMORY="0")["applied"]
    jnp.zeros(1).block_until_ready()  # the backend of this process has started
    assert not keep_freed_memory()


def test_only_training_commands_keep_freed_memory():
    # One malloc arena for all threads slows decode steps (measured in qwax.cpu_allocator's docstring).
    from qwax.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train"]).keep_freed_memory
    args = parser.parse_args(["generate", "--checkpoint", "ckpt", "--prompt", "hi"])
    assert not getattr(args, "keep_freed_memory", False)
