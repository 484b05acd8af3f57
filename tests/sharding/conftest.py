"""Runs the multi-device worker jobs (tests/sharding/sharding_worker.py) in subprocesses.

The pytest process has one CPU device (tests/conftest.py); each job starts python with its own
`--xla_force_host_platform_device_count`. `eight_devices` runs once per session and several test files
assert on its JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

WORKER = Path(__file__).with_name("sharding_worker.py")


def start_worker(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_worker(proc: subprocess.Popen, timeout: float = 900) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"worker {proc.args[2:]} timed out after {timeout}s:\n{err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise AssertionError(f"worker {proc.args[2:]} failed (exit {proc.returncode}):\n{err[-5000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run_worker(*args: str, timeout: float = 900) -> dict:
    return finish_worker(start_worker(*args), timeout)


@pytest.fixture(scope="session")
def eight_devices() -> dict:
    """Results of the 8-device job: sharded train steps per strategy, expert parallelism, resident bytes."""
    return run_worker("eight_devices")


@pytest.fixture(scope="session")
def workers():
    """`workers.start(job, *args) -> Popen` and `workers.finish(popen) -> dict` for tests that run several jobs."""
    return SimpleNamespace(start=start_worker, finish=finish_worker)
