"""Post-training end to end: `qwax train sft-tiny` with LoRA (held-out loss, exports that transformers and peft
load with the same logits as qwax), `qwax train dpo-tiny` (held-out reward accuracy), exact resume of SFT and
DPO runs, and LoRA's frozen base (no optimizer state, no weight gradients)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qwax
from qwax import data as qdata
from qwax.layers.lora import LoRAConfig, LoRAParam
from qwax.lora import apply_lora
from qwax.train.loop import TrainingError, split_trainable, train
from qwax.train.optim import make_optimizer
from qwax.train.recipes import get_recipe
from qwax.train.step import LossWeights, make_train_step
from hf_models import hf_logits, random_ids
from serve_checkpoint import build_served_checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_helpers import subprocess_env  # noqa: E402


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def eval_rows(workdir) -> list[dict]:
    return [r for r in read_metrics(workdir) if "eval_loss" in r]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """What the main job leaves in qwax-run/hf: the tiny recipe's 200 steps (without its time budget), exported
    with its tokenizer and qwax's chat template."""
    workdir = str(tmp_path_factory.mktemp("base") / "run")
    result = train(get_recipe("tiny", ["time_budget_minutes=0", "eval_every=0"]), workdir, progress=False,
                   sample=False, verbose=False)
    return result.hf_dir


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("jax_cache"))


def run_cli(*args: str, cache: str, timeout: float = 1200) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "qwax.cli", "train", *args, "--no-progress"],
                         env=subprocess_env(cache), capture_output=True, text=True, timeout=timeout)
    return out, time.perf_counter() - start


@pytest.fixture(scope="module")
def sft_run(base, cache_dir, tmp_path_factory) -> tuple[str, float]:
    """`qwax train sft-tiny --workdir W --steps 30 init_from=BASE lora_rank=8 lora_alpha=16`: (W, seconds)."""
    workdir = str(tmp_path_factory.mktemp("sft") / "run")
    out, seconds = run_cli("sft-tiny", "--workdir", workdir, "--steps", "30", f"init_from={base}", "lora_rank=8",
                           "lora_alpha=16", cache=cache_dir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(out.stdout[-2500:])
    return workdir, seconds


@pytest.mark.slow
def test_sft_tiny_with_lora_lowers_the_held_out_assistant_loss(sft_run, base):
    workdir, seconds = sft_run
    rows = eval_rows(workdir)
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 30
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.2, rows
    assert seconds < 600, f"sft-tiny 30 steps took {seconds:.0f} s"
    train_rows = [r for r in read_metrics(workdir) if "grad_norm" in r]
    assert train_rows and all(np.isfinite(r["loss"]) for r in train_rows)
    with open(os.path.join(workdir, "hf-adapter", "adapter_config.json")) as f:
        adapter = json.load(f)
    assert (adapter["r"], adapter["lora_alpha"], adapter["peft_type"]) == (8, 16, "LORA")
    assert adapter["base_model_name_or_path"] == os.path.abspath(base)
    # Names as PEFT matches them (suffixes of module names, e.g. "self_attn.q_proj").
    targeted = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}
    assert {"q_proj", "in_proj_qkv", "out_proj", "gate_proj"} <= targeted


@pytest.mark.slow
def test_sft_exports_load_in_transformers_and_peft_with_qwax_logits(sft_run, base):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir, _ = sft_run
    ids = random_ids(2, 50, vocab_size=2000, seed=3)
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "hf"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                           os.path.join(workdir, "hf-adapter"))
    peft_model.eval()
    ours = qwax.load_peft(qwax.load_hf(base), os.path.join(workdir, "hf-adapter"))
    expected = hf_logits(merged, ids)
    np.testing.assert_allclose(hf_logits(peft_model, ids), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids)).logits), expected, atol=1e-4, rtol=0)
    # The adapters did train: the merged model is not the base.
    base_logits = hf_logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), ids)
    assert np.abs(base_logits - expected).max() > 1e-2
    # The merged export carries the tokenizer and chat template.
    tok = AutoTokenizer.from_pretrained(os.path.join(workdir, "hf"))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_dpo_tiny_raises_held_out_reward_accuracy_above_one_half(sft_run, cache_dir, tmp_path):
    sft_dir, _ = sft_run
    workdir = str(tmp_path / "dpo")
    out, _ = run_cli("dpo-tiny", "--workdir", workdir, "--steps", "60", f"init_from={sft_dir}/hf",
                     cache=cache_dir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(out.stdout[-2000:])
    rows = eval_rows(workdir)
    assert rows[0]["step"] == 0 and rows[0]["eval_reward_accuracy"] == 0.0  # every margin is 0 at the start
    final = rows[-1]
    assert final["step"] == 60
    assert final["eval_reward_accuracy"] > 0.5, rows
    assert final["eval_reward_margin"] > 0
    logged = [r for r in read_metrics(workdir) if "reward_accuracy" in r]
    assert logged and {"rewards_chosen", "rewards_rejected", "reward_margin", "loss"} <= set(logged[-1])
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert os.path.isfile(os.path.join(workdir, "hf-adapter", "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def small_base(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("small_base")
    build_served_checkpoint(path)
    return str(path)


RESUME = ["seq_len=1024", "batch_size=2", "eval_holdout_every=0", "log_every=1", "checkpoint_every=2",
          "warmup_steps=1", "on_bad_record=skip"]


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [("sft-tiny", ["lora_rank=4", "lora_dropout=0.1"]),
                                         ("dpo-tiny", ["lora_rank=0", "grad_accum=2"])])
def test_resumed_post_training_reaches_step_n_with_the_same_loss(name, extra, small_base, tmp_path):
    source = qdata.DEFAULT_CONVERSATIONS if name == "sft-tiny" else qdata.DEFAULT_PREFERENCES
    with open(source) as f, open(tmp_path / "data.jsonl", "w") as out:
        out.writelines(f.readlines()[:40])  # a few records: the test is about the loop, not the data
    overrides = RESUME + [f"init_from={small_base}", f"data={tmp_path / 'data.jsonl'}"] + extra
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    quiet = dict(progress=False, export=False, sample=False, verbose=False)
    train(get_recipe(name, overrides), whole, steps=4, **quiet)
    train(get_recipe(name, overrides), split, steps=2, **quiet)
    train(get_recipe(name, overrides), split, steps=4, resume=True, **quiet)
    by_step = lambda rows: {r["step"]: r for r in rows if "objective" in r}  # noqa: E731
    a, b = by_step(read_metrics(whole)), by_step(read_metrics(split))
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step]["objective"] == a[step]["objective"], (step, a[step], b[step])


def test_post_training_without_init_from_names_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no qwax-run/hf here
    with pytest.raises(TrainingError, match=r"init_from=DIR.*qwax train tiny"):
        train(get_recipe("sft-tiny"), str(tmp_path / "w"), progress=False, verbose=False)


def _tiny_moe() -> qwax.QwaxForCausalLM:
    cfg = qwax.get_preset("tiny-moe", hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=32, linear_num_key_heads=1, linear_num_value_heads=2,
                          linear_key_head_dim=32, linear_value_head_dim=32, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=64, shared_expert_intermediate_size=64, mrope_section=(2, 2, 0),
                          vocab_size=256)
    return qwax.QwaxForCausalLM(cfg, rngs=nnx.Rngs(0))


def _batch(vocab: int, rows: int = 2, length: int = 64) -> dict:
    ids = random_ids(rows, length + 1, vocab_size=vocab, seed=5)
    shape = (1, rows, length)
    return {"input_ids": ids[None, :, :-1], "targets": ids[None, :, 1:], "segment_ids": np.ones(shape, np.int32),
            "position_ids": np.broadcast_to(np.arange(length, dtype=np.int32), shape).copy(),
            "weights": np.ones(shape, np.float32)}


@pytest.mark.slow
def test_lora_training_keeps_no_optimizer_state_or_gradients_for_frozen_weights():
    model = _tiny_moe()
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    graphdef, params, frozen = split_trainable(model)
    lora_leaves = jax.tree.leaves(nnx.state(model, LoRAParam))
    assert jax.tree.leaves(params) and len(jax.tree.leaves(params)) == len(lora_leaves)
    assert all(isinstance(v, LoRAParam) for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(
        x, nnx.Variable)))
    opt = make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10)
    opt_state = opt.init(params)
    # Every array of the optimizer state mirrors an adapter (AdamW's two moments): none is base-sized.
    lora_shapes = sorted(tuple(x.shape) for x in lora_leaves)
    state_shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(opt_state) if x.ndim)
    assert state_shapes == sorted(lora_shapes * 2)
    full_graphdef, full_params, _ = split_trainable(_tiny_moe())
    full_state = opt.init(full_params)
    nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))  # noqa: E731
    assert nbytes(opt_state) < 0.1 * nbytes(full_state)

    step = jax.jit(make_train_step(graphdef, opt, LossWeights(0.001)))
    batch = _batch(256)
    frozen_before = jax.tree.map(np.asarray, frozen)
    new_params, _, metrics = step(params, opt_state, batch, jax.random.key(0), frozen)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new_params))]
    assert any(changed)  # the B factors moved off zero
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.asarray, frozen))

    # No dW for the base: the compiled LoRA step does far fewer FLOPs than the full fine-tuning step.
    def flops(fn, *args) -> float:
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    full_step = make_train_step(full_graphdef, opt, LossWeights(0.001))
    lora_flops = flops(make_train_step(graphdef, opt, LossWeights(0.001)), params, opt_state, batch,
                       jax.random.key(0), frozen)
    full_flops = flops(full_step, full_params, full_state, batch, jax.random.key(0))
    assert lora_flops < 0.8 * full_flops, (lora_flops, full_flops)


@pytest.mark.slow
def test_lora_step_matches_optax_on_the_adapters_alone():
    """The LoRA step is the plain step of a model whose only parameters are the adapters."""
    model = _tiny_moe()
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    graphdef, params, frozen = split_trainable(model)
    params = jax.tree.map(lambda x: x + 0.01, params)  # nonzero B, so every adapter has a gradient
    opt = optax.sgd(0.1)
    batch = _batch(256)
    new, _, _ = jax.jit(make_train_step(graphdef, opt, LossWeights(0.0)))(params, opt.init(params), batch,
                                                                          jax.random.key(0), frozen)

    def loss(p):
        out = nnx.merge(graphdef, p, frozen)(jnp.asarray(batch["input_ids"][0]),
                                             position_ids=jnp.asarray(batch["position_ids"][0]),
                                             segment_ids=jnp.asarray(batch["segment_ids"][0]))
        logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(batch["targets"][0])[..., None], axis=-1))

    grads = jax.grad(loss)(params)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_save_hf_refuses_a_model_with_adapters_and_takes_the_merged_one(tmp_path):
    from qwax.convert.hf import save_hf

    model = _tiny_moe()
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0))
    with pytest.raises(ValueError, match="merge_lora"):
        save_hf(model, tmp_path / "adapted")
    assert not (tmp_path / "adapted").exists()
    save_hf(qwax.merge_lora(model), tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file()
