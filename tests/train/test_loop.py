"""The training loop end to end, in subprocesses like a user's `qwax train`: exact resume after SIGKILL,
NaN stop, workdir protection, HF export that transformers loads with the same greedy continuation."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

import qwax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_helpers import TEST_OVERRIDES, logged_losses, run_train, subprocess_env, train_command  # noqa: E402


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def _complete_checkpoints(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


@pytest.mark.slow
def test_resume_after_sigkill_reaches_step_n_with_the_bitwise_same_loss(tmp_path, compile_cache):
    n = 60
    args = ["--steps", str(n), "checkpoint_every=5", "keep_checkpoints=20"]
    straight = str(tmp_path / "straight")
    done = run_train(straight, compile_cache, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = logged_losses(straight)
    assert sorted(expected) == list(range(1, n + 1))

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(train_command(killed, *args), env=subprocess_env(compile_cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not _complete_checkpoints(killed) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    first = _complete_checkpoints(killed)
    assert first and first[-1] < n, f"the run should have been killed after its first checkpoint: {first}"

    resumed = run_train(killed, compile_cache, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {first[-1]}" in resumed.stdout
    got = logged_losses(killed)
    for step in range(first[-1] + 1, n + 1):
        assert got[step] == expected[step], (step, got[step], expected[step])  # bitwise: the same float


@pytest.mark.slow
def test_nan_loss_stops_training_with_a_message_naming_the_step(tmp_path, compile_cache):
    out = run_train(str(tmp_path / "nan"), compile_cache, "--steps", "20", "learning_rate=1e30", "warmup_steps=0")
    assert out.returncode == 1
    assert "training stopped: the loss is" in out.stderr and " at step " in out.stderr, out.stderr[-2000:]


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    from qwax.train.loop import TrainingError, prepare_workdir
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "40").mkdir(parents=True)
    with pytest.raises(TrainingError, match="step 40.*--resume"):
        prepare_workdir(str(workdir), resume=False)
    assert prepare_workdir(str(workdir), resume=True) == 40
    assert prepare_workdir(str(tmp_path / "fresh"), resume=False) is None


def test_cli_takes_recipe_options_and_overrides_in_any_order():
    from qwax.cli import build_parser
    from qwax.train.recipes import get_recipe
    args = build_parser().parse_args(["train", "tiny", "--steps", "7", "seed=3", "--workdir", "w",
                                      "model.hidden_size=64", "data=a.txt,b.jsonl"])
    assert args.items == ["tiny", "seed=3", "model.hidden_size=64", "data=a.txt,b.jsonl"]
    assert args.steps == 7 and args.workdir == "w"
    recipe = get_recipe("tiny", args.items[1:])
    assert recipe.seed == 3 and recipe.data == ("a.txt", "b.jsonl")
    assert recipe.model_config(100).hidden_size == 64 and recipe.model_config(100).vocab_size == 100
    with pytest.raises(ValueError, match="no field 'nope'"):
        get_recipe("tiny", ["nope=1"])
    with pytest.raises(ValueError, match="QwaxConfig has no field"):
        get_recipe("tiny", ["model.nope=1"])


def test_named_recipes_build_valid_model_configs_and_run_options():
    from qwax.train.recipes import RECIPES
    for name, recipe in RECIPES.items():
        if not recipe.init_from:
            cfg = recipe.model_config()
            assert cfg.vocab_size > 0, name
        assert isinstance(recipe.run_options(), qwax.RunOptions), name
    big = RECIPES["qwen3.5-397b-a17b"]
    assert big.model_config().num_experts == 512 and big.mesh == "data=1,fsdp=64,expert=8,tensor=1"
    opts = big.run_options()
    assert (opts.dtype, opts.param_dtype, opts.remat) == (np.dtype(jnp.bfloat16), np.dtype("float32"), "full")
    assert RECIPES["tiny"].run_options() == qwax.RunOptions()


def test_run_option_overrides_go_to_the_run_options_not_the_config():
    from qwax.train.recipes import get_recipe
    recipe = get_recipe("tiny", ["model.remat=full", "model.dtype=bf16", "options.scan_layers=false",
                                 "options.gdn_chunk_size=32", "model.hidden_size=64"])
    assert dict(recipe.options_overrides) == {"remat": "full", "dtype": "bf16", "scan_layers": False,
                                              "gdn_chunk_size": 32}
    assert "remat" not in recipe.model_overrides and recipe.model_overrides["hidden_size"] == 64
    opts = recipe.run_options()
    assert (opts.remat, opts.dtype, opts.scan_layers, opts.gdn_chunk_size) == ("full", np.dtype(jnp.bfloat16),
                                                                               False, 32)
    assert recipe.model_config().hidden_size == 64
    assert get_recipe("tiny", ["options.gdn_chunk_size=none"]).run_options().gdn_chunk_size is None
    # The recipe written to the workdir keeps them apart too.
    assert json.loads(recipe.to_json())["options_overrides"]["remat"] == "full"


@pytest.mark.parametrize("items, message", [
    (["model.remat=sometimes"], "remat='sometimes'"),
    (["options.dtype=int8"], "dtype='int8'"),
    (["options.hidden_size=64"], "RunOptions has no field 'hidden_size'"),
    (["options.scan_layers=maybe"], "expected a boolean"),
    (["options.gdn_chunk_size=big"], "gdn_chunk_size"),
    (["model.hidden_size=wide"], "model.hidden_size='wide'"),
    (["model_overrides=x"], "'model_overrides': not settable on the command line"),
])
def test_bad_overrides_name_the_field_and_the_expected_value(items, message):
    from qwax.train.recipes import get_recipe
    with pytest.raises(ValueError, match=re.escape(message)):
        get_recipe("tiny", items)


def test_a_recipe_rejects_run_options_among_its_config_overrides():
    from qwax.train.recipes import Recipe
    with pytest.raises(ValueError, match=r"\['remat'\] are run options.*options_overrides"):
        Recipe(name="bad", model_overrides={"hidden_size": 64, "remat": "full"})
    with pytest.raises(ValueError, match="not RunOptions fields"):
        Recipe(name="bad", options_overrides={"hidden_size": 64})


def test_build_model_uses_the_recipe_run_options():
    from qwax.train.loop import build_model
    from qwax.train.recipes import get_recipe
    model_items = [item for item in TEST_OVERRIDES if item.startswith("model.")]  # a small model
    recipe = get_recipe("tiny", [*model_items, "model.dtype=bfloat16", "model.param_dtype=float32",
                                 "options.remat=dots"])
    model = build_model(recipe, 256, eos=0)
    assert model.options == recipe.run_options()
    assert model.options.remat == "dots" and model.embed_tokens[...].dtype == jnp.float32
    assert model.config.vocab_size == 256 and model.config.eos_token_id == 0


def _export_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    out = {}
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(hf_dir, name)))
    return out


@pytest.mark.slow
def test_resumed_run_replaces_its_export_and_transformers_continues_a_prompt_greedily_like_qwax(
        tmp_path, compile_cache):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    workdir = str(tmp_path / "export")
    out = run_train(workdir, compile_cache, "--steps", "6")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sample (" in out.stdout and "unigram entropy" in out.stdout
    hf_dir = os.path.join(workdir, "hf")
    first_export = _export_tensors(hf_dir)

    # Resuming with more steps trains them and exports over the run's own earlier export.
    out = run_train(workdir, compile_cache, "--steps", "9", "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "at step 6" in out.stdout and "steps 6 -> 9" in out.stdout, out.stdout[-2000:]
    assert sorted(logged_losses(workdir)) == list(range(1, 10))
    second_export = _export_tensors(hf_dir)
    assert second_export.keys() == first_export.keys()
    assert any(not np.array_equal(second_export[k], first_export[k]) for k in first_export)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json"} <= set(os.listdir(hf_dir))
    assert not [d for d in os.listdir(workdir) if d.startswith(".hf")], os.listdir(workdir)  # no leftovers

    import qwax
    from qwax import data as qdata
    from qwax.train.recipes import get_recipe
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    # transformers imposes the Qwen3.5 pipeline on the export's vocabulary: the run's tokenizer has it too.
    assert type(tok).__name__ == "Qwen3_5Tokenizer"
    recipe = get_recipe("tiny", TEST_OVERRIDES)
    held_out = qdata.split_documents(qdata.read_documents(recipe.data, recipe.text_field),
                                     recipe.eval_holdout_every)[1]
    run_tok = qdata.load_tokenizer(os.path.join(workdir, "tokenizer.json"))
    assert [e.ids for e in run_tok.encode_batch(held_out)] == tok(held_out)["input_ids"]
    assert transformers.GenerationConfig.from_pretrained(hf_dir).eos_token_id == [
        run_tok.token_to_id("<|im_end|>"), qdata.eos_id(run_tok)]
    prompt = np.asarray([tok("def read(path):\n    ")["input_ids"]], np.int64)
    ours = np.asarray(qwax.generate(qwax.load_hf(hf_dir), prompt.astype(np.int32), max_new_tokens=8))
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref.generate(torch.from_numpy(prompt), max_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=tok.pad_token_id).numpy()
    n = min(ours.shape[1], theirs.shape[1])
    np.testing.assert_array_equal(ours[:, :n], theirs[:, :n])
    assert n > prompt.shape[1]
