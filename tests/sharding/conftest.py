"""Runs the multi-device worker jobs (tests/sharding/sharding_worker.py) in subprocesses.

The pytest process has one CPU device (tests/conftest.py); each job starts python with its own
`--xla_force_host_platform_device_count`. `eight_devices` runs once per session and several test files
assert on its JSON.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

WORKER = Path(__file__).with_name("sharding_worker.py")


def start_worker(*args: str, script: Path = WORKER) -> subprocess.Popen:
    """Start `python SCRIPT JOB [ARGS]` (default sharding_worker.py; other worker scripts in this directory reuse
    its helpers by importing it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, stdout=subprocess.PIPE,
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


def run_worker(*args: str, timeout: float = 900, script: Path = WORKER) -> dict:
    return finish_worker(start_worker(*args, script=script), timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def eight_devices() -> dict:
    """Results of the 8-device job: sharded train steps per strategy, expert parallelism, resident bytes."""
    return run_worker("eight_devices")


@pytest.fixture(scope="session")
def workers():
    """`workers.start(job, *args, script=...) -> Popen`, `workers.finish(popen) -> dict`, `workers.run(job, *args,
    script=...) -> dict` and `workers.free_port()` for tests that run jobs of their own."""
    return SimpleNamespace(start=start_worker, finish=finish_worker, run=run_worker, free_port=free_port)
