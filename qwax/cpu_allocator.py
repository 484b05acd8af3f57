"""Keep host memory that XLA:CPU frees, so the next execution does not page-fault it in again.

XLA:CPU allocates the temporaries of every execution (one ~2 GB block for the `bench_train` step) with malloc,
from its worker threads, and frees them when the execution ends. glibc serves a request larger than 64 MiB
from a worker thread's arena with a fresh mmap and unmaps it on free, so every execution touched all of that
memory anew: ~490k page faults and ~1.2 s of kernel time per training step on this 2-core machine (4.33 ->
4.02 s/step once the memory is kept). Three `mallopt` settings keep it instead: one arena (the main one, which
grows with brk), no mmap for large blocks, and no trimming of freed memory back to the OS.

The costs: the process keeps its peak host memory until it exits; glibc does not always reuse a freed block, so
resident memory can grow by several executions' temporaries before it settles (a loop over 256 MiB of temporaries
reached 0.9-2.4 GiB against 0.6 GiB, still growing now and then after 30 executions; the `bench_train` step's
stayed at 4.28 GiB against 4.41 GiB); and all threads share one malloc arena, which slows short executions: a
decode step of the `bench_inference` model took 1.6-2.1 ms against 0.8-1.4 ms with glibc's defaults (interleaved
runs). Without the one-arena setting the training step faults as before, so the three go together, and only where
large temporaries dominate: `qwax train` and the training benchmarks apply them, `qwax generate` and
`bench_inference` do not. They are never applied for TPU or GPU runs (their temporaries live on the device), nor
under another C library.

glibc fixes the arena limit the first time a second thread allocates, so the settings work only before JAX
starts its backend: call `keep_freed_memory()` first thing in a process. Set QWAX_KEEP_FREED_MEMORY=0 to turn it
off.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import platform

import jax

log = logging.getLogger(__name__)

# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# (parameter, value): one arena; no mmap'ed blocks; never trim (-1 is SIZE_MAX as the size_t it becomes).
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))


def _backend_started() -> bool:
    from jax._src import xla_bridge  # no public query for this; a missing attribute counts as "unknown: go on"

    return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())


def _runs_on_cpu() -> bool:
    """True when JAX will use its CPU backend: forced by JAX_PLATFORMS, or no TPU/GPU plugin is installed."""
    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return False
    return not any(True for _ in importlib.metadata.entry_points(group="jax_plugins"))


def keep_freed_memory() -> bool:
    """Apply the malloc settings above if this process will run XLA on the CPU; returns whether they were applied.

    A no-op (returning False) when QWAX_KEEP_FREED_MEMORY=0, off glibc, when JAX will run on a TPU or GPU, or when
    the JAX backend has already started (then it would be too late to take effect, so nothing is changed).
    """
    if os.environ.get("QWAX_KEEP_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    if not _runs_on_cpu():
        return False
    if _backend_started():
        log.info("JAX's backend already started: keep_freed_memory() must run before the first computation")
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _SETTINGS)


def keep_freed_memory_for_benchmark() -> str:
    """`keep_freed_memory()`, and the line a benchmark prints about it (both sides of a comparison share it)."""
    applied = keep_freed_memory()
    return "host allocator: " + ("freed memory kept (qwax.cpu_allocator)" if applied else "glibc defaults")
