"""Fixtures of the serving tests."""

from __future__ import annotations

import pytest

from serve_checkpoint import build_served_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(path, transformers model) of the tiny served checkpoint (see serve_checkpoint.py)."""
    path = tmp_path_factory.mktemp("served")
    return path, build_served_checkpoint(path)
