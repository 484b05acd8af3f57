"""The training loop: recipe -> data, tokenizer, model, optimizer -> jitted steps with metrics, evaluation and
checkpoints -> HF export and a generated sample.

`train(recipe, workdir)` is what `qwax train` runs. A workdir holds one run:

    WORKDIR/recipe.json        the recipe the run started with
    WORKDIR/tokenizer.json     the tokenizer (trained on the corpus or copied from a checkpoint)
    WORKDIR/checkpoints/STEP/  orbax checkpoints (params, optimizer state, data iterator state)
    WORKDIR/metrics.jsonl      one JSON object per logged step (step, loss, tokens_per_sec, mfu, ...)
    WORKDIR/tensorboard/       TensorBoard event files
    WORKDIR/hf/                the final model as a Hugging Face checkpoint (config, safetensors, tokenizer)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwax import data as qdata
from qwax.config import QwaxConfig
from qwax.model import QwaxForCausalLM
from qwax.options import RunOptions
from qwax.sharding.init import init_sharded
from qwax.train.checkpoint import Checkpointer
from qwax.train.metrics import MetricsLogger, flops_per_token, peak_flops
from qwax.train.optim import learning_rate_schedule, make_optimizer
from qwax.train.recipes import Recipe
from qwax.train.step import LossWeights, make_eval_step, make_train_step


class TrainingError(RuntimeError):
    """A run that cannot start or continue (existing workdir, diverged loss, ...)."""


class LossNotFinite(TrainingError):
    """The loss became NaN or infinite; the message names the step."""


@dataclasses.dataclass
class TrainResult:
    step: int
    final_loss: float  # mean training cross-entropy (nats/token) of the last min(10, steps) steps of this run
    unigram_entropy: float  # nats/token of the training corpus's token distribution
    eval_loss: float | None
    eval_perplexity: float | None
    tokens_per_sec: float
    mfu: float
    sample: str
    workdir: str
    hf_dir: str


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

    Each process loads `batch_size` rows of its own documents (qwax.data shards them by process); the global
    batch has batch_size x process_count rows, and every process supplies the rows its devices hold.
    """

    def __init__(self, mesh: Mesh, rules: Any, recipe: Recipe):
        from qwax.sharding import logical_sharding
        from qwax.sharding.mesh import mesh_sizes
        from qwax.sharding.multihost import process_rows

        pcount = jax.process_count()
        rows, seq = recipe.batch_size * pcount, recipe.seq_len
        sizes = mesh_sizes(mesh)
        split = math.prod(sizes.get(a, 1) for a in rules["batch"])
        if rows % split:
            raise TrainingError(f"the global batch of {rows} rows (batch_size {recipe.batch_size} x "
                                f"{pcount} processes) is not divisible by the batch axes "
                                f"{'x'.join(f'{a}={sizes.get(a, 1)}' for a in rules['batch'])} of mesh "
                                f"{recipe.mesh!r}: choose batch_size so that it is")
        self.train = logical_sharding((None, "batch", "length"), (recipe.grad_accum, rows, seq), rules, mesh)
        self.eval = logical_sharding(("batch", "length"), (rows, seq), rules, mesh)
        local = len(process_rows(self.eval, rows, (seq,)))
        if local != recipe.batch_size:
            raise TrainingError(f"mesh {recipe.mesh!r}: the devices of process {jax.process_index()} hold {local} "
                                f"rows of the global batch, but each process loads batch_size="
                                f"{recipe.batch_size}: only the batch axes may span processes")
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
                rules: Any = None) -> str:
    """A sampled continuation of `prompt` (temperature 0.8, top-p 0.95) decoded to text."""
    from qwax.inference.generate import generate
    ids = np.asarray([tok.encode(prompt).ids or [qdata.eos_id(tok)]], np.int32)
    placement = {} if mesh is None else {"mesh": mesh, "rules": rules}
    out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95,
                   eos_token_id=qdata.eos_id(tok), seed=seed, **placement)
    return tok.decode([int(t) for t in np.asarray(out)[0]], skip_special_tokens=True)


def train(recipe: Recipe, workdir: str, *, resume: bool = False, steps: int | None = None, progress: bool = True,
          export: bool = True, sample: bool = True, verbose: bool = True) -> TrainResult:
    """Run (or continue) the recipe in `workdir` up to `steps` (default recipe.steps) optimizer steps."""
    run_start = time.perf_counter()
    if steps is not None:
        recipe = dataclasses.replace(recipe, steps=steps)
    workdir = os.path.abspath(workdir)
    latest = prepare_workdir(workdir, resume)
    pidx, pcount = jax.process_index(), jax.process_count()
    primary = pidx == 0
    say = print if (verbose and primary) else (lambda *a, **k: None)
    # Parallelism: without a mesh everything runs on the default device; with one, parameters and optimizer
    # state are sharded by the strategy's rules and batches over its batch axes.
    mesh, rules = build_mesh(recipe) if recipe.mesh else (None, None)
    placement = BatchPlacement(mesh, rules, recipe) if mesh is not None else None
    os.makedirs(workdir, exist_ok=True)

    # Data and tokenizer.
    docs = qdata.read_documents(recipe.data, recipe.text_field)
    train_docs, eval_docs = qdata.split_documents(docs, recipe.eval_holdout_every)
    tok = load_tokenizer_for(recipe, workdir, train_docs)
    eos = qdata.eos_id(tok)
    vocab = tok.get_vocab_size()
    entropy = qdata.unigram_entropy(qdata.tokenize_documents(train_docs, tok), vocab)
    if primary and not os.path.isfile(os.path.join(workdir, "recipe.json")):
        with open(os.path.join(workdir, "recipe.json"), "w") as f:
            f.write(recipe.to_json())

    # Model, optimizer, step functions.
    model = build_model(recipe, vocab, eos, mesh, rules)
    cfg: QwaxConfig = model.config
    options: RunOptions = model.options
    graphdef, params = nnx.split(model)
    del model
    optimizer = make_optimizer(learning_rate=recipe.learning_rate, warmup_steps=recipe.warmup_steps,
                               total_steps=recipe.steps, end_lr_ratio=recipe.end_lr_ratio,
                               weight_decay=recipe.weight_decay, b1=recipe.b1, b2=recipe.b2, eps=recipe.eps,
                               clip_norm=recipe.clip_norm)
    schedule = learning_rate_schedule(recipe.learning_rate, recipe.warmup_steps, recipe.steps, recipe.end_lr_ratio)
    weights = LossWeights(router_aux_loss_coef=cfg.router_aux_loss_coef if cfg.has_moe else 0.0,
                          z_loss_coef=recipe.z_loss_coef,
                          mtp_loss_weight=recipe.mtp_loss_weight if cfg.mtp_num_hidden_layers else 0.0)
    step_fn = make_train_step(graphdef, optimizer, weights, options.dtype)
    eval_fn = make_eval_step(graphdef, options.dtype)
    if mesh is None:
        opt_state = optimizer.init(params)
        train_step = jax.jit(step_fn, donate_argnums=(0, 1))
        eval_step = jax.jit(eval_fn)
    else:
        from qwax.sharding import follow_params, param_shardings
        param_sh = param_shardings(params, rules, mesh)
        params = jax.device_put(params, param_sh)  # already in place (built or loaded into its shards)
        opt_sh = follow_params(jax.eval_shape(optimizer.init, params), params, param_sh, mesh)
        opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
        replicated = NamedSharding(mesh, PartitionSpec())
        train_step = _under_mesh(jax.jit(step_fn, in_shardings=(param_sh, opt_sh, placement.train, replicated),
                                         out_shardings=(param_sh, opt_sh, replicated), donate_argnums=(0, 1)),
                                 mesh, rules)
        eval_step = _under_mesh(jax.jit(eval_fn, in_shardings=(param_sh, placement.eval),
                                        out_shardings=replicated), mesh, rules)
        say(f"mesh {recipe.mesh!r} ({dict(zip(mesh.axis_names, mesh.axis_sizes))}), sharding strategy "
            f"{recipe.sharding_strategy or 'fsdp'}: {jax.device_count()} devices, {pcount} processes")

    batches = iter(qdata.train_batches(train_docs, tok, seq_len=recipe.seq_len, batch_size=recipe.batch_size,
                                       grad_accum=recipe.grad_accum, seed=recipe.seed, process_index=pidx,
                                       process_count=pcount))
    evals = (qdata.eval_batches(eval_docs, tok, seq_len=recipe.seq_len, batch_size=recipe.batch_size,
                                max_batches=recipe.eval_batches, process_index=pidx, process_count=pcount)
             if eval_docs and recipe.eval_batches > 0 else [])
    if placement is not None:
        evals = [placement.eval_batch(b) for b in evals]

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=recipe.checkpoint_every,
                        keep=recipe.keep_checkpoints)
    start = 0
    if latest is not None:
        params, opt_state, meta = ckpt.restore(latest, params, opt_state, batches)
        start = int(meta["step"])
        say(f"resumed from {ckpt.directory}/{latest} at step {start}")

    def evaluate() -> tuple[float, float] | None:
        if not evals:
            return None
        total = count = 0.0
        for b in evals:
            s, n = eval_step(params, b)
            total, count = total + float(s), count + float(n)
        loss = total / max(count, 1.0)
        return loss, math.exp(min(loss, 50.0))

    tokens_per_step = recipe.grad_accum * recipe.batch_size * recipe.seq_len * pcount
    fpt = flops_per_token(cfg, recipe.seq_len, options=options)
    per_device, peak_source = (recipe.peak_flops, "the recipe's peak_flops") if recipe.peak_flops else peak_flops()
    peak = per_device * jax.device_count()
    n_params, n_active = cfg.param_count(include_mtp=True)
    say(f"qwax train {recipe.name}: {n_params / 1e6:.2f}M parameters ({n_active / 1e6:.2f}M active), "
        f"vocab {cfg.vocab_size}, {len(train_docs)} training documents, {tokens_per_step} tokens/step, "
        f"steps {start} -> {recipe.steps}, workdir {workdir}")
    say(f"unigram entropy of the corpus: {entropy:.4f} nats/token; model FLOPs/token {fpt / 1e6:.1f}M, "
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
            params, opt_state, metrics = train_step(params, opt_state, batch, rng)
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise LossNotFinite(f"training stopped: the loss is {loss} at step {step} (ce "
                                    f"{float(metrics['ce'])}, grad norm {float(metrics['grad_norm'])}); the last "
                                    f"complete checkpoint is step {ckpt.latest_step()}")
            ce = float(metrics["ce"])
            step_seconds = time.perf_counter() - step_started
            recent = (recent + [ce])[-10:]
            window_steps += 1
            now = time.perf_counter()
            if step == start + 1:  # the first step compiles: keep it out of the throughput numbers
                window_start, window_steps = now, 0
            elif window_steps:
                tokens_per_sec = window_steps * tokens_per_step / (now - window_start)
                mfu = fpt * tokens_per_sec / peak
            logger.progress(step, {"loss": f"{ce:.3f}", "tok/s": f"{tokens_per_sec:,.0f}", "mfu": f"{mfu:.1%}"})
            if step % recipe.log_every == 0 or step == recipe.steps:
                row = {k: float(v) for k, v in metrics.items()}
                row.update(loss=ce, objective=loss, learning_rate=float(schedule(step - 1)),
                           tokens_per_sec=tokens_per_sec, mfu=mfu)
                logger.write(step, row)
                window_start, window_steps = now, 0
            if recipe.eval_every and step % recipe.eval_every == 0 and step != recipe.steps:
                result = evaluate()
                if result:
                    logger.write(step, {"eval_loss": result[0], "eval_perplexity": result[1]})
                    logger.message(f"step {step}: eval loss {result[0]:.4f}, perplexity {result[1]:.2f}")
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
            f.write(json.dumps({"step": step, "eval_loss": result[0], "eval_perplexity": result[1]}) + "\n")
    final_loss = float(np.mean(recent)) if recent else float("nan")

    hf_dir = os.path.join(workdir, "hf")
    text = ""
    if export or sample:
        if mesh is not None and pcount > 1:  # the export reads every parameter on the primary process
            from jax.experimental import multihost_utils
            params = multihost_utils.process_allgather(params, tiled=True)
        model = nnx.merge(graphdef, params)
        if export and primary:
            from qwax.convert.hf import save_hf
            # A resumed run replaces its own earlier export; the old one stays until the new one is complete.
            save_hf(model, hf_dir, overwrite=latest is not None,
                    extra_files=lambda tmp: qdata.save_for_hf(tok, tmp))
        if sample:
            text = sample_text(model, tok, recipe.sample_prompt, recipe.sample_tokens, recipe.seed, mesh, rules)

    if stopped_early:
        say(f"training stopped early at step {step} of {recipe.steps} (time budget {recipe.time_budget_minutes} min)")
    say(f"\nfinal training loss (mean of the last {len(recent)} steps): {final_loss:.4f} nats/token")
    say(f"unigram entropy of the corpus:                 {entropy:.4f} nats/token"
        f" -> the model is {'below' if final_loss < entropy else 'NOT below'} it")
    if result:
        say(f"held-out loss {result[0]:.4f}, perplexity {result[1]:.2f}")
    say(f"throughput {tokens_per_sec:,.0f} tokens/s, MFU {mfu:.1%}")
    say(f"checkpoint: {ckpt.directory}/{step}" + (f"; Hugging Face export: {hf_dir}" if export else ""))
    if sample:
        say(f"sample ({recipe.sample_tokens} tokens after {recipe.sample_prompt!r}):\n{text}")
    return TrainResult(step=step, final_loss=final_loss, unigram_entropy=entropy,
                       eval_loss=None if not result else result[0],
                       eval_perplexity=None if not result else result[1], tokens_per_sec=tokens_per_sec, mfu=mfu,
                       sample=text, workdir=workdir, hf_dir=hf_dir)
