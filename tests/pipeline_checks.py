"""Shared checks of the grain input pipelines."""

from __future__ import annotations

import json

import numpy as np

from qwax import data as qdata


def assert_resumes_the_same(ds, it, n: int) -> list[dict]:
    """Checkpoint the position of iterator `it` of dataset `ds` (through JSON, as a checkpoint stores it), read
    `n` batches on, and check that a fresh iterator set to that state yields the same `n`; returns them."""
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(n)]
    again = iter(ds)
    again.set_state(state)
    for x in expected:
        y = next(again)
        for k in qdata.BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
    return expected
