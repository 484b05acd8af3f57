"""Optimizer: AdamW with linear warmup + cosine decay, global-norm clipping, and a weight-decay mask.

Weight decay applies to weight matrices only. It skips every parameter whose path names a norm (`*norm*`: input
and post-attention layernorms, q/k norms, the GDN gated norm, MTP norms), `A_log`, `dt_bias`, any `bias`, and any
1-D parameter. Names, not ranks, decide for stacked (scanned) layers, whose norms carry a leading layer axis.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

NO_DECAY_NAMES = ("A_log", "dt_bias", "bias")


def param_names(path: tuple) -> list[str]:
    """The string keys of a pytree path (dict keys and attribute names, list indices dropped)."""
    names = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", None))
        if isinstance(name, str) and name != "value":
            names.append(name)
    return names


def decays(path: tuple, leaf: Any) -> bool:
    names = param_names(path)
    if getattr(leaf, "ndim", 0) <= 1:
        return False
    if any("norm" in n for n in names):
        return False
    return not any(n in NO_DECAY_NAMES or n.endswith("_bias") for n in names)


def decay_mask(params: Any) -> Any:
    """A pytree of bools like `params`: True where AdamW applies weight decay."""
    return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int, end_ratio: float) -> optax.Schedule:
    """0 -> peak linearly over warmup_steps, then cosine down to peak * end_ratio at total_steps."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps, decay_steps=max(total_steps, warmup_steps + 1),
        end_value=peak * end_ratio)


def make_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int, end_lr_ratio: float = 0.1,
                   weight_decay: float = 0.1, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   clip_norm: float = 1.0) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(learning_rate, warmup_steps, total_steps, end_lr_ratio)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm and clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts)
