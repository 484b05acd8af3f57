"""The training step as a pure function: (params, opt_state, batch, rng) -> (params, opt_state, metrics).

Objective per optimizer step, over all micro-batches of a gradient-accumulation step:
    ce       = sum_t w_t * CE(logits_t, target_t) / sum_t w_t        (token-weighted mean next-token loss)
  + router_aux_loss_coef * mean_micro(aux)                           (MoE load balancing, from the model)
  + z_loss_coef * mean_micro(router z-loss)                          (needs ModelOutput.router_logits)
  + mtp_loss_weight * token-weighted mean CE of the MTP head predicting token t+2
Micro-batch gradients are summed inside the step with `lax.scan`, each already divided by the token count of the
whole accumulated batch, so accumulation gives the same gradient as one large batch.

Parameters stay in their storage dtype (float32 master weights); inside the step the weight matrices are cast to
the compute dtype (the model's `options.dtype`, passed as `compute_dtype`) before the forward, so gradients flow
back through the cast into float32. Rematerialisation follows the model's `options.remat` (applied by the decoder
around each scanned layer group or layer), which the graphdef carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qwax.train.optim import decay_mask


@dataclass(frozen=True)
class LossWeights:
    router_aux_loss_coef: float = 0.001
    z_loss_coef: float = 0.0
    mtp_loss_weight: float = 0.0


def cast_for_compute(params: Any, dtype: Any) -> Any:
    """Weight matrices to the compute dtype; norms, A_log, dt_bias and other vectors stay float32."""
    dtype = jnp.dtype(dtype)
    mask = decay_mask(params)
    return jax.tree.map(lambda p, m: p.astype(dtype) if m and jnp.issubdtype(p.dtype, jnp.floating) else p,
                        params, mask)


def token_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted CE in float32, sum of weights). logits [..., V]; targets, weights [...]."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum((logz - picked) * weights), jnp.sum(weights)


def mtp_targets(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(next tokens [B, L], targets t+2 [B, L], weights [B, L]): position t is scored when t, t+1 and t+2 lie
    in the same document piece."""
    ids, seg, w = batch["input_ids"], batch["segment_ids"], batch["weights"]
    next_ids = jnp.concatenate([ids[:, 1:], ids[:, -1:]], axis=1)
    next_targets = jnp.concatenate([batch["targets"][:, 1:], batch["targets"][:, -1:]], axis=1)
    w_next = jnp.concatenate([w[:, 1:], jnp.zeros_like(w[:, :1])], axis=1)
    return next_ids, next_targets, w * w_next


def micro_batch_terms(model: nnx.Module, batch: dict, weights: LossWeights) -> dict[str, jax.Array]:
    """Loss sums of one micro-batch ([B, L] arrays): ce_sum, tokens, aux, z, mtp_sum, mtp_tokens."""
    out = model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
    ce_sum, tokens = token_cross_entropy(out.logits, batch["targets"], batch["weights"])
    terms = {"ce_sum": ce_sum, "tokens": tokens, "aux": out.aux_loss.astype(jnp.float32),
             "z": jnp.zeros((), jnp.float32), "mtp_sum": jnp.zeros((), jnp.float32),
             "mtp_tokens": jnp.zeros((), jnp.float32)}
    if weights.z_loss_coef:
        router_logits = getattr(out, "router_logits", None)
        if router_logits is None:
            raise ValueError("z_loss_coef > 0 needs the model's router logits (ModelOutput.router_logits), which "
                             "this model does not return; set z_loss_coef=0")
        valid = (batch["segment_ids"] > 0).reshape(-1).astype(jnp.float32)
        lse = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)  # [n_layers, T]
        terms["z"] = jnp.sum(jnp.square(lse) * valid) / jnp.maximum(lse.shape[0] * jnp.sum(valid), 1.0)
    if weights.mtp_loss_weight and getattr(model, "mtp", None) is not None:
        next_ids, next_targets, mtp_w = mtp_targets(batch)
        b, l = next_ids.shape
        ctx = model.context(b, l, None, batch["position_ids"], batch["segment_ids"])
        mtp_hidden = model.mtp(out.hidden, model.embed(next_ids), ctx)[0]  # (hidden, router logits, ...)
        terms["mtp_sum"], terms["mtp_tokens"] = token_cross_entropy(model.logits(mtp_hidden), next_targets, mtp_w)
    return terms


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, weights: LossWeights,
                    compute_dtype: Any = "float32") -> Callable:
    """The pure step `(params, opt_state, batch, rng) -> (params, opt_state, metrics)` (not jitted).

    compute_dtype: the dtype the weight matrices are cast to for the forward, normally the model's
    `options.dtype` (any dtype-like).

    batch: dict of [A, B, L] arrays (A = gradient-accumulation micro-batches), see qwax.data.BATCH_KEYS.
    rng: reserved for stochastic layers (the model has none; dropout-free as the published models).
    metrics: loss (the full objective), ce, aux_loss, z_loss, mtp_loss, grad_norm, tokens, learning rate
    is added by the caller from the schedule.
    """

    def objective(params, batch, total_tokens, total_mtp_tokens, n_micro):
        model = nnx.merge(graphdef, cast_for_compute(params, compute_dtype))
        t = micro_batch_terms(model, batch, weights)
        value = (t["ce_sum"] / total_tokens
                 + (weights.router_aux_loss_coef * t["aux"] + weights.z_loss_coef * t["z"]) / n_micro
                 + weights.mtp_loss_weight * t["mtp_sum"] / total_mtp_tokens)
        return value, t

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def train_step(params, opt_state, batch, rng):
        del rng
        n_micro = batch["input_ids"].shape[0]
        total_tokens = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        total_mtp = jnp.ones((), jnp.float32)
        if weights.mtp_loss_weight:
            total_mtp = jnp.maximum(jnp.sum(jax.vmap(lambda b: mtp_targets(b)[2])(batch)), 1.0)

        def micro(carry, mb):
            grads, acc = carry
            (value, terms), g = grad_fn(params, mb, total_tokens, total_mtp, n_micro)
            grads = jax.tree.map(jnp.add, grads, g)
            acc = {k: acc[k] + v for k, v in {**terms, "loss": value}.items()}
            return (grads, acc), None

        if n_micro == 1:  # no accumulator: adding the gradients to zeros costs a pass over every parameter
            (value, terms), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch), total_tokens, total_mtp,
                                            n_micro)
            acc = {**terms, "loss": value}
        else:
            zero_terms = {k: jnp.zeros((), jnp.float32) for k in ("ce_sum", "tokens", "aux", "z", "mtp_sum",
                                                                  "mtp_tokens", "loss")}
            (grads, acc), _ = jax.lax.scan(micro, (jax.tree.map(jnp.zeros_like, params), zero_terms), batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": acc["loss"],
            "ce": acc["ce_sum"] / total_tokens,
            "aux_loss": acc["aux"] / n_micro,
            "z_loss": acc["z"] / n_micro,
            "mtp_loss": acc["mtp_sum"] / total_mtp,
            "grad_norm": optax.tree.norm(grads),
            "tokens": acc["tokens"],
        }
        return params, opt_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, compute_dtype: Any = "float32") -> Callable:
    """`(params, batch [B, L] arrays) -> (sum of weighted CE, sum of weights)`; compute_dtype as in
    make_train_step."""

    def eval_step(params, batch):
        model = nnx.merge(graphdef, cast_for_compute(params, compute_dtype))
        out = model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
        return token_cross_entropy(out.logits, batch["targets"], batch["weights"])

    return eval_step
