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
# # Fine-tuning with LoRA, and the adapter in PyTorch with peft
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qwax/blob/main/notebooks/06_fine_tuning.ipynb)
#
# A small Qwen3.5-MoE is pre-trained briefly on the embedded corpus (or the main job's checkpoint is used when
# `qwax-run/hf` exists), then fine-tuned on the embedded conversations with LoRA: the loss covers the
# assistant's tokens only, and only the low-rank adapters are trained. The run exports the merged model and a
# PEFT adapter; we plot the losses, then load the adapter onto the transformers base model with `peft` and
# check its logits against qwax's. A few minutes on a CPU.

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

import json
import os
import tempfile

import jax
import matplotlib.pyplot as plt
import numpy as np
# %matplotlib inline

BACKEND = jax.default_backend()
ON_CPU = BACKEND == "cpu"
print(f"qwax {qwax.__version__}, jax {jax.__version__}: {jax.device_count()} x "
      f"{jax.devices()[0].device_kind} ({BACKEND})")
WORK = tempfile.mkdtemp(prefix="qwax_finetune_")

# %% [markdown]
# ## A base model
#
# Fine-tuning needs a checkpoint to start from. The main job (`qwax train tiny`) leaves one in `qwax-run/hf`;
# without it we pre-train the same recipe for a short while here (`qwax.train.loop.train` is what
# `qwax train` runs). Its export holds the weights, the tokenizer and qwax's Qwen3.5 chat template.

# %%
from qwax.train.loop import train
from qwax.train.recipes import get_recipe

if os.path.isfile("qwax-run/hf/config.json"):
    base = os.path.abspath("qwax-run/hf")
else:
    pretrain = get_recipe("tiny", ["log_every=20", "eval_every=0", "time_budget_minutes=0"])
    result = train(pretrain, os.path.join(WORK, "pretrain"), steps=40 if ON_CPU else 400, progress=False,
                   sample=False, verbose=False)
    base = result.hf_dir
    print(f"pre-trained {result.step} steps: loss {result.final_loss:.3f} nats/token")
print("base checkpoint:", base)

# %% [markdown]
# ## The conversations and the loss mask
#
# The `sft-tiny` recipe reads the embedded conversations (questions about standard-library objects answered
# from their docstrings; some with a system prompt, reasoning or a tool call). Each is rendered with the
# checkpoint's chat template, and the loss mask is the template's `{% generation %}` spans: the assistant's
# text through its `<|im_end|>`. Below, the masked tokens are shown in brackets.

# %%
from qwax import data as qdata
from qwax.inference import ChatTemplate

template = ChatTemplate.from_checkpoint(base)
tok = qdata.load_tokenizer(base)
records, _ = qdata.read_conversations(["default"])
ids, mask = qdata.encode_conversation(records[1], template, tok)
pieces, current, inside = [], [], bool(mask[0])
for t, m in zip(ids.tolist(), mask.tolist()):
    if m != inside:
        text = tok.decode(current, skip_special_tokens=False)
        pieces.append(f"[{text}]" if inside else text)
        current, inside = [], m
    current.append(t)
text = tok.decode(current, skip_special_tokens=False)
pieces.append(f"[{text}]" if inside else text)
print("".join(pieces))
print(f"\n{len(records)} conversations; this one: {len(ids)} tokens, {int(mask.sum())} trained")

# %% [markdown]
# ## SFT with LoRA
#
# `lora_rank=8 lora_alpha=16` attaches rank-8 adapters to the attention, Gated DeltaNet and MLP projections;
# the base stays frozen (no gradients, no optimizer state for it). This is
# `qwax train sft-tiny --workdir W --steps N init_from=BASE lora_rank=8 lora_alpha=16`.

# %%
sft_dir = os.path.join(WORK, "sft")
sft = get_recipe("sft-tiny", [f"init_from={base}", "lora_rank=8", "lora_alpha=16", "log_every=1",
                              "eval_every=5"])
result = train(sft, sft_dir, steps=20 if ON_CPU else 300, progress=False)
print(os.listdir(sft_dir))

# %%
rows = [json.loads(line) for line in open(os.path.join(sft_dir, "metrics.jsonl"))]
steps = [r["step"] for r in rows if "ce" in r]
evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
plt.figure(figsize=(6, 3.5))
plt.plot(steps, [r["ce"] for r in rows if "ce" in r], label="training (assistant tokens)")
plt.plot(*zip(*evals), "o-", label="held-out conversations")
plt.xlabel("step")
plt.ylabel("loss (nats/token)")
plt.title("LoRA SFT of the tiny model")
plt.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The adapter in PyTorch
#
# `W/hf-adapter` is a PEFT adapter directory against the base checkpoint, and `W/hf` the merged model.
# `peft.PeftModel.from_pretrained` applies the adapter to the transformers model of the base; its logits equal
# qwax's own LoRA model (`qwax.load_peft`) and the merged export's.

# %%
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

adapter = os.path.join(sft_dir, "hf-adapter")
print(json.load(open(os.path.join(adapter, "adapter_config.json")))["target_modules"])
peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
peft_model.eval()
merged = AutoModelForCausalLM.from_pretrained(os.path.join(sft_dir, "hf"), dtype=torch.float32)
ours = qwax.load_peft(qwax.load_hf(base), adapter)

prompt = template.render([{"role": "user", "content": "What does json.dumps do?"}], add_generation_prompt=True,
                         enable_thinking=False)
ids = np.asarray([tok.encode(prompt).ids])
with torch.no_grad():
    peft_logits = peft_model(input_ids=torch.as_tensor(ids)).logits.numpy()
    merged_logits = merged(input_ids=torch.as_tensor(ids)).logits.numpy()
qwax_logits = np.asarray(ours(jax.numpy.asarray(ids)).logits)
assert np.abs(peft_logits - qwax_logits).max() < 1e-4, "peft and qwax disagree"
print(f"max |peft - qwax| = {np.abs(peft_logits - qwax_logits).max():.2e}, "
      f"max |peft - merged| = {np.abs(peft_logits - merged_logits).max():.2e}")
plt.figure(figsize=(6, 3))
plt.hist((peft_logits - qwax_logits).ravel(), bins=60)
plt.xlabel("peft logit - qwax logit")
plt.title("the same adapter in PyTorch and in JAX")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Asking the fine-tuned model
#
# The reply after the chat prompt, sampled from qwax's LoRA model (a tiny model trained for a minute: expect
# the shape of an answer more than its facts).

# %%
out = qwax.generate(ours, ids, max_new_tokens=40, temperature=0.7, top_p=0.95, seed=0,
                    eos_token_id=[tok.token_to_id("<|im_end|>"), qdata.eos_id(tok)])
print(tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
