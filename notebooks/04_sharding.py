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
# # Sharding: logical axes, strategies, and a memory plan for Qwen3.5-397B-A17B
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qwax/blob/main/notebooks/04_sharding.ipynb)
#
# Every qwax parameter is created with logical axis names (`("embed", "vocab")`, `("experts", "embed",
# "expert_mlp")`, ...). A sharding strategy is a table from logical names to mesh axes
# (`data`, `fsdp`, `expert`, `tensor`); `qwax.sharding` resolves it for any mesh. On a CPU we simulate 8
# devices; on a TPU VM (8 or more chips) the real devices are used.

# %%
# Must run before jax is imported: on the CPU, XLA then exposes 8 host devices (ignored by TPU / GPU).
import os
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
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

# %%
from jax.sharding import NamedSharding
from qwax.sharding import STRATEGIES, get_rules, make_mesh, param_shardings, param_specs

devices = jax.devices()[:8] if jax.device_count() >= 8 else jax.devices("cpu")[:8]
print(f"{len(devices)} devices: {devices[0].platform} ({'real' if devices[0].platform != 'cpu' else 'simulated'})")
MESHES = {  # one mesh of 8 devices per strategy (axes the strategy does not use have size 1)
    "fsdp": "fsdp=8",
    "fsdp_tp": "fsdp=4,tensor=2",
    "fsdp_ep": "fsdp=2,expert=4",
    "fsdp_ep_tp": "fsdp=2,expert=2,tensor=2",
}
print("strategies:", sorted(STRATEGIES))
rules = get_rules("fsdp_ep_tp")
print({name: rules[name] for name in ("vocab", "embed", "q_heads", "mlp", "experts", "expert_mlp", "batch")})

# %% [markdown]
# ## A tiny MoE model, placed under each strategy
#
# The model is built once on the host; `param_shardings(params, rules, mesh)` gives a `NamedSharding` per
# parameter and `jax.device_put` places it. (For real models `qwax.sharding.init.init_sharded` builds every
# parameter directly in its shards, and `qwax.load_hf(path, mesh=mesh, rules=...)` reads each device's
# region of the checkpoint.) The layers are unrolled here (`RunOptions(scan_layers=False)`) so that the
# parameters have no stacked layer axis.

# %%
cfg = qwax.get_preset("tiny-moe", hidden_size=64, vocab_size=256, num_experts=8)
options = qwax.RunOptions(scan_layers=False)
graphdef, params = nnx.split(qwax.QwaxForCausalLM(cfg, options=options, rngs=nnx.Rngs(0)))
SHOW = {  # path -> what it is
    ("embed_tokens",): "embedding [vocab, embed]",
    ("lm_head", "kernel"): "LM head [embed, vocab]",
    ("decoder", "layers", 3, "self_attn", "q_proj", "kernel"): "attention q_proj [embed, q_heads]",
    ("decoder", "layers", 0, "linear_attn", "in_proj_qkv", "kernel"): "GDN in_proj_qkv [embed, gdn_qkv]",
    ("decoder", "layers", 0, "mlp", "experts_gate_up"): "experts gate_up [experts, embed, expert_mlp]",
}
flat = dict(nnx.to_flat_state(params))
for path in SHOW:
    print(f"{SHOW[path]:48s} {str(flat[path].get_value().shape):16s} logical axes "
          f"{flat[path].get_metadata()['logical_axes']}")

# %%
placed = {}
for strategy, spec in MESHES.items():
    mesh = make_mesh(spec, devices)
    shardings = param_shardings(params, get_rules(strategy), mesh)
    placed[strategy] = (mesh, jax.device_put(params, shardings))

for strategy, (mesh, sharded) in placed.items():
    flat_sharded = dict(nnx.to_flat_state(sharded))
    print(f"\n===== {strategy}: mesh {MESHES[strategy]} =====")
    for path, what in SHOW.items():
        x = flat_sharded[path].get_value()
        print(f"{what}: {x.sharding.spec}, per-device shard {x.sharding.shard_shape(x.shape)}")
        if x.ndim == 3:  # visualize_array_sharding draws 1-D and 2-D arrays: show the [experts, embed] face
            x = jax.jit(lambda a: a[:, :, 0])(x)
        jax.debug.visualize_array_sharding(x)


# %% [markdown]
# The same placements as pictures: which device holds each block of the embedding table and of the first
# MoE layer's expert weights (its `[experts, embed]` face), under each strategy. `fsdp` splits only the
# `embed` dim; `fsdp_ep` gives each group of devices whole experts; `tensor` also splits the vocabulary.

# %%
def owners(x, mesh):
    # device number (position in the mesh) holding each element of the array's first two dims
    position = {d: i for i, d in enumerate(mesh.devices.flat)}
    grid = np.full(x.shape[:2], -1)
    for device, index in x.sharding.devices_indices_map(x.shape).items():
        grid[index[:2]] = position[device]
    return grid

panels = [(("embed_tokens",), "embedding [vocab, embed]"),
          (("decoder", "layers", 0, "mlp", "experts_gate_up"), "experts gate_up [experts, embed]")]
fig, axes = plt.subplots(len(panels), len(placed), figsize=(13, 5.5))
for col, (strategy, (mesh, sharded)) in enumerate(placed.items()):
    flat_sharded = dict(nnx.to_flat_state(sharded))
    for row, (path, what) in enumerate(panels):
        grid = owners(flat_sharded[path].get_value(), mesh)
        ax = axes[row, col]
        ax.imshow(grid, cmap="tab10", vmin=-0.5, vmax=9.5, aspect="auto", interpolation="nearest")
        for r, c in {(r0, c0) for r0 in np.linspace(0, grid.shape[0] - 1, 8).astype(int)
                     for c0 in np.linspace(0, grid.shape[1] - 1, 8).astype(int)}:
            ax.text(c, r, grid[r, c], ha="center", va="center", fontsize=7, color="w")
        ax.set(xticks=[], yticks=[], title=f"{strategy} ({MESHES[strategy]})" if row == 0 else None)
        if col == 0:
            ax.set_ylabel(what.replace(" [", "\n["), fontsize=9)
fig.suptitle("which of the 8 devices holds each part (colour and number = device)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The planner: Qwen3.5-397B-A17B on a TPU pod
#
# `qwax.sharding.planner.plan` computes bytes per device from abstract shapes only (`nnx.eval_shape`
# and an `AbstractMesh`), so a 512-chip plan runs on this machine; `qwax plan` is its command line. The
# activation figures are estimates (see the planner's docstring): read anything near 100% as "does not fit".

# %%
from qwax.sharding.planner import GiB, format_plan, plan

big = qwax.get_preset("qwen3.5-397b-a17b")
big_options = qwax.RunOptions(dtype="bfloat16", param_dtype="bfloat16", remat="full")
print(format_plan(plan(big, "fsdp=16,expert=8", "fsdp_ep", options=big_options, seq=4096, batch=128,
                       device="v5p", capacity_factor=1.25)))

# %%
from IPython.display import Markdown, display

CANDIDATES = [  # (mesh, strategy, device); one 4096-token sequence per chip, as in the README's table
    ("fsdp=8,expert=8", "fsdp_ep", "v5p"),
    ("fsdp=128", "fsdp", "v5p"),
    ("fsdp=16,expert=8", "fsdp_ep", "v5p"),
    ("fsdp=8,expert=8,tensor=2", "fsdp_ep_tp", "v5p"),
    ("fsdp=32,expert=8", "fsdp_ep", "v5p"),
    ("fsdp=64,expert=8", "fsdp_ep", "v5p"),
]
plans = []
for mesh, strategy, device in CANDIDATES:
    chips = int(np.prod([int(part.split("=")[1]) for part in mesh.split(",")]))
    plans.append(plan(big, mesh, strategy, options=big_options, seq=4096, batch=chips, device=device,
                      capacity_factor=1.25))
rows = ["| devices | mesh | strategy | batch | params | grads | optimizer | activations | total | memory | fits |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
for (mesh, strategy, device), p in zip(CANDIDATES, plans):
    batch = p["batch"]
    b = p["per_device_bytes"]
    gib = lambda n: f"{n / GiB:.1f}"
    rows.append(f"| {p['num_devices']} x {device} | {mesh} | {strategy} | {batch} | {gib(b['params'])} | "
                f"{gib(b['grads'])} | {gib(b['optimizer'])} | {gib(b['activations'])} | {gib(b['total'])} | "
                f"{gib(p['device_memory_bytes'])} | {'yes' if p['fits'] else 'no'} ({p['utilisation']:.0%}) |")
display(Markdown("GiB per device, training on 4096-token sequences (one per chip), full rematerialisation, "
                 "expert capacity factor 1.25:\n\n"
                 + "\n".join(rows)))

# %%
parts = ["params", "grads", "optimizer", "activations"]
fig, ax = plt.subplots(figsize=(10, 3.8))
bottom = np.zeros(len(plans))
for part in parts:
    values = np.asarray([p["per_device_bytes"][part] for p in plans]) / GiB
    ax.bar(range(len(plans)), values, bottom=bottom, label=part)
    bottom += values
ax.scatter(range(len(plans)), [p["device_memory_bytes"] / GiB for p in plans], marker="_", s=900, color="k",
           label="device memory", zorder=3)
ax.set_xticks(range(len(plans)))
ax.set_xticklabels([f"{m}\n{s}\n{p['num_devices']} x {d}" for (m, s, d), p in zip(CANDIDATES, plans)],
                   fontsize=7)
ax.set(ylabel="GiB per device", title="Qwen3.5-397B-A17B training memory per device (planner estimate)",
       ylim=(0, 1.25 * max(bottom.max(), 95)))
ax.legend(fontsize=8, ncol=5, loc="upper center")
plt.show()
