"""Direct Preference Optimization (Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model"), with the sigmoid loss.

For a pair (prompt x, chosen completion y_w, rejected completion y_l), with the log-probabilities of the policy
pi and of the frozen reference model pi_ref summed over the completion's tokens:

    r_w  = beta * (log pi(y_w | x) - log pi_ref(y_w | x))          (implicit reward of the chosen completion)
    r_l  = beta * (log pi(y_l | x) - log pi_ref(y_l | x))
    loss = -log sigmoid(r_w - r_l), averaged over the pairs of the whole (accumulated) batch.

Metrics, as preference-tuning libraries report them: rewards_chosen = mean r_w, rewards_rejected = mean r_l,
reward_margin = mean (r_w - r_l), reward_accuracy = fraction of pairs with r_w > r_l (0 at the start, where every
margin is 0), and the policy's summed log-probabilities logps_chosen / logps_rejected.

Batches (qwax.data.dpo_batches): [A, 2B, L] arrays with qwax.data.BATCH_KEYS, rows [0, B) the chosen sequences
and rows [B, 2B) the rejected ones of the same B pairs; `weights` mark the completion's tokens as targets. A pair
whose chosen or rejected row has no weighted token (padding) is left out of every sum.

The reference model is the starting model. With LoRA it is the same network with the adapters at zero (no copy of
the base); with full fine-tuning the step gets the starting values of the parameters (one extra copy). Its
log-probabilities are computed on the fly, in the same forward batch layout, without gradients.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from qwax.train.step import Objective, merge_for_compute

PAIR_SUMS = ("loss_sum", "correct", "pairs", "chosen_rewards", "rejected_rewards", "chosen_logps",
             "rejected_logps")


def sequence_logps(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Summed log-probabilities of the weighted targets per row: logits [R, L, V], targets/weights [R, L] -> [R]
    float32."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum((picked - jax.nn.logsumexp(logits, axis=-1)) * weights, axis=-1)


def _logps(model: nnx.Module, batch: dict) -> jax.Array:
    out = model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
    return sequence_logps(out.logits, batch["targets"], batch["weights"])


def pair_sums(policy_logps: jax.Array, reference_logps: jax.Array, weights: jax.Array, beta: float
              ) -> dict[str, jax.Array]:
    """The DPO sums of one batch of pairs: *_logps [2B] (chosen rows first), weights [2B, L] -> PAIR_SUMS
    scalars (loss_sum = the sum of -log sigmoid(r_w - r_l) over the valid pairs)."""
    b = policy_logps.shape[0] // 2
    tokens = jnp.sum(weights, axis=-1)
    valid = ((tokens[:b] > 0) & (tokens[b:] > 0)).astype(jnp.float32)
    rewards = beta * (policy_logps - reference_logps)
    chosen, rejected = rewards[:b], rewards[b:]
    margin = chosen - rejected
    return {"loss_sum": jnp.sum(-jax.nn.log_sigmoid(margin) * valid),
            "correct": jnp.sum((margin > 0) * valid), "pairs": jnp.sum(valid),
            "chosen_rewards": jnp.sum(chosen * valid), "rejected_rewards": jnp.sum(rejected * valid),
            "chosen_logps": jnp.sum(policy_logps[:b] * valid), "rejected_logps": jnp.sum(policy_logps[b:] * valid)}


def pair_metrics(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Means over the pairs of summed PAIR_SUMS: loss, reward_accuracy, rewards_chosen/rejected, reward_margin,
    logps_chosen/rejected."""
    n = jnp.maximum(sums["pairs"], 1.0)
    return {"loss": sums["loss_sum"] / n, "reward_accuracy": sums["correct"] / n,
            "rewards_chosen": sums["chosen_rewards"] / n, "rewards_rejected": sums["rejected_rewards"] / n,
            "reward_margin": (sums["chosen_rewards"] - sums["rejected_rewards"]) / n,
            "logps_chosen": sums["chosen_logps"] / n, "logps_rejected": sums["rejected_logps"] / n,
            "pairs": sums["pairs"]}


def dpo_objective(beta: float) -> Objective:
    """The sigmoid DPO loss with temperature `beta` as a qwax.train.step Objective (needs the reference)."""
    if not beta > 0:
        raise ValueError(f"dpo beta must be > 0, got {beta}")

    def totals(batch):
        b = batch["input_ids"].shape[1] // 2
        tokens = jnp.sum(batch["weights"], axis=-1)  # [A, 2B]
        pairs = jnp.sum((tokens[:, :b] > 0) & (tokens[:, b:] > 0))
        return {"pairs": jnp.maximum(pairs.astype(jnp.float32), 1.0)}

    def terms(model, reference, batch, total, n_micro):
        del n_micro
        ref = jax.lax.stop_gradient(_logps(reference, batch))
        sums = pair_sums(_logps(model, batch), ref, batch["weights"], beta)
        sums["tokens"] = jnp.sum(batch["weights"])
        return sums["loss_sum"] / total["pairs"], sums

    def metrics(acc, total, n_micro):
        del total, n_micro
        return {**pair_metrics(acc), "tokens": acc["tokens"]}

    return Objective(totals, terms, metrics, uses_reference=True)


def make_dpo_eval_step(graphdef: nnx.GraphDef, beta: float, compute_dtype: Any = "float32") -> Callable:
    """`(params, batch [2B, L] arrays, frozen, reference) -> PAIR_SUMS` of the held-out pairs (sum them over
    batches, then `pair_metrics`); arguments as in qwax.train.step.make_train_step."""

    def eval_step(params, batch, frozen, reference):
        policy = merge_for_compute(graphdef, params, frozen, compute_dtype)
        ref = merge_for_compute(graphdef, reference, frozen, compute_dtype)
        return pair_sums(_logps(policy, batch), _logps(ref, batch), batch["weights"], beta)

    return eval_step
