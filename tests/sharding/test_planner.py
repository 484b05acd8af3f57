"""Memory planner: published parameter counts, agreement with the bytes really resident on 8 devices, CLI."""

import json

import pytest

import qwax
from qwax.cli import main as cli_main
from qwax.sharding import planner


def test_total_parameters_of_qwen35_397b_are_397b_and_match_the_config_count():
    cfg = qwax.get_preset("qwen3.5-397b-a17b", dtype="bfloat16", param_dtype="bfloat16")
    p = planner.plan(cfg, "fsdp=64,expert=8", "fsdp_ep", seq=4096, batch=512, device="v5p")
    assert abs(p["params_total"] - 397e9) <= 0.02 * 397e9
    assert (p["params_total"], p["params_active"]) == pytest.approx(cfg.param_count(), rel=1e-6)
    assert abs(p["params_active"] - 17e9) <= 0.05 * 17e9
    assert p["num_devices"] == 512


def test_training_bytes_follow_the_adamw_rule():
    cfg = qwax.get_preset("qwen3-next-80b-a3b", dtype="bfloat16", param_dtype="bfloat16", remat="full")
    p = planner.plan(cfg, "fsdp=16,expert=4", "fsdp_ep", seq=2048, batch=64, device="v5p")
    b = p["per_device_bytes"]
    assert b["grads"] == b["params"]
    # 2 fp32 moments + fp32 master = 12 bytes per 2-byte parameter (a few small fp32 ones, A_log, need no master).
    assert b["optimizer"] == pytest.approx(6 * b["params"], rel=1e-3)
    assert b["cache"] == 0
    assert b["total"] == sum(v for k, v in b.items() if k != "total")
    assert p["fits"] == (b["total"] <= p["device_memory_bytes"])


def test_inference_counts_cache_and_no_optimizer_and_shards_the_cache():
    cfg = qwax.get_preset("qwen3-next-80b-a3b", dtype="bfloat16", param_dtype="bfloat16")
    one = planner.plan(cfg, "fsdp=1", "fsdp_tp", seq=1024, batch=8, mode="infer", cache_len=32768, device="h200")
    split = planner.plan(cfg, "data=2,tensor=4", "fsdp_tp", seq=1024, batch=8, mode="infer", cache_len=32768,
                         device="h200")
    assert one["per_device_bytes"]["grads"] == one["per_device_bytes"]["optimizer"] == 0
    assert one["per_device_bytes"]["cache"] > 0
    # Batch over data (2); GDN heads (32) over tensor (4); the 2 KV heads do not divide over tensor=4 and are
    # replicated there, so the cache shrinks by more than 2x and less than 8x.
    assert one["per_device_bytes"]["cache"] / 8 < split["per_device_bytes"]["cache"] < one["per_device_bytes"]["cache"] / 2


def test_remat_full_keeps_less_than_no_remat():
    cfg = qwax.get_preset("qwen3.5-35b-a3b", dtype="bfloat16", param_dtype="bfloat16")
    acts = {r: planner.plan(cfg.replace(remat=r), "fsdp=8", "fsdp", seq=2048, batch=8)["per_device_bytes"]
            ["activations"] for r in ("none", "dots", "dots_no_batch", "full")}
    assert acts["full"] < acts["dots_no_batch"] < acts["dots"] < acts["none"]


def test_cli_json_prints_exactly_one_object(capsys):
    code = cli_main(["plan", "--preset", "tiny-moe", "--mesh", "fsdp=4,expert=2", "--strategy", "fsdp_ep",
                     "--seq", "16", "--batch", "8", "--device", "v5e", "--json"])
    assert code == 0
    out = capsys.readouterr().out
    p = json.loads(out)
    assert out.strip().count("\n") == 0
    assert set(p["per_device_bytes"]) == {"params", "grads", "optimizer", "activations", "cache", "total"}
    for key in ("params_total", "params_active", "device_memory_bytes"):
        assert isinstance(p[key], int)
    assert p["fits"] is True


def test_cli_text_names_the_verdict(capsys):
    cli_main(["plan", "--preset", "qwen3.5-397b-a17b", "--mesh", "fsdp=4", "--strategy", "fsdp", "--seq", "4096",
              "--batch", "8", "--device", "h200", "--mode", "infer"])
    assert "does NOT fit" in capsys.readouterr().out


@pytest.mark.multiprocess
@pytest.mark.parametrize("key", ["fsdp/float32", "fsdp_ep_tp/float32", "fsdp_ep_tp/bfloat16"])
def test_planned_param_and_optimizer_bytes_equal_resident_bytes_on_8_devices(eight_devices, key):
    r = eight_devices[f"resident/{key}"]
    assert r["plan_params"] == pytest.approx(r["params"], rel=0.05)
    assert r["plan_optimizer"] == pytest.approx(r["optimizer"], rel=0.05)
