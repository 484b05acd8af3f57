"""Memory planner: parameter counts against transformers' own models, agreement with the bytes really resident on
8 devices, run options, CLI."""

import json
from pathlib import Path

import pytest

import qwax
from qwax.cli import main as cli_main
from qwax.sharding import planner

DATA = Path(__file__).resolve().parent.parent / "data"
BF16 = qwax.RunOptions(dtype="bfloat16", param_dtype="bfloat16")
# Published configs and a mesh each to plan them on.
PUBLISHED = [("qwen3_5_397b_a17b_config.json", "fsdp=64,expert=8"),
             ("qwen3_next_80b_a3b_config.json", "fsdp=16,expert=4")]


def transformers_counts(config_path: Path) -> tuple[int, int]:
    """(total, active per token) parameters of the transformers causal LM of a published config.json, built on
    torch's meta device (no memory). transformers drops the MTP head, so this is the count without it; the
    routed experts (`.mlp.experts.*`) count k / E towards the active figure."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = json.loads(config_path.read_text())
    text = transformers.AutoConfig.for_model(**hf).get_text_config()  # the language model of a multimodal config
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(text)
    share = text.num_experts_per_tok / text.num_experts
    total = active = 0.0
    for name, p in model.named_parameters():  # tied weights appear once
        total += p.numel()
        active += p.numel() * (share if ".mlp.experts." in name else 1.0)
    return int(total), int(round(active))


@pytest.mark.parametrize("config_name, mesh", PUBLISHED)
def test_planned_parameter_counts_equal_the_transformers_model_of_the_published_config(config_name, mesh):
    hf_total, hf_active = transformers_counts(DATA / config_name)
    cfg = qwax.QwaxConfig.from_hf(DATA / config_name)
    p = planner.plan(cfg, mesh, "fsdp_ep", options=BF16, seq=4096, batch=512, device="v5p")
    assert p["params_total"] == hf_total
    assert p["params_active"] == pytest.approx(hf_active, abs=1)
    # The closed-form count of the config agrees too (it sizes models without building them).
    assert cfg.param_count() == pytest.approx((hf_total, hf_active), abs=1)
    assert p["params_mtp"] > 0 if cfg.mtp_num_hidden_layers else p["params_mtp"] == 0


def test_qwen35_397b_has_397b_parameters_and_17b_active():
    cfg = qwax.get_preset("qwen3.5-397b-a17b")
    p = planner.plan(cfg, "fsdp=64,expert=8", "fsdp_ep", options=BF16, seq=4096, batch=512, device="v5p")
    assert abs(p["params_total"] - 397e9) <= 0.02 * 397e9
    assert abs(p["params_active"] - 17e9) <= 0.05 * 17e9
    assert p["num_devices"] == 512
    assert (p["dtype"], p["param_dtype"], p["remat"]) == ("bfloat16", "bfloat16", "none")


def test_the_default_options_are_those_of_the_model_float32():
    cfg = qwax.get_preset("tiny-moe")
    default = planner.plan(cfg, "fsdp=2", "fsdp", seq=16, batch=2)
    bf16 = planner.plan(cfg, "fsdp=2", "fsdp", options=BF16, seq=16, batch=2)
    assert (default["dtype"], default["param_dtype"]) == ("float32", "float32")
    # Every parameter is float32 or bfloat16 by the options, except the few the model keeps in float32.
    assert bf16["per_device_bytes"]["params"] < default["per_device_bytes"]["params"] < \
        2 * bf16["per_device_bytes"]["params"]
    with pytest.raises(TypeError, match="options"):
        planner.plan(cfg, "fsdp=2", "fsdp", options={"dtype": "bfloat16"}, seq=16, batch=2)


def test_training_bytes_follow_the_adamw_rule():
    cfg = qwax.get_preset("qwen3-next-80b-a3b")
    p = planner.plan(cfg, "fsdp=16,expert=4", "fsdp_ep", options=BF16.replace(remat="full"), seq=2048, batch=64,
                     device="v5p")
    b = p["per_device_bytes"]
    assert b["grads"] == b["params"]
    # 2 fp32 moments + fp32 master = 12 bytes per 2-byte parameter (a few small fp32 ones, A_log, need no master).
    assert b["optimizer"] == pytest.approx(6 * b["params"], rel=1e-3)
    assert b["cache"] == 0
    assert b["total"] == sum(v for k, v in b.items() if k != "total")
    assert p["fits"] == (b["total"] <= p["device_memory_bytes"])


def test_inference_counts_cache_and_no_optimizer_and_shards_the_cache():
    cfg = qwax.get_preset("qwen3-next-80b-a3b")
    one = planner.plan(cfg, "fsdp=1", "fsdp_tp", options=BF16, seq=1024, batch=8, mode="infer", cache_len=32768,
                       device="h200")
    split = planner.plan(cfg, "data=2,tensor=4", "fsdp_tp", options=BF16, seq=1024, batch=8, mode="infer",
                         cache_len=32768, device="h200")
    assert one["per_device_bytes"]["grads"] == one["per_device_bytes"]["optimizer"] == 0
    assert one["per_device_bytes"]["cache"] > 0
    # Batch over data (2); GDN heads (32) over tensor (4); the 2 KV heads do not divide over tensor=4 and are
    # replicated there, so the cache shrinks by more than 2x and less than 8x.
    one_cache, split_cache = one["per_device_bytes"]["cache"], split["per_device_bytes"]["cache"]
    assert one_cache / 8 < split_cache < one_cache / 2


def test_remat_full_keeps_less_than_no_remat():
    cfg = qwax.get_preset("qwen3.5-35b-a3b")
    acts = {r: planner.plan(cfg, "fsdp=8", "fsdp", options=BF16.replace(remat=r), seq=2048, batch=8)
            ["per_device_bytes"]["activations"] for r in ("none", "dots", "dots_no_batch", "full")}
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


def test_cli_flags_build_the_run_options(capsys):
    args = ["plan", "--preset", "tiny-moe", "--mesh", "fsdp=2", "--seq", "16", "--batch", "2", "--json"]
    assert cli_main(args + ["--remat", "full", "--dtype", "float32", "--param-dtype", "bf16"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert (p["remat"], p["dtype"], p["param_dtype"]) == ("full", "float32", "bfloat16")
    assert cli_main(args) == 0
    p = json.loads(capsys.readouterr().out)
    assert (p["remat"], p["dtype"], p["param_dtype"]) == ("none", "bfloat16", "bfloat16")
    assert cli_main(args + ["--dtype", "fp8"]) == 2
    assert "dtype='fp8'" in capsys.readouterr().err


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
