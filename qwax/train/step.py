"""The training step as a pure function: (params, opt_state, batch, rng[, frozen, reference]) -> (params,
opt_state, metrics).

The step differentiates `params` only. For pre-training and full fine-tuning they are the whole model state; with
LoRA they are the adapters (qwax.lora.TRAINABLE) and the base weights come in as `frozen`, so neither gradients
nor optimizer state exist for the base. The loss is an `Objective`: the language-model loss below (pre-training,
and SFT, whose weights mark the assistant's tokens), or DPO's (qwax.train.dpo).

Language-model objective per optimizer step, over all micro-batches of a gradient-accumulation step:
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

from qwax.layers.lora import lora_dropout
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


def merge_for_compute(graphdef: nnx.GraphDef, params: Any, frozen: Any, compute_dtype: Any) -> nnx.Module:
    """The model of `params` (and `frozen`, the untrained rest of its state, or None) with its weight matrices in
    the compute dtype."""
    state = (params,) if frozen is None else (params, frozen)
    return nnx.merge(graphdef, *(cast_for_compute(s, compute_dtype) for s in state))


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


@dataclass(frozen=True)
class Objective:
    """A training objective, as three pure functions the step composes (accumulation, gradients, update):

    totals(batch [A, ...]) -> normalisers over all A micro-batches (e.g. the token count), so each micro-batch's
        loss is already divided by the whole step's count and accumulation equals one large batch;
    terms(model, reference, micro_batch, totals, n_micro) -> (loss value to differentiate, dict of scalar sums);
        `reference` is the frozen reference model (DPO) or None;
    metrics(summed terms, totals, n_micro) -> the logged metrics (the caller adds grad_norm and the learning rate).
    """

    totals: Callable[[dict], dict[str, jax.Array]]
    terms: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    metrics: Callable[[dict, dict, int], dict[str, jax.Array]]
    uses_reference: bool = False


def language_model_objective(weights: LossWeights) -> Objective:
    """Next-token cross-entropy on the weighted targets (all tokens for pre-training, the assistant's tokens for
    SFT), plus the MoE auxiliary, router z- and MTP losses of `weights`."""

    def totals(batch):
        total_mtp = jnp.ones((), jnp.float32)
        if weights.mtp_loss_weight:
            total_mtp = jnp.maximum(jnp.sum(jax.vmap(lambda b: mtp_targets(b)[2])(batch)), 1.0)
        return {"tokens": jnp.maximum(jnp.sum(batch["weights"]), 1.0), "mtp_tokens": total_mtp}

    def terms(model, reference, batch, total, n_micro):
        del reference
        t = micro_batch_terms(model, batch, weights)
        value = (t["ce_sum"] / total["tokens"]
                 + (weights.router_aux_loss_coef * t["aux"] + weights.z_loss_coef * t["z"]) / n_micro
                 + weights.mtp_loss_weight * t["mtp_sum"] / total["mtp_tokens"])
        return value, t

    def metrics(acc, total, n_micro):
        return {"loss": acc["loss"], "ce": acc["ce_sum"] / total["tokens"], "aux_loss": acc["aux"] / n_micro,
                "z_loss": acc["z"] / n_micro, "mtp_loss": acc["mtp_sum"] / total["mtp_tokens"],
                "tokens": acc["tokens"]}

    return Objective(totals, terms, metrics)


def _fold(rng: jax.Array | None, i: Any) -> jax.Array | None:
    return None if rng is None else jax.random.fold_in(rng, i)


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    objective: LossWeights | Objective, compute_dtype: Any = "float32") -> Callable:
    """The pure step `(params, opt_state, batch, rng, frozen=None, reference=None) -> (params, opt_state,
    metrics)` (not jitted).

    objective: LossWeights for the language-model loss (pre-training, SFT), or an Objective (e.g. DPO's).
    compute_dtype: the dtype the weight matrices are cast to for the forward, normally the model's
    `options.dtype` (any dtype-like).

    params: the trained variables. frozen: None when `params` is the whole model state, else the rest of the
    model's state (the base weights under LoRA), with `graphdef` from `nnx.split(model, TRAINABLE, ...)`. Only
    `params` are differentiated, so no gradient (dW) is computed for frozen weights, and the optimizer state
    covers `params` alone. reference: for objectives with `uses_reference`, the reference model's values of
    the trained variables (the frozen rest is shared).
    batch: dict of [A, B, L] arrays (A = gradient-accumulation micro-batches), see qwax.data.BATCH_KEYS.
    rng: the step's key; it drives LoRA dropout (qwax.layers.lora.lora_dropout) when adapters have dropout.
    metrics: the objective's metrics and grad_norm; the caller adds the learning rate from the schedule.
    """
    if isinstance(objective, LossWeights):
        objective = language_model_objective(objective)

    def loss(params, frozen, reference, batch, total, n_micro, rng):
        ref_model = None
        if objective.uses_reference:
            ref_model = merge_for_compute(graphdef, jax.lax.stop_gradient(reference), frozen, compute_dtype)
        with lora_dropout(rng):
            model = merge_for_compute(graphdef, params, frozen, compute_dtype)
            return objective.terms(model, ref_model, batch, total, n_micro)

    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def train_step(params, opt_state, batch, rng, frozen=None, reference=None):
        if objective.uses_reference and reference is None:
            raise ValueError("this objective needs the reference model's values of the trained variables "
                             "(reference=...)")
        n_micro = batch["input_ids"].shape[0]
        total = objective.totals(batch)

        def micro(carry, xs):
            grads, acc = carry
            mb, i = xs
            (value, terms), g = grad_fn(params, frozen, reference, mb, total, n_micro, _fold(rng, i))
            grads = jax.tree.map(jnp.add, grads, g)
            acc = jax.tree.map(jnp.add, acc, {**terms, "loss": value})
            return (grads, acc), None

        first = jax.tree.map(lambda x: x[0], batch)
        if n_micro == 1:  # no accumulator: adding the gradients to zeros costs a pass over every parameter
            (value, acc), grads = grad_fn(params, frozen, reference, first, total, n_micro, _fold(rng, 0))
            acc = {**acc, "loss": value}
        else:
            shapes = jax.eval_shape(lambda: grad_fn(params, frozen, reference, first, total, n_micro, rng)[0])
            zero_terms = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), {**shapes[1], "loss": shapes[0]})
            (grads, acc), _ = jax.lax.scan(micro, (jax.tree.map(jnp.zeros_like, params), zero_terms),
                                           (batch, jnp.arange(n_micro)))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {**objective.metrics(acc, total, n_micro), "grad_norm": optax.tree.norm(grads)}
        return params, opt_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, compute_dtype: Any = "float32") -> Callable:
    """`(params, batch [B, L] arrays, frozen=None) -> (sum of weighted CE, sum of weights)`; compute_dtype,
    params and frozen as in make_train_step."""

    def eval_step(params, batch, frozen=None):
        model = merge_for_compute(graphdef, params, frozen, compute_dtype)
        out = model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
        return token_cross_entropy(out.logits, batch["targets"], batch["weights"])

    return eval_step
