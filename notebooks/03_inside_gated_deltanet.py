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
# # Inside Gated DeltaNet: the recurrence and its chunked form
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qwax/blob/main/notebooks/03_inside_gated_deltanet.ipynb)
#
# Three of every four Qwen3.5 layers mix tokens with the gated delta rule. Per value head it keeps a state
# matrix $S \in \mathbb{R}^{d_k \times d_v}$ and for every token $t$:
#
# $$S \leftarrow e^{g_t} S, \qquad u_t = \beta_t\,(v_t - S^\top k_t), \qquad S \leftarrow S + k_t u_t^\top,
# \qquad o_t = \tfrac{1}{\sqrt{d_k}} S^\top q_t$$
#
# $g_t \le 0$ is a learned, input-dependent decay (forgetting) and $\beta_t \in (0, 1)$ a write strength.
# `qwax.pallas_kernels.gated_delta_rule` computes it two ways: `impl="reference"` runs the recurrence token
# by token (`lax.scan`), `impl="xla"` uses the chunked (WY) form, which does the work inside each chunk of 64
# tokens as dense matrix products and only carries the state from chunk to chunk.

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
# ## Agreement on synthetic inputs
#
# Random unit-norm keys and queries, decays and write strengths in the ranges the models produce.

# %%
import functools
from qwax.pallas_kernels.gated_delta_rule import gated_delta_rule, gated_delta_rule_step

def synthetic(length, batch=1, hk=2, hv=4, dk=32, dv=32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(ks[0], (batch, length, hk, dk)))
    k = unit(jax.random.normal(ks[1], (batch, length, hk, dk)))
    v = jax.random.normal(ks[2], (batch, length, hv, dv))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (batch, length, hv)) - 2.0)  # decays exp(g) ~ 0.6 .. 1
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (batch, length, hv)))
    return q, k, v, g, beta

@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def rule(q, k, v, g, beta, impl, chunk_size=64):
    return gated_delta_rule(q, k, v, g, beta, impl=impl, chunk_size=chunk_size)

inputs = synthetic(512)
o_ref, s_ref = rule(*inputs, impl="reference")
for chunk in (16, 32, 64, 128):
    o_xla, s_xla = rule(*inputs, impl="xla", chunk_size=chunk)
    print(f"chunk {chunk:3d}: max |o_ref - o_xla| = {jnp.abs(o_ref - o_xla).max():.2e}, "
          f"final state {jnp.abs(s_ref - s_xla).max():.2e}  (|o| ~ {jnp.abs(o_ref).mean():.2f})")
o_xla, _ = rule(*inputs, impl="xla")
err = np.asarray(jnp.abs(o_ref - o_xla).max(axis=(0, 2, 3)))
fig, ax = plt.subplots(figsize=(8, 3))
ax.semilogy(err)
for c in range(0, 512, 64):
    ax.axvline(c, color="k", lw=0.5, alpha=0.3)
ax.set(xlabel="token", ylabel="max |reference - chunked|", title="agreement per token (chunk boundaries in grey)")
plt.show()

# %% [markdown]
# ## Cost against sequence length
#
# Both forms are linear in the sequence length, but the recurrence does one small matrix-vector step per
# token in sequence, while the chunked form does L/64 steps of dense, parallel work. On accelerators the
# difference is large; on a CPU smaller.

# %%
import time

def bench(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)

lengths = [256, 512, 1024, 2048, 4096] if ON_CPU else [512, 1024, 2048, 4096, 8192, 16384, 32768]
shape = dict(hk=2, hv=4, dk=64, dv=64) if ON_CPU else dict(hk=16, hv=32, dk=128, dv=128)
impls = {name: functools.partial(rule, impl=name) for name in ("reference", "xla")}
timings = {name: [] for name in impls}
for length in lengths:
    args = synthetic(length, **shape)
    for name, fn in impls.items():
        timings[name].append(bench(fn, *args))
    print(f"L={length:6d}: " + ", ".join(f"{n} {timings[n][-1] * 1e3:8.2f} ms" for n in impls))

fig, ax = plt.subplots(figsize=(6.5, 4))
for name, ts in timings.items():
    ax.loglog(lengths, np.asarray(ts) * 1e3, "o-", label={"reference": "recurrence (lax.scan per token)",
                                                        "xla": "chunked (chunk 64)"}[name])
ax.set(xlabel="sequence length", ylabel="ms (forward)", title=f"gated delta rule on {BACKEND}, {shape}")
ax.legend()
plt.show()

# %% [markdown]
# ## Decay gates, write strengths and state norms in a model layer
#
# Now the same quantities inside a model: the first Gated DeltaNet layer of a (random) tiny Qwen3.5-MoE,
# fed the bytes of a sentence (the tiny preset has a 256-token vocabulary). We recompute the layer's
# inputs to the rule with its own parameters — the projections, causal conv and SiLU, the L2 norm of q and k,
# `beta = sigmoid(b)` and `g = -exp(A_log) * softplus(a + dt_bias)` — run the recurrence one token at a
# time with `gated_delta_rule_step` to keep every intermediate state, and check that the result matches the
# layer's own forward.
#
# Each value head has its own decay rate `A = exp(A_log)`; the token-dependent part `softplus(a + dt_bias)`
# modulates it. We set the four heads of this random layer to four rates to see the range of behaviours:
# training learns them.

# %%
from qwax.layers.gated_deltanet import causal_depthwise_conv, l2_normalise

cfg = qwax.get_preset("tiny-moe")
options = qwax.RunOptions(scan_layers=False)  # unrolled layers: model.decoder.layers[i]
model = qwax.QwaxForCausalLM(cfg, options=options, rngs=nnx.Rngs(0))
# Random init draws A from U(0.01, 16): most heads would forget everything at every token. Give the four
# value heads four timescales instead, from slow (A = 0.02) to fast (A = 2).
model.decoder.layers[0].linear_attn.A_log[...] = jnp.log(jnp.array([0.02, 0.1, 0.5, 2.0]))
text = ("Gated DeltaNet keeps a fixed-size state per head. Every token first decays the state, then "
        "writes the part of its value that the state does not predict yet. " * 2)
ids = jnp.asarray([list(text.encode())], jnp.int32)

def step(state, xs):
    o, state = gated_delta_rule_step(*xs, state)
    return state, (o, state)

@nnx.jit
def inside_gdn(model, ids):
    layer = model.decoder.layers[0]
    gdn = layer.linear_attn
    h = layer.input_layernorm(model.embed(ids))
    b_, L = ids.shape
    qkv, z, b, a = gdn.project(h)
    mixed = jax.nn.silu(causal_depthwise_conv(qkv, gdn.conv1d[...]))
    q, k, v = jnp.split(mixed, [gdn.key_dim, 2 * gdn.key_dim], axis=-1)
    q = l2_normalise(q.reshape(b_, L, gdn.num_k_heads, gdn.head_k_dim))
    k = l2_normalise(k.reshape(b_, L, gdn.num_k_heads, gdn.head_k_dim))
    v = v.reshape(b_, L, gdn.num_v_heads, gdn.head_v_dim)
    beta = jax.nn.sigmoid(b)
    g = -jnp.exp(gdn.A_log[...]) * jax.nn.softplus(a + gdn.dt_bias[...])
    state0 = jnp.zeros((b_, gdn.num_v_heads, gdn.head_k_dim, gdn.head_v_dim), jnp.float32)
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta))  # scan over tokens
    _, (o_steps, states) = jax.lax.scan(step, state0, xs)
    o_steps = jnp.moveaxis(o_steps, 0, 1)  # [B, L, Hv, dv]
    state_norms = jnp.linalg.norm(states[:, 0], axis=(-2, -1))  # [L, Hv]
    y_manual = gdn.out_proj(gdn.norm(o_steps, z).reshape(b_, L, gdn.value_dim))
    y_layer, _ = gdn(h)  # the layer's own forward (chunked kernel)
    return g, beta, state_norms, jnp.abs(y_manual - y_layer).max()

g, beta, state_norms, err = inside_gdn(model, ids)
L, state_norms = ids.shape[1], np.asarray(state_norms)
print("manual recurrence vs the layer's forward: max |difference| =", float(err))
print("per-head mean decay exp(g):", np.round(np.asarray(jnp.exp(g)[0].mean(0)), 3))

# %%
chars = list(text)
fig, axes = plt.subplots(3, 2, figsize=(12, 7.5), gridspec_kw={"width_ratios": [50, 1]})
panels = [(np.asarray(jnp.exp(g)[0]).T, "magma", "decay exp(g_t): how much of the state survives token t"),
          (np.asarray(beta[0]).T, "viridis", "write strength beta_t")]
for row, (image, cmap, title) in enumerate(panels):
    im = axes[row, 0].imshow(image, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    axes[row, 0].set(ylabel="value head", title=title, yticks=range(image.shape[0]))
    fig.colorbar(im, cax=axes[row, 1])
for head in range(state_norms.shape[1]):
    axes[2, 0].plot(state_norms[:, head], label=f"head {head}")
axes[2, 0].set(ylabel="||S_t||_F", xlabel="token (byte)", title="state norm after each token")
axes[2, 0].legend(ncol=4, fontsize=8)
axes[2, 1].axis("off")
ticks = list(range(0, L, 16))
for row in range(3):
    axes[row, 0].set_xlim(-0.5, L - 0.5)
    axes[row, 0].set_xticks(ticks)
    axes[row, 0].set_xticklabels([f"{i}\n{chars[i]!r}" for i in ticks] if row == 2 else [], fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# Because `k` is unit-norm and `beta <= 1`, a write replaces at most the component of the state along `k`,
# and the decay shrinks the rest: the state norm stays bounded however long the input, which is why the
# Gated DeltaNet layers need no KV cache (see `05_long_context.ipynb`).
