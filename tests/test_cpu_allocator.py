"""keep_freed_memory(): XLA:CPU's freed temporaries stay mapped, so repeated executions stop page-faulting."""

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp

from qwax.cpu_allocator import keep_freed_memory

# The loop carries 32M floats: two 128 MiB temporaries, above the 64 MiB that glibc serves from a thread's arena.
# glibc reuses the freed blocks from the third execution on; the first six are warm-up.
CHILD = textwrap.dedent("""
    import json, resource, sys
    import jax, jax.numpy as jnp
    from qwax.cpu_allocator import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else False
    f = jax.jit(lambda x: jax.lax.fori_loop(0, 2, lambda i, c: jnp.roll(c, 1) * 1.5, x).sum())
    x = jnp.arange(2**25, dtype=jnp.float32)
    for _ in range(6):
        f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        f(x).block_until_ready()
    print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
""")


def run_child(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_memory_is_not_faulted_in_again():
    plain, kept = run_child("plain"), run_child("keep")
    assert kept["applied"]
    # Without the settings each execution faults its 256 MiB of temporaries (64k pages of 4 KiB) in again.
    assert plain["faults"] > 3 * 2**16 // 2, plain
    assert kept["faults"] < plain["faults"] / 10, (kept, plain)


def test_opt_out_and_late_call_change_nothing():
    assert not run_child("keep", QWAX_KEEP_FREED_MEMORY="0")["applied"]
    jnp.zeros(1).block_until_ready()  # the backend of this process has started
    assert not keep_freed_memory()
