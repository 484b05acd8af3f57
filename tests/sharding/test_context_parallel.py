"""Context parallelism (qwax.sharding.context_parallel): a sequence split over the `context` mesh axis gives the
logits, loss and gradients of one device, for the ops and for tiny models of each text type, with packed
documents whose boundaries fall inside shards and exactly at shard boundaries; also across two processes."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

WORKER = Path(__file__).with_name("context_worker.py")
OP_MESHES = ("fsdp=2,context=4", "data=2,context=2,fsdp=2", "context=8")
OPS = ("gdr", "gdr/packed", "conv", "conv/packed", "attention", "attention/packed")
TRAIN_CASES = [f"{t}/{m}" for t in ("tiny-dense", "tiny-moe", "tiny-next")
               for m in ("fsdp=2,context=4", "data=2,context=2,fsdp=2")]
TRAIN_CASES += ["tiny-moe/expert=2,context=4", "tiny-dense/context=4,tensor=2"]


@pytest.fixture(scope="module")
def eight(workers) -> dict:
    return workers.run("eight_devices", script=WORKER, timeout=1500)


@pytest.mark.parametrize("mesh", OP_MESHES)
@pytest.mark.parametrize("op", OPS)
def test_context_parallel_op_equals_the_single_device_op_with_gradients(eight, mesh, op):
    r = eight[f"op/{mesh}/{op}"]
    # The parallel program really is split: a shard_map exchanging blocks between neighbours.
    assert r["shard_map"] and r["ppermute"]
    assert r["out"] <= 1e-5
    assert r["grads"] <= 1e-4


@pytest.mark.parametrize("mesh", OP_MESHES)
def test_cached_attention_splits_the_cache_by_slots_and_equals_the_single_device_op(eight, mesh):
    # A prefill chunk straddling two shards' slots: the written cache and the attention output (forward only).
    r = eight[f"op/{mesh}/cached_attention"]
    assert r["shard_map"] and r["all_reduce"]  # the shards' softmax states are combined by all-reduces
    assert r["out"] <= 1e-5


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_context_parallel_training_equals_one_device(eight, case):
    r = eight[f"train/{case}"]
    assert "context" in r["logits_spec"]  # the logits stay split along the sequence
    assert r["logits"] <= 1e-4
    assert r["loss"] <= 1e-5 * max(1.0, r["loss_value"])
    assert r["grads"] <= 1e-3


@pytest.mark.parametrize("model", ["tiny-dense", "tiny-moe", "tiny-next"])
def test_prefill_with_a_context_axis_gives_the_cache_and_next_token_logits_of_one_device(eight, model):
    r = eight[f"prefill/{model}"]
    assert r["logits"] <= 1e-4
    assert r["cache"] <= 1e-4
    # The KV cache is sharded by sequence over context.
    assert r["kv_specs"] and all("context" in s for s in r["kv_specs"])


def test_generation_with_a_context_axis_gives_the_tokens_of_one_device(eight):
    r = eight["generate/tiny-moe"]
    assert r["shape"] == [4, 32 + 8] and r["equal"]  # prompt + 8 new tokens per row


def test_two_processes_with_a_context_axis_equal_one_device(workers):
    port = workers.free_port()
    procs = [workers.start("multihost", i, 2, port, script=WORKER) for i in range(2)]
    results = [workers.finish(p, timeout=1500) for p in procs]
    for i, r in enumerate(results):
        assert (r["process_index"], r["devices"]) == (i, 8)
        for spec in ("context=8", "fsdp=2,context=4"):
            case = r[spec]
            assert case["logits"] <= 1e-4 and case["grads"] <= 1e-3
            assert case["loss"] <= 1e-5 * max(1.0, case["loss_value"])
