"""Memory planner: parameter counts against transformers' own models, agreement with the bytes really resident on
8 devices and with XLA's memory analysis of the compiled programs, context lengths and context parallelism, run
options, CLI, sweeps."""

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


# ------------------------------------------------------------------ context length, context parallelism
TINY = qwax.get_preset("tiny-moe", num_hidden_layers=4, full_attention_interval=2)
BIG = qwax.get_preset("qwen3.5-397b-a17b")


def test_context_is_the_sequence_in_train_mode():
    by_context = planner.plan(TINY, "fsdp=2,context=4", options=BF16, context=256, batch=2)
    by_seq = planner.plan(TINY, "fsdp=2,context=4", options=BF16, seq=256, batch=2)
    assert by_context["per_device_bytes"] == by_seq["per_device_bytes"]
    assert (by_context["seq"], by_context["context"], by_context["context_shards"]) == (256, 256, 4)
    assert by_context["cache_len"] == 0 and by_context["per_device_bytes"]["cache"] == 0
    assert planner.plan(TINY, "fsdp=2,context=4", options=BF16, seq=256, context=256, batch=2)["seq"] == 256


def test_context_is_the_cache_in_infer_mode_and_the_prefill_runs_in_chunks():
    p = planner.plan(TINY, "fsdp=2,context=4", options=BF16, context=65536, batch=2, mode="infer")
    assert (p["seq"], p["cache_len"], p["context"]) == (planner.PREFILL_CHUNK, 65536, 65536)
    chunked = planner.plan(TINY, "fsdp=2,context=4", options=BF16, context=65536, seq=1024, batch=2, mode="infer")
    assert chunked["seq"] == 1024
    # The cache is the same; a shorter chunk needs fewer activation bytes.
    assert chunked["per_device_bytes"]["cache"] == p["per_device_bytes"]["cache"]
    assert chunked["per_device_bytes"]["activations"] < p["per_device_bytes"]["activations"]
    # A context shorter than the default chunk is prefilled in one chunk.
    assert planner.plan(TINY, "fsdp=2", options=BF16, context=512, batch=2, mode="infer")["seq"] == 512


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="train", seq=512, context=1024), "--seq=512 and --context=1024 disagree"),
    (dict(mode="infer", cache_len=4096, context=8192), "--cache-len=4096 and --context=8192 disagree"),
    (dict(mode="train", context=1024, cache_len=1024), "train mode has no cache"),
    (dict(mode="train"), "no length given"),
    (dict(mode="train", context=0), "--context=0"),
])
def test_conflicting_or_missing_lengths_name_the_flags(kwargs, message):
    with pytest.raises(ValueError, match=message):
        planner.plan(TINY, "fsdp=2", options=BF16, batch=2, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="train", context=1000), "--context=1000: .* splits the sequence into 16 shards"),
    (dict(mode="train", seq=1000), "--seq=1000: .* splits the sequence into 16 shards"),
    (dict(mode="infer", context=65536, seq=1000), "--seq=1000: .* each prefill chunk into 16 shards"),
    (dict(mode="infer", context=65544), "--context=65544: .* the KV cache into 16 shards"),
    (dict(mode="infer", seq=1024, cache_len=65544), "--cache-len=65544: .* the KV cache into 16 shards"),
])
def test_a_context_axis_must_divide_the_sequence_chunk_and_cache(kwargs, message):
    with pytest.raises(ValueError, match=message):
        planner.plan(TINY, "fsdp=2,context=16", options=BF16, batch=2, **kwargs)


def test_cli_context_flag_and_its_errors(capsys):
    args = ["plan", "--preset", "tiny-moe", "--mesh", "fsdp=2,context=4", "--batch", "2", "--json"]
    assert cli_main(args + ["--context", "4096", "--mode", "infer", "--seq", "512"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert (p["seq"], p["cache_len"], p["context_shards"]) == (512, 4096, 4)
    assert cli_main(args + ["--context", "4096", "--seq", "2048"]) == 2
    assert "--seq=2048 and --context=4096 disagree" in capsys.readouterr().err
    assert cli_main(args + ["--context", "4098"]) == 2
    err = capsys.readouterr().err
    assert "--context=4098" in err and "into 4 shards" in err
    assert cli_main(["plan", "--preset", "tiny-moe", "--context", "64"]) == 2
    assert "--mesh and --batch are required" in capsys.readouterr().err


def test_cache_kv_scales_with_the_context_over_the_context_axis_and_gdn_state_is_constant():
    detail = {}
    for context, cp in ((1 << 17, 1), (1 << 18, 1), (1 << 18, 4), (1 << 20, 4), (1 << 20, 16)):
        mesh = "expert=8" if cp == 1 else f"expert=8,context={cp}"
        p = planner.plan(BIG, mesh, "fsdp_ep", options=BF16, context=context, batch=1, mode="infer", device="h200")
        detail[context, cp] = p["cache_detail"]
    base = detail[1 << 17, 1]["kv"]
    # Keys and values of the 15 attention layers + the MTP layer: 2 x 2 KV heads x 256 x 2 bytes per token.
    assert base == 16 * 2 * 2 * 256 * 2 * (1 << 17)
    for (context, cp), d in detail.items():
        assert d["kv"] == base * (context >> 17) // cp  # proportional to N / context shards
        assert d["gdn"] == detail[1 << 17, 1]["gdn"] > 0  # 45 GDN layers' state: whatever the length or mesh
    # At 1M tokens the KV cache is almost all of the cache, even split 16 ways.
    big = detail[1 << 20, 16]
    assert big["kv"] > 10 * big["gdn"] and big["kv"] == 2 << 30


def test_context_parallelism_splits_training_activations():
    options = BF16.replace(remat="full")
    acts = {cp: planner.plan(BIG, f"fsdp=2,expert=8,context={cp}", "fsdp_ep", options=options, context=1 << 14,
                             batch=16, capacity_factor=1.25)["per_device_bytes"]["activations"] for cp in (1, 4, 8)}
    assert acts[8] < acts[4] < acts[1]
    # A GDN layer's arrays are per token (and per chunk): each device holds 1 / cp of them, the two runs of
    # the context-parallel rule aside.
    rules = planner.get_rules("fsdp_ep")
    gdn = {}
    for cp in (1, 4):
        mesh = planner.abstract_mesh(f"fsdp=2,expert=8,context={cp}")
        tensors = planner._gdn_tensors(BIG, options, 16, 1 << 14, cp)
        gdn[cp] = planner._tensor_bytes(tensors, rules, mesh)
    assert gdn[1] / 4 < gdn[4] < gdn[1] / 2


def test_ring_attention_recomputes_one_step_in_training_and_a_prefill_splits_the_cache_by_slots():
    """Training rematerialises each ring step: the backward pass works on one step's score blocks (not
    residuals of the layer) and keeps every step's K, V block. A prefill over a context-split cache holds the
    chunk's queries against one block of its shard's slots."""
    options = BF16.replace(remat="full")
    one = planner._attention_tensors(BIG, options, 1, 1 << 15, 1)
    ring = planner._attention_tensors(BIG, options, 1, 1 << 15, 8)
    f32_scores = [t for t in ring if len(t.shape) == 4 and t.dtype == planner.jnp.float32]
    assert len(f32_scores) == planner.RING_SCORE_COPIES
    assert all(t.shape == (1, 32, 1 << 15, 1 << 12) and not t.saved for t in f32_scores)
    kv_saved = lambda ts: sum(1 for t in ts if t.axes[-1] == "act_kv_heads" and t.saved)  # noqa: E731
    ring4 = planner._attention_tensors(BIG, options, 1, 1 << 15, 4)
    assert kv_saved(ring) - kv_saved(ring4) == 2 * (8 - 4)  # a K and a V block per step
    assert not [t for t in one if len(t.shape) == 4]
    cached = planner._cached_attention_tensors(BIG, options, 1, 8192, 1 << 20, 8)
    slots = 1 << 17  # the shard's share of the cache
    block = (1, 32, 8192, planner.kv_block_size(8192, 16, slots))  # every query of the chunk, one block of slots
    # three copies of the scores, and the accumulator and its rescaled copy (a block is head_dim = 256 wide here)
    assert sum(1 for t in cached if t.shape == block) == 3 + 2
    written = [t for t in cached if t.axes[0] == "cache_batch"]  # this shard's new K and V cache entries
    assert len(written) == 2 and all(t.shape == (1, 2, slots, 256) for t in written)


def test_sweep_tables_cover_both_devices_and_say_which_fit(capsys):
    code = cli_main(["plan", "--preset", "qwen3.5-397b-a17b", "--mode", "infer", "--context", "1048576",
                     "--sweep", "v5p,h200"])
    assert code == 0
    table = capsys.readouterr().out.strip().splitlines()
    rows = [r for r in table[2:] if r.startswith("|")]
    assert len(rows) == len(planner.SWEEP_MESHES["v5p"]) + len(planner.SWEEP_MESHES["h200"])
    assert table[0].startswith("| hardware | mesh, strategy |")
    assert any("8x H200" in r and "`expert=8`" in r and "**no**" in r for r in rows)  # 806 GB of weights + KV
    assert all("yes" in r for r in rows if "context=" in r and "64x H200" in r)
    assert cli_main(["plan", "--preset", "tiny-moe", "--context", "64", "--sweep", "v5p,tpu9"]) == 2
    assert "no candidate meshes for ['tpu9']" in capsys.readouterr().err
    plans = planner.sweep(TINY, ["h200"], options=BF16, context=256)
    assert [p["batch"] for p in plans] == [planner.batch_shards(p["mesh"], p["strategy"]) for p in plans]


# ------------------------------------------------------------------ against XLA's memory analysis
# Cases of tests/sharding/planner_worker.py.
XLA_TRAIN = [f"train/{mesh}/{remat}" for mesh in ("fsdp=8", "fsdp=2,expert=2,tensor=2", "fsdp=2,context=4",
                                                 "data=2,context=2,fsdp=2") for remat in ("none", "full")]
XLA_INFER = [f"infer/{mesh}" for mesh in ("fsdp=8", "fsdp=2,expert=2,tensor=2", "fsdp=2,context=4",
                                          "data=2,context=2,fsdp=2")]
XLA_MOE = [f"moe-{mode}/{mesh}" + ("/full" if mode == "train" else "") for mode in ("train", "infer")
           for mesh in ("fsdp=2,expert=2,tensor=2", "data=2,context=2,fsdp=2")]


@pytest.fixture(scope="module")
def compiled_bytes(workers) -> dict:
    """memory_analysis() of every case and the plans, from the worker's train and infer jobs (run side by side)."""
    script = Path(__file__).with_name("planner_worker.py")
    jobs = [workers.start(job, script=script) for job in ("train", "infer")]
    result: dict = {}
    for job in jobs:
        result.update(workers.finish(job))
    return result


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", XLA_TRAIN + XLA_INFER + XLA_MOE)
def test_planned_params_optimizer_and_cache_bytes_equal_the_compiled_arguments(compiled_bytes, case):
    """Per device: params + AdamW state (train) or params + cache (infer) = the compiled step's arguments less
    the token ids; the donated state (params and AdamW state; the cache) is aliased to outputs of its size."""
    r, plan = compiled_bytes[case], compiled_bytes[case]["plan"]
    assert r["xla"]["argument"] - r["ids"] == pytest.approx(plan["params"] + plan["optimizer"] + plan["cache"],
                                                            rel=0.02)
    donated = plan["params"] + plan["optimizer"] if "train/" in case else plan["cache"]
    assert r["xla"]["alias"] == pytest.approx(donated, rel=0.02)


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", XLA_TRAIN + XLA_INFER)
def test_planned_activations_are_within_25_percent_of_the_compiled_temporaries(compiled_bytes, case):
    """XLA's temporaries of a train step hold the gradients too: activations + grads against temp_size."""
    r = compiled_bytes[case]
    planned = r["plan"]["activations"] + r["plan"]["grads"]
    assert planned == pytest.approx(r["xla"]["temp"], rel=0.25)
