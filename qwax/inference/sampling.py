"""Next-token selection: penalties, then greedy or temperature / top-k / top-p (nucleus) sampling, per row.

Every setting is a per-row array, traced rather than static, so a new temperature, top_p, top_k, penalty or seed
never recompiles: a batch can mix greedy and sampled rows with different settings (a server batching requests),
and one row's settings never reach another row. Only two static switches pick the compiled variant: whether any
row samples (else argmax alone runs) and whether any row has a penalty (else no token counts are kept).

Penalties, in the order they apply (the conventions of transformers and the OpenAI API):
- repetition_penalty r (transformers / CTRL): each token seen so far, in the prompt or the output, has its logit
  divided by r where positive and multiplied by r where negative (r = 1: off);
- frequency_penalty f and presence_penalty p (OpenAI): logit -= f * count + p * (count > 0), with `count` the
  token's occurrences in the output so far (0: off).
Then temperature 0 is greedy (argmax, first index on ties, like torch); otherwise logits / temperature, kept to the
top_k largest (0: all) and to the smallest set of most likely tokens whose probability reaches top_p (1: all;
tokens tied with the last one kept stay too), and sampled from the row's own PRNG key.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """The sampling settings of one request (one row, or n rows for n choices).

    temperature: 0 = greedy; top_k: None = no limit; top_p: None or 1 = no limit; penalties as the module
    docstring (0, 0, 1: off).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        def real(x: Any) -> bool:
            return isinstance(x, numbers.Real) and not isinstance(x, bool) and np.isfinite(x)

        if not real(self.temperature) or not self.temperature >= 0.0:
            raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None (no limit), got {self.top_k!r}")
        if self.top_p is not None and not (real(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1] or None, got {self.top_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not real(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2] (0: off), got {value!r}")
        if not real(self.repetition_penalty) or not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be a number > 0 (1: off), got {self.repetition_penalty!r}")

    def updated(self, **values: Any) -> SamplingParams:
        """These settings with each of `values` that is not None in its place (e.g. command-line flags or a
        request's fields over a checkpoint's defaults)."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    @property
    def samples(self) -> bool:
        return self.temperature > 0.0

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


class RowSettings(NamedTuple):
    """SamplingParams as per-row arrays [B] (float32, top_k int32 with 0 = no limit)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    repetition_penalty: jax.Array

    @classmethod
    def of(cls, rows: Sequence[SamplingParams]) -> RowSettings:
        def col(name: str, dtype: Any, default: Any) -> np.ndarray:
            values = [getattr(r, name) for r in rows]
            return np.asarray([default if v is None else v for v in values], dtype)

        return cls(col("temperature", np.float32, 0.0), col("top_k", np.int32, 0), col("top_p", np.float32, 1.0),
                   col("presence_penalty", np.float32, 0.0), col("frequency_penalty", np.float32, 0.0),
                   col("repetition_penalty", np.float32, 1.0))


class SamplerState(NamedTuple):
    """What the sampler carries between steps: per-row PRNG keys [B] and, with penalties, the output token counts
    [B, V] int32 and the prompt's tokens [B, V] bool (else None)."""

    keys: jax.Array
    counts: jax.Array | None
    prompt_seen: jax.Array | None


def fold_keys(key: jax.Array, batch: int) -> jax.Array:
    """Per-row keys [batch] from one key: row i draws from fold_in(key, i), whatever the batch around it."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def initial_state(keys: jax.Array, prompt_ids: np.ndarray | None, prompt_mask: np.ndarray | None, vocab: int,
                  penalised: bool) -> SamplerState:
    """The state before the first token: keys [B]; with `penalised`, zero counts and the prompt's real tokens
    (prompt_ids, prompt_mask [B, L]) marked in a [B, V] table for the repetition penalty."""
    if not penalised:
        return SamplerState(keys, None, None)
    b = keys.shape[0]
    seen = np.zeros((b, vocab), bool)
    if prompt_ids is not None:
        rows = np.broadcast_to(np.arange(b)[:, None], prompt_ids.shape)
        real = np.ones(prompt_ids.shape, bool) if prompt_mask is None else prompt_mask > 0
        seen[rows[real], prompt_ids[real]] = True
    return SamplerState(keys, jnp.zeros((b, vocab), jnp.int32), jnp.asarray(seen))


def apply_penalties(logits: jax.Array, settings: RowSettings, counts: jax.Array, prompt_seen: jax.Array
                    ) -> jax.Array:
    """logits [B, V] float32 with the repetition, frequency and presence penalties of each row applied."""
    r = settings.repetition_penalty[:, None]
    seen = prompt_seen | (counts > 0)
    logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    c = counts.astype(jnp.float32)
    return logits - settings.frequency_penalty[:, None] * c - settings.presence_penalty[:, None] * (c > 0)


def restrict(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Scaled logits [B, V] with every token outside the row's top_k [B] (0: all) and top_p [B] set to NEG."""
    v = logits.shape[-1]
    ordered = -jnp.sort(-logits, axis=-1)  # descending
    k = jnp.where((top_k <= 0) | (top_k > v), v, top_k)
    ordered = jnp.where(jnp.arange(v)[None, :] < k[:, None], ordered, NEG)
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep a token while the tokens strictly more likely than it have not reached top_p (the first always stays).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
    kept = jnp.sum(keep & (ordered > NEG), axis=-1)
    threshold = jnp.take_along_axis(ordered, jnp.maximum(kept - 1, 0)[:, None], axis=-1)
    return jnp.where(logits < threshold, NEG, logits)


@functools.partial(jax.jit, static_argnames=("sampling",))
def choose(logits: jax.Array, state: SamplerState, settings: RowSettings, *, sampling: bool
           ) -> tuple[jax.Array, SamplerState]:
    """logits [B, V] -> (next tokens [B] int32, the state for the next step).

    sampling (static): whether any row has temperature > 0; penalties act when the state carries counts.
    """
    logits = logits.astype(jnp.float32)
    if state.counts is not None:
        logits = apply_penalties(logits, settings, state.counts, state.prompt_seen)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    keys = state.keys
    if sampling:
        split = jax.vmap(jax.random.split)(keys)
        keys, subkeys = split[:, 0], split[:, 1]
        t = settings.temperature
        scaled = restrict(logits / jnp.where(t > 0, t, 1.0)[:, None], settings.top_k, settings.top_p)
        drawn = jax.vmap(jax.random.categorical)(subkeys, scaled).astype(jnp.int32)
        tokens = jnp.where(t > 0, drawn, tokens)
    counts = state.counts
    if counts is not None:
        counts = counts.at[jnp.arange(tokens.shape[0]), tokens].add(1)
    return tokens, SamplerState(keys, counts, state.prompt_seen)


def sample(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None) -> jax.Array:
    """logits [B, V] -> token ids [B] int32 with one setting for every row, row i drawing from
    fold_in(key, i); see the module docstring. A convenience over `choose` (which carries state across steps)."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    b = logits.shape[0]
    tokens, _ = choose(logits, SamplerState(fold_keys(key, b), None, None), RowSettings.of([params] * b),
                       sampling=params.samples)
    return tokens
