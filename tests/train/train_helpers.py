"""Shared pieces of the training tests: a very small recipe and a way to run `qwax train` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# A 2-layer (GDN + attention) MoE model on 64-token rows: compiles in seconds, trains a step in milliseconds.
TEST_OVERRIDES = [
    "model.hidden_size=32", "model.num_hidden_layers=2", "model.full_attention_interval=2",
    "model.num_attention_heads=2", "model.num_key_value_heads=1", "model.head_dim=16",
    "model.linear_num_key_heads=1", "model.linear_num_value_heads=2", "model.linear_key_head_dim=16",
    "model.linear_value_head_dim=16", "model.num_experts=4", "model.num_experts_per_tok=2",
    "model.moe_intermediate_size=32", "model.shared_expert_intermediate_size=32", "model.mrope_section=1,1,0",
    "vocab_size=256", "seq_len=64", "batch_size=2", "eval_batches=1", "eval_every=0", "sample_tokens=4",
    "warmup_steps=2", "learning_rate=1e-2", "log_every=1", "time_budget_minutes=0",
]


def subprocess_env(cache_dir: str) -> dict:
    """The environment of a `qwax train` subprocess: CPU, one device, a compilation cache shared by the runs
    of one test so that only the first one compiles."""
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               TOKENIZERS_PARALLELISM="false")
    return env


def train_command(workdir: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "qwax.cli", "train", "tiny", "--workdir", workdir, "--no-progress",
            *TEST_OVERRIDES, *args]


def run_train(workdir: str, cache_dir: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(workdir, *args), env=subprocess_env(cache_dir), capture_output=True,
                          text=True, timeout=timeout)


def logged_losses(workdir: str) -> dict[int, float]:
    """step -> training loss from WORKDIR/metrics.jsonl (the last row of a step wins)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                out[row["step"]] = row["loss"]
    return out
