# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # qwax quickstart: train a tiny Qwen3.5-MoE, look at its experts, generate text
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qwax/blob/main/notebooks/01_quickstart.ipynb)
#
# A Qwen3.5-MoE-shaped model (3 Gated DeltaNet layers + 1 gated-attention layer, every layer a sparse
# mixture of experts) is trained from scratch on the corpus that ships inside qwax (Python standard-library
# docstrings), with the same tokenizer, data pipeline, optimizer and train step as `qwax train tiny`.
# Then we look at how the router spreads tokens over the experts, and sample from the model.
# On a CPU this takes one to two minutes; on a GPU or TPU the run is longer and the model larger.

# %%
# Set-up: install qwax where it is missing (Colab, a fresh TPU VM), then detect the backend.
import importlib, subprocess, sys
try:
    import qwax
except ImportError:  # OWNER: the GitHub account hosting qwax, filled in once the repository is public
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                           "qwax[hf] @ git+https://github.com/OWNER/qwax"])
    importlib.invalidate_caches()
    import qwax

import jax
import jax.numpy as jnp
import numpy as np
import matplotlib.pyplot as plt
from flax import nnx
# %matplotlib inline

BACKEND = jax.default_backend()  # "cpu", "gpu" or "tpu"
ON_CPU = BACKEND == "cpu"        # small sizes on the CPU (and in CI), larger ones on an accelerator
print(f"qwax {qwax.__version__}, jax {jax.__version__}: {jax.device_count()} x "
      f"{jax.devices()[0].device_kind} ({BACKEND})")

# %% [markdown]
# ## The recipe
#
# `qwax.train.recipes.get_recipe("tiny", overrides)` is the recipe `qwax train tiny` runs: a `tiny-moe`
# preset with overrides, the embedded corpus, a byte-level BPE trained on it, AdamW with warm-up and cosine
# decay. Overrides are `key=value` strings (`model.FIELD=value` for model config fields). On the CPU we
# shrink it to finish in about a minute.

# %%
from qwax import data as qdata
from qwax.train.recipes import get_recipe

if ON_CPU:
    overrides = ["steps=200", "seq_len=128", "batch_size=8", "vocab_size=1024", "warmup_steps=20",
                 "model.hidden_size=64", "model.moe_intermediate_size=64",
                 "model.shared_expert_intermediate_size=64"]
else:
    overrides = ["steps=600", "seq_len=256", "batch_size=32", "warmup_steps=60"]
recipe = get_recipe("tiny", overrides)
print(f"{recipe.steps} steps of {recipe.batch_size} x {recipe.seq_len} tokens, lr {recipe.learning_rate}")

# %% [markdown]
# ## Data and tokenizer
#
# Every 50th document is held out for evaluation. The BPE tokenizer is trained on the training documents
# (a few seconds); `train_batches` packs documents into rows with `segment_ids`, so attention and the
# Gated DeltaNet state never cross a document boundary.

# %%
docs = qdata.read_documents(recipe.data, recipe.text_field)
train_docs, eval_docs = qdata.split_documents(docs, recipe.eval_holdout_every)
tok = qdata.train_bpe(train_docs, recipe.vocab_size)
eos = qdata.eos_id(tok)
entropy = qdata.unigram_entropy(qdata.tokenize_documents(train_docs, tok), tok.get_vocab_size())
print(f"{len(train_docs)} training / {len(eval_docs)} held-out documents, vocabulary {tok.get_vocab_size()}, "
      f"unigram entropy {entropy:.3f} nats/token")
print(repr(train_docs[0][:300]))

# %% [markdown]
# ## The model
#
# `recipe.model_config(vocab)` is `qwax.get_preset("tiny-moe", **overrides)`: a `QwaxConfig` whose field
# names follow the Hugging Face config. The model is a Flax NNX module; `nnx.split` turns it into a static
# graph definition and a pytree of parameters for the pure-functional train step.

# %%
cfg = recipe.model_config(tok.get_vocab_size()).replace(eos_token_id=eos, pad_token_id=eos)
model = qwax.QwaxForCausalLM(cfg, rngs=nnx.Rngs(recipe.seed))
total, active = cfg.param_count()
print(f"{cfg.model_type}: {cfg.num_hidden_layers} layers {cfg.layer_types}")
print(f"hidden {cfg.hidden_size}, {cfg.num_experts} experts (top-{cfg.num_experts_per_tok}) + a shared expert")
print(f"{total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token")
graphdef, params = nnx.split(model)

# %% [markdown]
# ## Training
#
# `make_train_step` returns the pure step `(params, opt_state, batch, rng) -> (params, opt_state, metrics)`;
# the objective is the next-token cross-entropy plus `router_aux_loss_coef` times the MoE load-balancing
# loss. The first step compiles.

# %%
import time
from qwax.train.optim import make_optimizer
from qwax.train.step import LossWeights, make_train_step

optimizer = make_optimizer(learning_rate=recipe.learning_rate, warmup_steps=recipe.warmup_steps,
                           total_steps=recipe.steps, end_lr_ratio=recipe.end_lr_ratio,
                           weight_decay=recipe.weight_decay, b1=recipe.b1, b2=recipe.b2, eps=recipe.eps,
                           clip_norm=recipe.clip_norm)
opt_state = optimizer.init(params)
weights = LossWeights(router_aux_loss_coef=cfg.router_aux_loss_coef)
train_step = jax.jit(make_train_step(graphdef, optimizer, weights, model.options.dtype), donate_argnums=(0, 1))
batches = iter(qdata.train_batches(train_docs, tok, seq_len=recipe.seq_len, batch_size=recipe.batch_size,
                                   seed=recipe.seed))

initial_params = jax.tree.map(jnp.copy, params)  # kept for the before/after expert-load comparison
history = {"ce": [], "aux": []}
start = time.perf_counter()
for step in range(1, recipe.steps + 1):
    params, opt_state, metrics = train_step(params, opt_state, next(batches), jax.random.key(step))
    history["ce"].append(float(metrics["ce"]))
    history["aux"].append(float(metrics["aux_loss"]))
    if step == 1:
        compiled = time.perf_counter()
        print(f"step 1 (compilation included): {compiled - start:.1f} s")
    if step % 50 == 0 or step == recipe.steps:
        print(f"step {step:4d}  loss {history['ce'][-1]:.3f}  aux {history['aux'][-1]:.3f}")
elapsed = time.perf_counter() - compiled
tokens = (recipe.steps - 1) * recipe.batch_size * recipe.seq_len
print(f"{tokens / elapsed:,.0f} tokens/s after compilation")

# %%
ce = np.asarray(history["ce"])
smooth = np.convolve(ce, np.ones(10) / 10, mode="valid")
fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
ax.plot(np.arange(1, len(ce) + 1), ce, alpha=0.35, label="cross-entropy per step")
ax.plot(np.arange(10, len(ce) + 1), smooth, label="10-step mean")
ax.axhline(entropy, color="k", ls="--", lw=1, label=f"unigram entropy {entropy:.2f}")
ax.set(xlabel="step", ylabel="nats / token", title="training loss")
ax.legend()
ax2.plot(np.arange(1, len(ce) + 1), history["aux"])
ax2.axhline(cfg.num_experts_per_tok, color="k", ls="--", lw=1,
            label=f"perfectly balanced = top-k = {cfg.num_experts_per_tok}")
ax2.set(xlabel="step", ylabel="aux loss", title="MoE load-balancing loss (E * sum f_e P_e)")
ax2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Expert load: tokens per expert per layer
#
# The model's forward returns only the pooled auxiliary loss, so we run its pieces by hand: embed, the
# decoder stack (which returns the router logits of every MoE layer, `[n_moe_layers, tokens, experts]`),
# then `qwax.layers.moe.route` — the same top-k routing the MoE layer uses — to see which experts each
# held-out token is sent to. The random router starts close to uniform (1/E of the slots per expert);
# after training some experts take far more than their share, more in some layers than in others: the
# load-balancing loss, weighted by `router_aux_loss_coef` (0.001, as in the published configs), pushes back
# only weakly over a short run.

# %%
from qwax.layers.moe import route

@jax.jit
def router_logits(params, batch):
    m = nnx.merge(graphdef, params)
    ids = batch["input_ids"]
    b, l = ids.shape
    ctx = m.context(b, l, None, batch["position_ids"], batch["segment_ids"])
    _, logits, _ = m.decoder(m.embed(ids), ctx)
    return logits  # [n_moe_layers, b * l, E]

def expert_load(params, batch):
    logits = router_logits(params, batch)
    valid = np.asarray(batch["segment_ids"]).reshape(-1) > 0  # padding rows carry segment id 0
    loads = []
    for layer_logits in logits:
        idx, _ = route(layer_logits, cfg.num_experts_per_tok, normalise=True)
        counts = np.bincount(np.asarray(idx)[valid].reshape(-1), minlength=cfg.num_experts)
        loads.append(counts)
    return np.stack(loads)  # [n_moe_layers, E] token-slots per expert

eval_batch = qdata.eval_batches(eval_docs, tok, seq_len=recipe.seq_len, batch_size=recipe.batch_size,
                                max_batches=1)[0]
moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
labels = [f"{i} ({'GDN' if cfg.layer_types[i] == 'linear_attention' else 'attn'})" for i in moe_layers]
load_before, load_after = expert_load(initial_params, eval_batch), expert_load(params, eval_batch)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
vmax = max(load_before.max(), load_after.max())
for ax, load, title in zip(axes, (load_before, load_after), ("at initialisation", "after training")):
    im = ax.imshow(load, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
    for (r, c), n in np.ndenumerate(load):
        ax.text(c, r, n, ha="center", va="center", color="w" if n < 0.6 * vmax else "k", fontsize=8)
    ax.set(xlabel="expert", title=f"tokens per expert {title}", xticks=range(cfg.num_experts),
           yticks=range(len(labels)), yticklabels=labels)
axes[0].set_ylabel("layer")
fig.colorbar(im, ax=axes, label="token slots (top-k choices)")
plt.show()
uniform = load_after.sum(1, keepdims=True) / cfg.num_experts
print("max / mean load per layer after training:", np.round(load_after.max(1) / uniform[:, 0], 2))

# %% [markdown]
# ## Generate
#
# `qwax.generate` prefills the prompt into the hybrid cache (a KV cache for the attention layer, a constant-
# size state for the Gated DeltaNet layers) and decodes one jitted step per token.

# %%
trained = nnx.merge(graphdef, params)
for seed, prompt in enumerate(["def ", "Return the"]):
    ids = np.asarray([tok.encode(prompt).ids], np.int32)
    out = qwax.generate(trained, ids, max_new_tokens=40, temperature=0.8, top_p=0.95, eos_token_id=eos,
                        seed=seed)
    print(repr(tok.decode([int(t) for t in out[0]], skip_special_tokens=True)))

# %% [markdown]
# To save the model as a Hugging Face checkpoint: `qwax.save_hf(trained, "out/")` plus
# `qdata.save_for_hf(tok, "out/")` for the tokenizer. The command line `qwax train tiny --workdir run/`
# runs the same recipe with checkpoints, metrics and evaluation.
