"""Session-wide test environment: CPU-only JAX on one device, offline transformers, tiny HF checkpoints.

Environment variables are set at import time, before any test module imports jax or transformers.
Tests that need several devices start a subprocess with their own ``XLA_FLAGS``
(``--xla_force_host_platform_device_count=N``); the in-process JAX always sees exactly one CPU device, so
results do not depend on the machine or on what the caller exported.
"""

from __future__ import annotations

import os
import re

# Tests run on the CPU even where an accelerator is present; QWAX_TEST_JAX_PLATFORMS opts into another backend.
os.environ["JAX_PLATFORMS"] = os.environ.get("QWAX_TEST_JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = re.sub(
    r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", "")
).strip()
# transformers and huggingface_hub must never reach the network: CI has none and tests build their models.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from hf_models import make_hf_model  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Multi-device and multi-process tests start subprocesses that compile their own programs: they belong to
    the slow tier (`-m "not slow"` is the tier to run while working)."""
    for item in items:
        if item.get_closest_marker("multiprocess") is not None:
            item.add_marker(pytest.mark.slow)


def pytest_report_header(config):
    return (
        f"qwax: JAX_PLATFORMS={os.environ['JAX_PLATFORMS']} (1 in-process device), "
        f"XLA_FLAGS={os.environ['XLA_FLAGS'] or '<none>'}, HF offline"
    )


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory fixture: ``hf_checkpoint(model_type, **overrides) -> (path, torch_model)``.

    Builds a tiny random HF model with ``tests/hf_models.make_hf_model`` and saves it once per session for
    each distinct argument set; later calls return the cached directory and model. Treat both as read-only.
    """
    cache = {}

    def build(model_type: str, **overrides):
        key = repr((model_type, sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"hf_{model_type}")
            cache[key] = (path, make_hf_model(model_type, path, **overrides))
        return cache[key]

    return build
