"""Activation sharding: under `use_sharding(mesh, "fsdp_tp")` the forward's lowered program constrains the hidden
states between decoder layers to ("batch", "length", "act_embed") and the logits to ("batch", "length",
"act_vocab"), on 8 simulated devices (fsdp=2 x tensor=4; sharding_worker.job_activation_shardings).

Expected shardings, from the fsdp_tp table on that mesh: the batch over fsdp (data, expert have size 1), the
hidden dim replicated (act_embed has no mesh axis), the vocabulary over tensor.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

HIDDEN_TYPE = "4x8x48xf32"  # [batch, length, hidden] of the worker's model (float32 run options)
LOGITS_TYPE = "4x8x256xf32"  # [batch, length, vocab]
HIDDEN_SHARDING = '[{"fsdp"}, {}, {}]'
LOGITS_SHARDING = '[{"fsdp"}, {}, {"tensor"}]'


@pytest.fixture(scope="module")
def lowered(workers) -> dict:
    return workers.finish(workers.start("activation_shardings"))


def _of_type(constraints: list[dict], tensor_type: str) -> list[str]:
    return [c["sharding"] for c in constraints if c["type"] == tensor_type]


@pytest.mark.parametrize("layout", ["scan", "unrolled"])
def test_hidden_states_between_layers_are_constrained_to_the_batch_axes(lowered, layout):
    entry = lowered[layout]
    assert entry["scanned"] == (layout == "scan")
    hidden = _of_type(entry["constraints"], HIDDEN_TYPE)
    assert hidden, f"no sharding constraint on a [4, 8, 48] hidden state: {entry['constraints']}"
    assert set(hidden) == {HIDDEN_SHARDING}, hidden
    if layout == "unrolled":  # every layer boundary appears in the program
        assert len(hidden) >= lowered["layers"], hidden


@pytest.mark.parametrize("layout", ["scan", "unrolled"])
def test_logits_are_constrained_to_batch_and_vocabulary_axes(lowered, layout):
    logits = _of_type(lowered[layout]["constraints"], LOGITS_TYPE)
    assert logits and set(logits) == {LOGITS_SHARDING}, lowered[layout]["constraints"]


def test_compiled_logits_come_out_sharded_like_the_rule(lowered):
    # Without the logits constraint XLA keeps the batch whole here (it comes out as P(None, None, "tensor")).
    assert lowered["scan"]["logits_spec"] == ["fsdp", None, "tensor"]
