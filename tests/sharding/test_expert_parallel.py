"""Expert-parallel MoE (all_to_all dispatch and combine) equals the unsharded MoE, forward and gradients."""

import pytest

pytestmark = pytest.mark.multiprocess

# data x expert with the CPU kernel; fsdp x expert x tensor (expert width split over tensor); 40 tokens on 8
# devices (not divisible: every device keeps all tokens, runs its experts, psum over expert).
LAYOUTS = ["data=2,expert=4/xla", "fsdp=2,expert=2,tensor=2/reference", "expert=8/reference"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_expert_parallel_routed_experts_equal_unsharded_forward_and_grads(eight_devices, layout):
    r = eight_devices[f"ep/{layout}"]
    assert r["forward_err"] <= 1e-5 * max(1.0, r["forward_max"])
    for err, scale in zip(r["grad_err"], r["grad_max"]):
        assert err <= 1e-5 * max(1.0, scale)


def test_capacity_factor_drops_only_overflowing_tokens(eight_devices):
    # 64 tokens on 8 shards (one expert each), every token routed to experts 0 and 1: capacity
    # ceil(1.0 x 8 tokens x 2 slots / 8) = 2 rows per (source, destination) block, so each source keeps its first
    # 2 tokens whole and drops a slot of the other 6.
    r = eight_devices["ep/capacity"]
    assert r["kept_tokens"] == 16


def test_expert_parallel_model_matches_single_device(eight_devices):
    # The fsdp_ep / fsdp_ep_tp train steps (test_rules) run the MoE layers through expert_parallel.
    for strategy in ("fsdp_ep", "fsdp_ep_tp"):
        assert eight_devices[strategy]["grad_max_abs_err"] <= 1e-5
