"""The training loop: recipe -> data, tokenizer, model, optimizer -> jitted steps with metrics, evaluation and
checkpoints -> HF export and a generated sample.

`train(recipe, workdir)` is what `qwax train` runs. A workdir holds one run:

    WORKDIR/recipe.json        the recipe the run started with
    WORKDIR/tokenizer.json     the tokenizer (trained on the corpus or copied from a checkpoint)
    WORKDIR/checkpoints/STEP/  orbax checkpoints (params, optimizer state, data iterator state)
    WORKDIR/metrics.jsonl      one JSON object per logged step (step, loss, tokens_per_sec, mfu, ...)
    WORKDIR/tensorboard/       TensorBoard event files
    WORKDIR/hf/                the final model as a Hugging Face checkpoint (config, safetensors, tokenizer;
                               LoRA merged into the weights)
    WORKDIR/hf-adapter/        with LoRA: the adapters as a PEFT adapter directory of the init_from checkpoint
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwax import data as qdata
from qwax.config import QwaxConfig
from qwax.inference.chat_template import ChatTemplate
from qwax.lora import LINEAR, TRAINABLE, apply_lora, has_lora, lora_modules, merge_lora
from qwax.model import QwaxForCausalLM
from qwax.options import RunOptions
from qwax.sharding.init import init_sharded
from qwax.train.checkpoint import Checkpointer
from qwax.train.metrics import MetricsLogger, flops_per_token, peak_flops
from qwax.train.optim import learning_rate_schedule, make_optimizer
from qwax.train.recipes import Recipe
from qwax.train.dpo import dpo_objective, make_dpo_eval_step, pair_metrics
from qwax.train.step import LossWeights, make_eval_step, make_train_step
from qwax.train.tasks import DataError, TaskData, copy_tokenizer_files, prepare_data, resolve_recipe


class TrainingError(RuntimeError):
    """A run that cannot start or continue (existing workdir, diverged loss, ...)."""


class LossNotFinite(TrainingError):
    """The loss became NaN or infinite; the message names the step."""


@dataclasses.dataclass
class TrainResult:
    step: int
    final_loss: float  # mean training loss (lm, sft: cross-entropy in nats/token; dpo: the DPO loss) of the last
    # min(10, steps) steps of this run
    unigram_entropy: float | None  # lm: nats/token of the training corpus's token distribution
    eval_loss: float | None
    eval_perplexity: float | None
    tokens_per_sec: float
    mfu: float
    sample: str
    workdir: str
    hf_dir: str
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the final held-out metrics
    adapter_dir: str | None = None  # the PEFT adapter export of a LoRA run


def prepare_workdir(workdir: str, resume: bool) -> int | None:
    """Check that `workdir` may be used; return the latest complete checkpoint step when resuming."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(ckpt_dir) else []
    has_run = bool(steps) or os.path.isfile(os.path.join(workdir, "recipe.json"))
    if has_run and not resume:
        where = f"a checkpoint at step {steps[-1]}" if steps else "a run without checkpoints"
        raise TrainingError(f"workdir {workdir!r} already holds {where}; pass --resume to continue that run, or "
                            f"--workdir DIR to start a new one")
    return steps[-1] if steps else None


def load_tokenizer_for(recipe: Recipe, workdir: str, train_docs: list[str]):
    """The run's tokenizer: the workdir's (resume), the recipe's, or a BPE trained on the training documents."""
    saved = os.path.join(workdir, "tokenizer.json")
    if os.path.isfile(saved):
        return qdata.load_tokenizer(saved)
    if recipe.tokenizer == "init_from":
        tok = qdata.load_tokenizer(recipe.init_from)
    elif recipe.tokenizer:
        tok = qdata.load_tokenizer(recipe.tokenizer)
    else:
        tok = qdata.train_bpe(train_docs, recipe.vocab_size)
    tok.save(saved)
    return tok


def build_model(recipe: Recipe, vocab_size: int, eos: int, mesh: Mesh | None = None,
                rules: Any = None) -> QwaxForCausalLM:
    """The model of the recipe, with its run options (`recipe.run_options()`, as `model.options`); with a mesh
    its parameters are built (or loaded) directly into their shards."""
    if recipe.init_from:
        from qwax.convert.hf import load_hf
        placement = {} if mesh is None else {"mesh": mesh, "rules": rules}
        # load_hf takes the run options as keywords, beside the config overrides.
        model = load_hf(recipe.init_from, **placement, **dict(recipe.options_overrides),
                        **dict(recipe.model_overrides))
        if model.config.vocab_size < vocab_size:
            raise TrainingError(f"tokenizer has {vocab_size} tokens but the checkpoint {recipe.init_from!r} only "
                                f"{model.config.vocab_size}")
        return model
    cfg = recipe.model_config(vocab_size).replace(eos_token_id=eos, pad_token_id=eos)
    options = recipe.run_options()
    if mesh is None:
        return QwaxForCausalLM(cfg, options, rngs=nnx.Rngs(recipe.seed))
    # The same values as on one device.
    graphdef, params, _ = init_sharded(cfg, mesh, rules, recipe.seed, options)
    return nnx.merge(graphdef, params)


def build_mesh(recipe: Recipe) -> tuple[Mesh, Any]:
    """(mesh, rule table) of the recipe's `mesh` spec and `sharding_strategy` (default "fsdp")."""
    from qwax.sharding import get_rules, make_mesh
    try:
        rules = get_rules(recipe.sharding_strategy or "fsdp")
        mesh = make_mesh(recipe.mesh)
    except (KeyError, ValueError) as e:
        raise TrainingError(f"mesh={recipe.mesh!r} sharding_strategy={recipe.sharding_strategy!r}: "
                            f"{e.args[0] if e.args else e} ({jax.device_count()} devices, "
                            f"{jax.process_count()} processes; mesh= trains on one device without a mesh)") from None
    return mesh, rules


class BatchPlacement:
    """Training and evaluation batches as global arrays sharded over the rules' batch axes.

    Each process loads `rows_per_process` rows (default batch_size; 2 x batch_size for DPO's chosen and rejected
    rows) of its own documents (qwax.data shards them by process); the global batch has rows_per_process x
    process_count rows, and every process supplies the rows its devices hold.
    """

    def __init__(self, mesh: Mesh, rules: Any, recipe: Recipe, rows_per_process: int | None = None):
        from qwax.sharding import logical_sharding
        from qwax.sharding.mesh import mesh_sizes
        from qwax.sharding.multihost import process_rows

        pcount = jax.process_count()
        local_rows = recipe.batch_size if rows_per_process is None else rows_per_process
        rows, seq = local_rows * pcount, recipe.seq_len
        sizes = mesh_sizes(mesh)
        split = math.prod(sizes.get(a, 1) for a in rules["batch"])
        if rows % split:
            raise TrainingError(f"the global batch of {rows} rows ({local_rows} per process x "
                                f"{pcount} processes) is not divisible by the batch axes "
                                f"{'x'.join(f'{a}={sizes.get(a, 1)}' for a in rules['batch'])} of mesh "
                                f"{recipe.mesh!r}: choose batch_size so that it is")
        self.train = logical_sharding((None, "batch", "length"), (recipe.grad_accum, rows, seq), rules, mesh)
        self.eval = logical_sharding(("batch", "length"), (rows, seq), rules, mesh)
        local = len(process_rows(self.eval, rows, (seq,)))
        if local != local_rows:
            raise TrainingError(f"mesh {recipe.mesh!r}: the devices of process {jax.process_index()} hold {local} "
                                f"rows of the global batch, but each process loads {local_rows} rows: only the "
                                "batch axes may span processes")
        self.pcount = pcount

    def _place(self, batch: dict, sharding: NamedSharding, dim: int) -> dict:
        from qwax.sharding.multihost import global_array

        def one(x):
            shape = list(x.shape)
            shape[dim] *= self.pcount
            return global_array(x, sharding, tuple(shape))

        return {k: one(v) for k, v in batch.items()}

    def train_batch(self, batch: dict) -> dict:  # [grad_accum, batch_size, seq_len] arrays
        return self._place(batch, self.train, 1)

    def eval_batch(self, batch: dict) -> dict:  # [batch_size, seq_len] arrays
        return self._place(batch, self.eval, 0)


def _under_mesh(fn, mesh: Mesh, rules: Any):
    """`fn` called (and so traced) with the mesh and rules active: activation constraints and expert parallelism."""
    from qwax.sharding import use_sharding

    def call(*args):
        with use_sharding(mesh, rules):
            return fn(*args)

    return call


def sample_text(model: QwaxForCausalLM, tok, prompt: str, max_new_tokens: int, seed: int, mesh: Mesh | None = None,
                rules: Any = None, template: ChatTemplate | None = None) -> str:
    """A sampled continuation (temperature 0.8, top-p 0.95) decoded to text: `prompt` and its continuation, or
    with a chat `template` the reply to the user message `prompt` (rendered as a chat prompt; stops at
    <|im_end|>)."""
    from qwax.inference.generate import generate
    stops = [qdata.eos_id(tok)]
    if template is not None:
        prompt = template.render([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                 enable_thinking=False)
        end = tok.token_to_id("<|im_end|>")
        stops += [end] if end is not None else []
    ids = np.asarray([tok.encode(prompt).ids or stops[:1]], np.int32)
    placement = {} if mesh is None else {"mesh": mesh, "rules": rules}
    out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95, eos_token_id=stops,
                   seed=seed, **placement)
    shown = np.asarray(out)[0, ids.shape[1] if template is not None else 0:]
    return tok.decode([int(t) for t in shown], skip_special_tokens=True)


def split_trainable(model: QwaxForCausalLM) -> tuple[nnx.GraphDef, nnx.State, nnx.State | None]:
    """(graphdef, trained state, frozen state): the LoRA adapters and the rest when the model has adapters, else
    the whole state and None."""
    if has_lora(model):
        graphdef, params, frozen = nnx.split(model, TRAINABLE, ...)
        return graphdef, params, frozen
    graphdef, params = nnx.split(model)
    return graphdef, params, None


def work_per_token(cfg: QwaxConfig, recipe: Recipe, options: RunOptions) -> float:
    """Model FLOPs per trained token of one step: forward + input gradients + weight gradients (3 forwards); LoRA
    computes no weight gradients of the base (2); DPO adds the reference model's forward (1)."""
    forwards = (2 if recipe.lora_rank else 3) + (1 if recipe.task == "dpo" else 0)
    return forwards * flops_per_token(cfg, recipe.seq_len, training=False, options=options)


def train(recipe: Recipe, workdir: str, *, resume: bool = False, steps: int | None = None, progress: bool = True,
          export: bool = True, sample: bool = True, verbose: bool = True) -> TrainResult:
    """Run (or continue) the recipe in `workdir` up to `steps` (default recipe.steps) optimizer steps."""
    run_start = time.perf_counter()
    if steps is not None:
        recipe = dataclasses.replace(recipe, steps=steps)
    try:
        recipe = resolve_recipe(recipe)
    except DataError as e:
        raise TrainingError(str(e)) from None
    workdir = os.path.abspath(workdir)
    latest = prepare_workdir(workdir, resume)
    pidx, pcount = jax.process_index(), jax.process_count()
    primary = pidx == 0
    say = print if (verbose and primary) else (lambda *a, **k: None)
    os.makedirs(workdir, exist_ok=True)

    # Data and tokenizer.
    try:
        data = prepare_data(recipe, workdir, load_tokenizer_for, pidx, pcount)
    except DataError as e:
        raise TrainingError(str(e)) from None
    tok, batches, evals = data.tokenizer, data.batches, data.evals
    eos = qdata.eos_id(tok)
    vocab = tok.get_vocab_size()
    if primary and not os.path.isfile(os.path.join(workdir, "recipe.json")):
        with open(os.path.join(workdir, "recipe.json"), "w") as f:
            f.write(recipe.to_json())
    # Parallelism: without a mesh everything runs on the default device; with one, parameters and optimizer
    # state are sharded by the strategy's rules and batches over its batch axes.
    mesh, rules = build_mesh(recipe) if recipe.mesh else (None, None)
    placement = BatchPlacement(mesh, rules, recipe, data.rows) if mesh is not None else None
    if placement is not None:
        evals = [placement.eval_batch(b) for b in evals]

    # Model (with LoRA adapters: only they are trained), optimizer, step functions.
    model = build_model(recipe, vocab, eos, mesh, rules)
    lora = recipe.lora_config()
    if lora is not None:
        apply_lora(model, lora, seed=recipe.seed)
        adapted = ", ".join(dict.fromkeys("experts" if part != LINEAR else path[-1]
                                          for path, part in lora_modules(model)))
    cfg: QwaxConfig = model.config
    options: RunOptions = model.options
    graphdef, params, frozen = split_trainable(model)
    del model
    optimizer = make_optimizer(learning_rate=recipe.learning_rate, warmup_steps=recipe.warmup_steps,
                               total_steps=recipe.steps, end_lr_ratio=recipe.end_lr_ratio,
                               weight_decay=recipe.weight_decay, b1=recipe.b1, b2=recipe.b2, eps=recipe.eps,
                               clip_norm=recipe.clip_norm)
    schedule = learning_rate_schedule(recipe.learning_rate, recipe.warmup_steps, recipe.steps, recipe.end_lr_ratio)
    if recipe.task == "dpo":
        objective = dpo_objective(recipe.dpo_beta)
        eval_fn = make_dpo_eval_step(graphdef, recipe.dpo_beta, options.dtype)
    else:
        objective = LossWeights(router_aux_loss_coef=cfg.router_aux_loss_coef if cfg.has_moe else 0.0,
                                z_loss_coef=recipe.z_loss_coef,
                                mtp_loss_weight=recipe.mtp_loss_weight if cfg.mtp_num_hidden_layers else 0.0)
        lm_eval = make_eval_step(graphdef, options.dtype)
        eval_fn = lambda p, b, f, r: lm_eval(p, b, f)  # noqa: E731 - the same arguments as DPO's
    step_fn = make_train_step(graphdef, optimizer, objective, options.dtype)
    if mesh is None:
        opt_state = optimizer.init(params)
        train_step = jax.jit(step_fn, donate_argnums=(0, 1))
        eval_step = jax.jit(eval_fn)
    else:
        from qwax.sharding import follow_params, param_shardings
        param_sh = param_shardings(params, rules, mesh)
        params = jax.device_put(params, param_sh)  # the base is already in place; new adapters move here
        frozen_sh = None if frozen is None else param_shardings(frozen, rules, mesh)
        frozen = None if frozen is None else jax.device_put(frozen, frozen_sh)
        ref_sh = param_sh if recipe.task == "dpo" else None
        opt_sh = follow_params(jax.eval_shape(optimizer.init, params), params, param_sh, mesh)
        opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
        replicated = NamedSharding(mesh, PartitionSpec())
        train_step = _under_mesh(jax.jit(step_fn, in_shardings=(param_sh, opt_sh, placement.train, replicated,
                                                                frozen_sh, ref_sh),
                                         out_shardings=(param_sh, opt_sh, replicated), donate_argnums=(0, 1)),
                                 mesh, rules)
        eval_step = _under_mesh(jax.jit(eval_fn, in_shardings=(param_sh, placement.eval, frozen_sh, ref_sh),
                                        out_shardings=replicated), mesh, rules)
        say(f"mesh {recipe.mesh!r} ({dict(zip(mesh.axis_names, mesh.axis_sizes))}), sharding strategy "
            f"{recipe.sharding_strategy or 'fsdp'}: {jax.device_count()} devices, {pcount} processes")
    # DPO's reference model: the starting values of the trained variables; with LoRA, adapters at zero, i.e. the
    # base model itself (no copy of the base).
    reference = None
    if recipe.task == "dpo":
        reference = jax.tree.map(jnp.zeros_like if lora is not None else jnp.copy, params)

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=recipe.checkpoint_every,
                        keep=recipe.keep_checkpoints)
    start = 0
    if latest is not None:
        params, opt_state, meta = ckpt.restore(latest, params, opt_state, batches)
        start = int(meta["step"])
        say(f"resumed from {ckpt.directory}/{latest} at step {start}")

    def evaluate() -> dict[str, float] | None:
        """Held-out metrics: eval_loss and eval_perplexity (lm, sft: of the target tokens), or the DPO metrics
        of the held-out pairs (eval_loss, eval_reward_accuracy, ...)."""
        if not evals:
            return None
        sums = None
        for b in evals:
            out = eval_step(params, b, frozen, reference)
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        if recipe.task == "dpo":
            return {f"eval_{k}": float(v) for k, v in pair_metrics(sums).items() if k != "pairs"}
        loss = float(sums[0]) / max(float(sums[1]), 1.0)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    def eval_line(result: dict[str, float]) -> str:
        text = f"eval loss {result['eval_loss']:.4f}"
        if "eval_perplexity" in result:
            return text + f", perplexity {result['eval_perplexity']:.2f}"
        return text + f", reward accuracy {result['eval_reward_accuracy']:.3f}, margin " \
                      f"{result['eval_reward_margin']:.4f}"

    tokens_per_step = recipe.grad_accum * data.rows * recipe.seq_len * pcount
    fpt = work_per_token(cfg, recipe, options)
    per_device, peak_source = (recipe.peak_flops, "the recipe's peak_flops") if recipe.peak_flops else peak_flops()
    peak = per_device * jax.device_count()
    n_params, n_active = cfg.param_count(include_mtp=True)
    trained = sum(x.size for x in jax.tree.leaves(params))
    say(f"qwax train {recipe.name}: {n_params / 1e6:.2f}M parameters ({n_active / 1e6:.2f}M active), "
        f"vocab {cfg.vocab_size}, {data.describe(recipe.task)}, {tokens_per_step} tokens/step, "
        f"steps {start} -> {recipe.steps}, workdir {workdir}")
    if recipe.init_from:
        say(f"starting from {recipe.init_from}" + (f"; LoRA rank {lora.rank}, alpha {lora.alpha} on "
                                                   f"{adapted}: {trained / 1e6:.3f}M trained parameters, the base "
                                                   "frozen" if lora is not None else ""))
    if data.entropy is not None:
        say(f"unigram entropy of the corpus: {data.entropy:.4f} nats/token; model FLOPs/token {fpt / 1e6:.1f}M, "
            f"peak {peak / 1e9:.0f} GFLOP/s ({peak_source})")

    logger = MetricsLogger(workdir, total_steps=recipe.steps, initial_step=start, enabled=primary,
                           progress=progress)
    recent: list[float] = []
    window_start, window_steps = time.perf_counter(), 0
    tokens_per_sec = mfu = 0.0
    step = last_saved = start
    budget = recipe.time_budget_minutes * 60.0
    stopped_early = False
    step_seconds = 0.0
    # The headline training number: next-token loss of the targets (lm, sft) or the DPO loss.
    headline = "loss" if recipe.task == "dpo" else "ce"
    if start == 0 and recipe.task != "lm":  # fine-tuning: the starting model's held-out numbers, to compare with
        result = evaluate()
        if result:
            logger.write(0, result)
            logger.message(f"step 0: {eval_line(result)}")
    try:
        for step in range(start + 1, recipe.steps + 1):
            # Keep ~15% of the budget for the final evaluation, export and sample.
            if budget and step > start + 1 and time.perf_counter() - run_start + step_seconds > 0.85 * budget:
                step -= 1
                stopped_early = True
                logger.message(f"stopping at step {step} of {recipe.steps}: the time budget of "
                               f"{recipe.time_budget_minutes} min would be exceeded")
                break
            step_started = time.perf_counter()
            batch = next(batches)
            if placement is not None:
                batch = placement.train_batch(batch)
            rng = jax.random.fold_in(jax.random.key(recipe.seed), step)
            params, opt_state, metrics = train_step(params, opt_state, batch, rng, frozen, reference)
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise LossNotFinite(f"training stopped: the loss is {loss} at step {step} ({headline} "
                                    f"{float(metrics[headline])}, grad norm {float(metrics['grad_norm'])}); the "
                                    f"last complete checkpoint is step {ckpt.latest_step()}")
            main = float(metrics[headline])
            step_seconds = time.perf_counter() - step_started
            recent = (recent + [main])[-10:]
            window_steps += 1
            now = time.perf_counter()
            if step == start + 1:  # the first step compiles: keep it out of the throughput numbers
                window_start, window_steps = now, 0
            elif window_steps:
                tokens_per_sec = window_steps * tokens_per_step / (now - window_start)
                mfu = fpt * tokens_per_sec / peak
            postfix = {"loss": f"{main:.3f}", "tok/s": f"{tokens_per_sec:,.0f}", "mfu": f"{mfu:.1%}"}
            if recipe.task == "dpo":
                postfix["acc"] = f"{float(metrics['reward_accuracy']):.2f}"
            logger.progress(step, postfix)
            if step % recipe.log_every == 0 or step == recipe.steps:
                row = {k: float(v) for k, v in metrics.items()}
                row.update(loss=main, objective=loss, learning_rate=float(schedule(step - 1)),
                           tokens_per_sec=tokens_per_sec, mfu=mfu)
                logger.write(step, row)
                window_start, window_steps = now, 0
            if recipe.eval_every and step % recipe.eval_every == 0 and step != recipe.steps:
                result = evaluate()
                if result:
                    logger.write(step, result)
                    logger.message(f"step {step}: {eval_line(result)}")
            if ckpt.save(step, params, opt_state, batches, meta={"recipe": recipe.name}):
                last_saved = step
        if last_saved != step:
            ckpt.save(step, params, opt_state, batches, meta={"recipe": recipe.name}, force=True)
        ckpt.wait()
    finally:
        logger.close()
        ckpt.close()

    result = evaluate()
    if result:
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **result}) + "\n")
    final_loss = float(np.mean(recent)) if recent else float("nan")

    hf_dir = os.path.join(workdir, "hf")
    adapter_dir = os.path.join(workdir, "hf-adapter")
    text = ""
    if export or sample:
        if mesh is not None and pcount > 1:  # the export reads every parameter on the primary process
            from jax.experimental import multihost_utils
            params = multihost_utils.process_allgather(params, tiled=True)
            frozen = None if frozen is None else multihost_utils.process_allgather(frozen, tiled=True)
        model = nnx.merge(graphdef, params, *(() if frozen is None else (frozen,)))
        if export and primary:
            export_run(model, recipe, data, hf_dir, adapter_dir, overwrite=latest is not None)
        if sample:
            text = sample_text(model, tok, recipe.sample_prompt, recipe.sample_tokens, recipe.seed, mesh, rules,
                               template=data.template)

    if stopped_early:
        say(f"training stopped early at step {step} of {recipe.steps} (time budget {recipe.time_budget_minutes} min)")
    what = {"lm": "training loss", "sft": "training loss of the assistant tokens", "dpo": "DPO loss"}[recipe.task]
    say(f"\nfinal {what} (mean of the last {len(recent)} steps): {final_loss:.4f}" +
        (" nats/token" if recipe.task != "dpo" else ""))
    if data.entropy is not None:
        say(f"unigram entropy of the corpus:                 {data.entropy:.4f} nats/token"
            f" -> the model is {'below' if final_loss < data.entropy else 'NOT below'} it")
    if result:
        say(f"held-out {eval_line(result)}")
    say(f"throughput {tokens_per_sec:,.0f} tokens/s, MFU {mfu:.1%}")
    exported = f"; Hugging Face export: {hf_dir}" if export else ""
    if export and lora is not None:
        exported += f", PEFT adapter: {adapter_dir}"
    say(f"checkpoint: {ckpt.directory}/{step}" + exported)
    if sample:
        say(f"sample ({recipe.sample_tokens} tokens after {recipe.sample_prompt!r}):\n{text}")
    return TrainResult(step=step, final_loss=final_loss, unigram_entropy=data.entropy,
                       eval_loss=None if not result else result["eval_loss"],
                       eval_perplexity=None if not result else result.get("eval_perplexity"),
                       tokens_per_sec=tokens_per_sec, mfu=mfu, sample=text, workdir=workdir, hf_dir=hf_dir,
                       eval_metrics=result or {}, adapter_dir=adapter_dir if lora is not None and export else None)


def export_run(model: QwaxForCausalLM, recipe: Recipe, data: TaskData, hf_dir: str, adapter_dir: str, *,
               overwrite: bool) -> None:
    """Write the run's Hugging Face checkpoint `hf_dir` (LoRA merged into the weights) with its tokenizer files,
    and with LoRA the PEFT adapter directory `adapter_dir` against the starting checkpoint.

    A resumed run replaces its own earlier export; the old one stays until the new one is complete."""
    from qwax.convert.hf import save_hf
    from qwax.convert.peft import save_peft
    if recipe.task == "lm":
        tok = data.tokenizer
        save_hf(model, hf_dir, overwrite=overwrite, extra_files=lambda tmp: qdata.save_for_hf(tok, tmp))
        return
    template = data.template if recipe.chat_template not in ("", "init_from") else None
    save_hf(merge_lora(model) if has_lora(model) else model, hf_dir, overwrite=overwrite,
            extra_files=lambda tmp: copy_tokenizer_files(recipe.init_from, tmp, template))
    if has_lora(model):
        save_peft(model, adapter_dir, base_model_name_or_path=recipe.init_from, overwrite=overwrite)
