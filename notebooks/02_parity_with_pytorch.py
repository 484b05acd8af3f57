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
# # Parity with PyTorch: a transformers checkpoint in qwax and back
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qwax/blob/main/notebooks/02_parity_with_pytorch.ipynb)
#
# We build a tiny random Qwen3.5-MoE with the Hugging Face `transformers` reference implementation, save it
# with `save_pretrained`, load it with `qwax.load_hf`, and compare the logits of the two implementations on
# the same tokens. Then `qwax.save_hf` writes it back and `transformers` reloads it: same keys, same tensors.
# Everything runs on the CPU in float32, in a few seconds.

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
# ## A tiny transformers model
#
# Shapes are small but keep the structure of the real models: 8 layers of which 2 are full attention,
# linear-attention key and value head dims that differ (so a transposed weight cannot pass), 8 experts
# top-2 with a shared expert. `transformers` initialises the zero-centred norm weights to 0 and `dt_bias` to
# 1; we perturb every parameter so a converter that drops one of them would show up in the logits.

# %%
import tempfile
import torch
import transformers

torch.manual_seed(0)
rotary_dim = 16 // 4  # head_dim * partial_rotary_factor
hf_config = transformers.Qwen3_5MoeTextConfig(
    vocab_size=128, hidden_size=64, num_hidden_layers=8, full_attention_interval=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
    linear_conv_kernel_dim=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=48, max_position_embeddings=512, rms_norm_eps=1e-6,
    tie_word_embeddings=False, initializer_range=0.1,
    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                     "mrope_section": [1, 1, 0], "mrope_interleaved": True})
hf_config._attn_implementation = "eager"
hf_model = transformers.Qwen3_5MoeForCausalLM(hf_config).to(torch.float32).eval()

generator = torch.Generator().manual_seed(1)
with torch.no_grad():
    for name, p in hf_model.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        if name.endswith("A_log"):  # per-step decays exp(g) of roughly 0.5 .. 0.97
            p.copy_(torch.empty(p.shape).uniform_(0.05, 1.0, generator=generator).log())
        elif name.endswith("dt_bias"):
            p.copy_(0.5 * noise)
        elif p.ndim == 1:
            p.add_(0.1 * noise)
        else:
            p.add_(0.02 * noise)

workdir = tempfile.mkdtemp(prefix="qwax_parity_")
hf_dir = f"{workdir}/hf"
hf_model.save_pretrained(hf_dir)
print(f"{sum(p.numel() for p in hf_model.parameters()) / 1e3:.0f}k parameters saved to {hf_dir}")

# %% [markdown]
# ## Load in qwax and compare logits
#
# `qwax.load_hf` reads `config.json` and the safetensors files, maps every key and layout (fused experts,
# the scanned layer stack) and returns a `QwaxForCausalLM`. We run both models on a batch of random tokens,
# one row left-padded to check that padding is handled the same way.

# %%
model = qwax.load_hf(hf_dir, dtype="float32")
print(model.config.model_type, model.config.layer_types)

rng = np.random.default_rng(0)
ids = rng.integers(0, hf_config.vocab_size, size=(3, 48)).astype(np.int32)
mask = np.ones_like(ids)
mask[2, :10] = 0  # left padding in the last row

with torch.no_grad():
    ref = hf_model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                   attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.numpy()
graphdef, params = nnx.split(model)  # pure-functional form: qwax.forward(graphdef, params, ...) under jit
qwax_logits = jax.jit(lambda p, i, m: qwax.forward(graphdef, p, i, attention_mask=m).logits)
ours = np.asarray(qwax_logits(params, jnp.asarray(ids), jnp.asarray(mask)))

real = mask.astype(bool)  # logits at padding positions are not meaningful in either implementation
diff = (ours - ref)[real]
print(f"logits scale: std {ref[real].std():.3f}; max |qwax - torch| = {np.abs(diff).max():.2e}, "
      f"mean {np.abs(diff).mean():.2e}")
print("same argmax at", f"{(ours.argmax(-1) == ref.argmax(-1))[real].mean():.1%}", "of real positions")
assert np.abs(diff).max() < 1e-3

# %%
fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
ax.hist(diff.ravel(), bins=80, color="C0", log=True)
ax.set(xlabel="qwax logit - transformers logit", ylabel="count",
       title=f"difference of {diff.size:,} logits (float32)")
ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
per_position = np.abs(ours - ref).max(-1)
for row in range(ids.shape[0]):
    keep = real[row]
    ax2.semilogy(np.arange(ids.shape[1])[keep], per_position[row][keep], ".-",
                 label=f"row {row}" + (" (left-padded)" if not keep.all() else ""))
ax2.set(xlabel="position", ylabel="max |difference| over the vocabulary", title="error by position")
ax2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The differences are float32 rounding: the two implementations order their sums differently (the
# chunked Gated DeltaNet form against transformers' own chunked form, fused against per-expert matmuls).
#
# ## Export back and reload in transformers
#
# `qwax.save_hf` writes `config.json` and safetensors in the layout the published Qwen3.5 checkpoints use,
# with each layer's experts fused into two tensors; this version of `transformers` saved them one tensor per
# expert, so we fuse its tensors the same way before comparing them bit for bit. `transformers` then loads
# the export with no missing or unexpected keys.

# %%
import glob
import re
from safetensors import safe_open

out_dir = f"{workdir}/qwax_export"
qwax.save_hf(model, out_dir)

def read_tensors(directory):
    tensors = {}
    for path in sorted(glob.glob(f"{directory}/*.safetensors")):
        with safe_open(path, "np") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors

def fused(tensors):
    # per-expert tensors -> the fused layout ([E, 2I, H] gate|up and [E, H, I] down); others unchanged
    out, experts = {}, {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", key)
        if m:
            experts.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = value
        else:
            out[key] = value
    for prefix, parts in experts.items():
        ids = sorted(parts["down_proj"])
        out[f"{prefix}.gate_up_proj"] = np.stack([np.concatenate([parts["gate_proj"][e], parts["up_proj"][e]])
                                                  for e in ids])
        out[f"{prefix}.down_proj"] = np.stack([parts["down_proj"][e] for e in ids])
    return out

saved, exported = read_tensors(hf_dir), read_tensors(out_dir)
print(f"{len(saved)} tensors saved by transformers, {len(exported)} by qwax")
print("e.g.", sorted(k for k in saved if ".layers.0.mlp.experts" in k)[:3], "->",
      sorted(k for k in exported if ".layers.0.mlp.experts" in k))
original = fused(saved)
print("keys only in the original:", sorted(set(original) - set(exported)))
print("keys only in the export:  ", sorted(set(exported) - set(original)))
mismatched = [k for k in original if k in exported and not np.array_equal(original[k], exported[k])]
print(f"{len(original)} tensors compared, {len(mismatched)} differ", mismatched)
assert set(original) == set(exported) and not mismatched

# %%
reloaded, info = transformers.Qwen3_5MoeForCausalLM.from_pretrained(out_dir, output_loading_info=True)
reloaded = reloaded.to(torch.float32).eval()
print({k: v for k, v in info.items() if v})  # missing / unexpected / mismatched keys: none expected
with torch.no_grad():
    again = reloaded(input_ids=torch.as_tensor(ids, dtype=torch.long),
                     attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.numpy()
print("reloaded model vs original transformers model, max |difference|:", np.abs(again - ref)[real].max())
state, state0 = reloaded.state_dict(), hf_model.state_dict()
assert state.keys() == state0.keys() and all(torch.equal(state[k], state0[k]) for k in state)
print(f"all {len(state)} parameters identical after the round trip")
