"""The decoding engine shared by every generation path (text, MTP speculative, multimodal).

It holds the request checks (`check_request` -> `Request`), the one chunked prefill (`prefill`: left-pads the
prompt to whole chunks and runs them in order, from token ids or fused embeddings, with optional [3, B, L]
positions, optionally returning the hidden states), the jitted decode step (`decode_step`, with an optional
per-row rope delta for multimodal positions), mesh placement (`MeshPlacement`) and the sampling loop
(`sample_loop`, with `TokenSink` for stop tokens, padding and streaming).

Prompts of different lengths are left-padded; padding never enters the attention keys or the GDN state. The
prefill chunk and the decode step are jitted once per shape bucket (batch, chunk, cache length), and both donate
the cache they are given.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qwax.config import QwaxConfig
from qwax.graph_jit import jit_with_graph
from qwax.inference.cache import CACHE_BUCKET, Cache, cache_logical_axes, init_cache
from qwax.inference.sampling import RowSettings, SamplingParams, choose, fold_keys, initial_state
from qwax.model import QwaxForCausalLM, check_token_ids
from qwax.sharding.rules import Rules, get_rules, logical_sharding, param_shardings, tree_shardings, use_sharding

CHUNK_ALIGN = 16  # a short prompt's chunk is its length rounded up to this, so nearby lengths share compilations

Stream = Callable[[np.ndarray], Any]


# ------------------------------------------------------------------ request checks


def check_int(name: str, value: Any, minimum: int, alternatives: str = "") -> None:
    """Raise ValueError naming `name` unless `value` is an int (a Python or numpy integer, not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{alternatives}, got {value!r}")


def check_prompt(cfg: QwaxConfig, input_ids: Any, attention_mask: Any, max_new_tokens: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Validate a prompt for a text model of config `cfg`; returns (ids [B, L], mask [B, L]), both int32."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be an integer array [batch, length], got {ids.dtype} {ids.shape}")
    mask = np.ones_like(ids, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    check_int("max_new_tokens", max_new_tokens, 0)
    if ids.shape[1] + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt of {ids.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"maximum length max_position_embeddings={cfg.max_position_embeddings}")
    if ids.shape[1] == 0 or not mask[:, -1].all():
        raise ValueError("every prompt needs at least one token, with padding on the left (attention_mask[:, -1] "
                         "must be 1)")
    check_token_ids(ids[mask > 0], cfg.vocab_size)
    return ids.astype(np.int32), mask


def stop_tokens(cfg: QwaxConfig, eos_token_id: int | Sequence[int] | None, pad_token_id: int | None
                ) -> tuple[np.ndarray, int]:
    """(eos ids [n] int32, pad id): the arguments, else the config's; pad falls back to the first eos id, else 0."""
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos = np.atleast_1d(np.asarray([] if eos is None else eos, np.int32))
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    return eos, int(pad if pad is not None else (eos[0] if eos.size else 0))


def prefill_chunk_length(prompt_length: int, prefill_chunk_size: int) -> int:
    """The prefill's chunk length: `prefill_chunk_size`, or the prompt length rounded up to CHUNK_ALIGN if shorter."""
    check_int("prefill_chunk_size", prefill_chunk_size, 1)
    return int(min(prefill_chunk_size, -(-prompt_length // CHUNK_ALIGN) * CHUNK_ALIGN))


def cache_length(prompt_length: int, chunk: int, max_new_tokens: int) -> int:
    """Cache slots for a left-padded prompt of `prompt_length` in chunks of `chunk`, rounded to CACHE_BUCKET.

    Two spare slots: the MTP verify step writes [token, draft] past the last committed token."""
    padded = -(-prompt_length // chunk) * chunk
    return -(-(padded + max_new_tokens + 2) // CACHE_BUCKET) * CACHE_BUCKET


def as_key(seed: int | jax.Array) -> jax.Array:
    """A typed PRNG key from an int seed, a typed key (returned as is) or a raw uint32 [2] key."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jax.random.key(int(seed))
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) and seed.shape == ():
        return seed
    if isinstance(seed, (jax.Array, np.ndarray)) and seed.dtype == np.uint32 and seed.shape == (2,):
        return jax.random.wrap_key_data(jnp.asarray(seed))
    raise ValueError(f"seed must be an int or a single jax.random key, got {type(seed).__name__} "
                     f"{getattr(seed, 'shape', '')}")


@dataclass(frozen=True)
class Request:
    """A checked generation request.

    ids, mask [B, L] int32 (left-padded prompts); limits [B]: each row's most new tokens (max_new_tokens is the
    largest); chunk: prefill chunk length; max_len: cache slots; eos [n] int32 stop ids; pad: the id of finished
    rows; settings: each row's sampling settings (RowSettings, arrays [B]); keys [B]: each row's PRNG key;
    sampling / penalised: whether any row samples / has a penalty (the sampler's static switches);
    stream(tokens [B]) called with each new column, or None (it may return a bool array [B] of rows to finish).
    """

    ids: np.ndarray
    mask: np.ndarray
    limits: np.ndarray
    chunk: int
    max_len: int
    eos: np.ndarray
    pad: int
    settings: RowSettings
    keys: jax.Array
    sampling: bool
    penalised: bool
    stream: Stream | None

    @property
    def batch(self) -> int:
        return self.ids.shape[0]

    @property
    def max_new_tokens(self) -> int:
        return int(self.limits.max(initial=0))


def row_keys(seed: int | jax.Array | Sequence[int | jax.Array], batch: int) -> jax.Array:
    """Per-row PRNG keys [batch]: row i of one seed draws from fold_in(key, i), so a row's draws do not depend on
    the batch around it; a sequence gives each row its own seed (or key)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise ValueError(f"{len(seed)} seeds for {batch} rows: pass one seed, or one per row")
        return jnp.stack([as_key(s) for s in seed])
    return fold_keys(as_key(seed), batch)


def check_request(cfg: QwaxConfig, input_ids: Any, attention_mask: Any = None, *,
                  max_new_tokens: int | Sequence[int],
                  sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                  seed: int | jax.Array | Sequence[int | jax.Array] = 0,
                  eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                  stream: Stream | None = None, prefill_chunk_size: int = 512) -> Request:
    """Validate the arguments of a generation request for a text model of config `cfg` (see qwax.generate).

    max_new_tokens, sampling and seed are one value for every row, or a sequence with one per row (a server's
    batch of requests); sampling None is greedy.
    """
    per_row = isinstance(max_new_tokens, (list, tuple, np.ndarray))
    limits = [int(n) if isinstance(n, np.integer) else n for n in (max_new_tokens if per_row else [max_new_tokens])]
    for n in limits:
        check_int("max_new_tokens", n, 0)
    ids, mask = check_prompt(cfg, input_ids, attention_mask, max(limits, default=0))
    b = ids.shape[0]
    if per_row and len(limits) != b:
        raise ValueError(f"{len(limits)} max_new_tokens values for {b} rows: pass one, or one per row")
    rows = [SamplingParams()] * b if sampling is None else (
        [sampling] * b if isinstance(sampling, SamplingParams) else list(sampling))
    if len(rows) != b or not all(isinstance(r, SamplingParams) for r in rows):
        raise ValueError(f"sampling must be a SamplingParams or one per row ({b}), got {sampling!r}")
    if stream is not None and not callable(stream):
        raise ValueError(f"stream must be a callable taking the new tokens [batch], got {type(stream).__name__}")
    eos, pad = stop_tokens(cfg, eos_token_id, pad_token_id)
    chunk = prefill_chunk_length(ids.shape[1], prefill_chunk_size)
    limits_arr = np.broadcast_to(np.asarray(limits, np.int64), (b,)).copy()
    return Request(ids=ids, mask=mask, limits=limits_arr, chunk=chunk,
                   max_len=cache_length(ids.shape[1], chunk, int(limits_arr.max(initial=0))), eos=eos, pad=pad,
                   settings=RowSettings.of(rows), keys=row_keys(seed, b), sampling=any(r.samples for r in rows),
                   penalised=any(r.penalised for r in rows), stream=stream)


# ------------------------------------------------------------------ prefill


def prompt_chunks(chunk_size: int, *arrays: tuple[Any, int]) -> Iterator[tuple[Any, ...]]:
    """Left-pad each (array, length axis) with zeros to whole chunks of `chunk_size` and yield the chunks in order,
    one tuple per chunk (a None array yields None). All arrays must have the same length."""
    lengths = {a.shape[axis] for a, axis in arrays if a is not None}
    if len(lengths) != 1:
        raise ValueError(f"prompt inputs differ in length: {sorted(lengths)}")
    length = lengths.pop()
    padded = -(-length // chunk_size) * chunk_size

    def pad(a: Any, axis: int) -> Any:
        if a is None:
            return None
        widths = [(0, 0)] * a.ndim
        widths[axis] = (padded - length, 0)
        return np.pad(a, widths) if isinstance(a, np.ndarray) else jnp.pad(a, widths)

    def cut(a: Any, axis: int, start: int) -> Any:
        if a is None:
            return None
        index = [slice(None)] * a.ndim
        index[axis] = slice(start, start + chunk_size)
        return a[tuple(index)]

    full = [(pad(a, axis), axis) for a, axis in arrays]
    for start in range(0, padded, chunk_size):
        yield tuple(cut(a, axis, start) for a, axis in full)


@jit_with_graph(static_argnums=(6,), donate_argnums=(1,))
def _prefill_chunk(graphdef: nnx.GraphDef, params: nnx.State, cache: Cache, input_ids: jax.Array | None,
                   attention_mask: jax.Array, position_ids: jax.Array | None, inputs_embeds: jax.Array | None,
                   return_hidden: bool) -> tuple[jax.Array, jax.Array | None, Cache]:
    """One chunk of C tokens (ids [B, C] or embeddings [B, C, H]) into `cache`:
    (last-position logits [B, V] float32, hidden [B, C, H] or None, cache)."""
    out = nnx.merge(graphdef, params)(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      cache=cache, inputs_embeds=inputs_embeds)
    return out.logits[:, -1].astype(jnp.float32), out.hidden if return_hidden else None, out.cache


def prefill(graphdef: nnx.GraphDef, params: nnx.State, cache: Cache, input_ids: Any, attention_mask: Any,
            chunk_size: int, *, inputs_embeds: jax.Array | None = None, position_ids: Any = None,
            return_hidden: bool = False) -> tuple[jax.Array, Cache] | tuple[jax.Array, Cache, jax.Array]:
    """Run a prompt into `cache` in chunks of `chunk_size`, left-padded to whole chunks (the padding slots are
    invalid and never attended to); the cache is donated.

    input_ids [B, L] int, or None with inputs_embeds [B, L, H] (fused multimodal embeddings); attention_mask
    [B, L] 1/0; position_ids None (each row counts its real tokens) or [B, L] / [3, B, L] int.
    Returns (last-position logits [B, V] float32, cache), and with return_hidden the final-normed hidden states
    of the prompt's own positions [B, L, H] as a third element.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("prefill needs exactly one of input_ids [B, L] and inputs_embeds [B, L, H]")
    mask = np.asarray(attention_mask, np.int32)
    if mask.ndim != 2 or mask.shape[1] == 0:
        raise ValueError(f"attention_mask must be [batch, length] with length >= 1, got shape {mask.shape}")
    b, l = mask.shape
    ids = None if input_ids is None else np.asarray(input_ids, np.int32)
    if ids is not None and ids.shape != (b, l):
        raise ValueError(f"input_ids shape {ids.shape} differs from attention_mask shape {(b, l)}")
    if inputs_embeds is not None and (inputs_embeds.ndim != 3 or inputs_embeds.shape[:2] != (b, l)):
        raise ValueError(f"inputs_embeds must be [batch, length, hidden] with [batch, length] = {(b, l)}, got "
                         f"shape {tuple(inputs_embeds.shape)}")
    positions = None if position_ids is None else np.asarray(position_ids, np.int32)
    if positions is not None and positions.shape not in ((b, l), (3, b, l)):
        raise ValueError(f"position_ids must be [batch, length] or [3, batch, length] with [batch, length] = "
                         f"{(b, l)}, got shape {positions.shape}")
    check_int("chunk_size", chunk_size, 1)
    padded = -(-l // chunk_size) * chunk_size
    start = int(cache.index)  # a write past the last slot would be clamped by dynamic_update_slice, not raise
    if start + padded > cache.max_len:
        raise ValueError(f"a prompt of {l} tokens padded to whole chunks of {chunk_size} ({padded} slots) from slot "
                         f"{start} does not fit the cache's {cache.max_len} slots")
    logits, hidden = None, []
    for ids_c, mask_c, pos_c, embeds_c in prompt_chunks(chunk_size, (ids, 1), (mask, 1), (positions, -1),
                                                        (inputs_embeds, 1)):
        logits, h, cache = _prefill_chunk(graphdef, params, cache, ids_c, mask_c, pos_c, embeds_c, return_hidden)
        hidden.append(h)
    if return_hidden:
        return logits, cache, jnp.concatenate(hidden, axis=1)[:, padded - l:]
    return logits, cache


# ------------------------------------------------------------------ decode


@jit_with_graph(donate_argnums=(1,))
def decode_step(graphdef: nnx.GraphDef, params: nnx.State, cache: Cache, tokens: jax.Array,
                rope_delta: jax.Array | None = None) -> tuple[jax.Array, Cache]:
    """One token per row [B] -> (logits [B, V] float32, cache); the cache is donated.

    rope_delta [B] int (multimodal): the token's position on all three rotary rows is the row's count of real
    tokens so far plus its delta; None: the count itself.
    """
    position = None
    if rope_delta is not None:
        position = jnp.broadcast_to((cache.position + rope_delta)[None, :, None], (3, tokens.shape[0], 1))
    out = nnx.merge(graphdef, params)(tokens[:, None], position_ids=position, cache=cache)
    return out.logits[:, -1].astype(jnp.float32), out.cache


# ------------------------------------------------------------------ mesh placement


class MeshPlacement:
    """Lays parameters, caches and inputs out on a device mesh by a qwax.sharding rule table; with mesh=None every
    method is the identity and `scope` does nothing.

    mesh: a jax.sharding.Mesh (e.g. qwax.sharding.mesh.make_mesh("data=2,tensor=4")) or None; rules: a strategy
    name of qwax.sharding.rules.STRATEGIES or a rule table (None: "fsdp"), only with a mesh.
    """

    def __init__(self, mesh: Mesh | None, rules: str | Rules | None = None):
        if mesh is None:
            if rules is not None:
                raise ValueError(f"rules={rules!r} lays arrays out on a device mesh: pass mesh= as well, or "
                                 "leave rules=None")
        elif not isinstance(mesh, Mesh):
            raise ValueError(f"mesh must be a jax.sharding.Mesh (see qwax.sharding.mesh.make_mesh), got "
                             f"{type(mesh).__name__}")
        self.mesh = mesh
        self.rules = None
        if mesh is not None:
            try:
                self.rules = get_rules("fsdp" if rules is None else rules)
            except KeyError as e:
                raise ValueError(f"rules={rules!r}: {e.args[0]}") from None

    def params(self, params: nnx.State) -> nnx.State:
        """Parameters laid out by their logical axes."""
        if self.mesh is None:
            return params
        return jax.device_put(params, param_shardings(params, self.rules, self.mesh))

    def cache(self, cache: Cache) -> Cache:
        """A decoding cache laid out by `cache_logical_axes`."""
        if self.mesh is None:
            return cache
        return jax.device_put(cache, tree_shardings(cache, cache_logical_axes(cache), self.rules, self.mesh))

    def array(self, x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
        """An activation-like input, e.g. embeddings [B, L, H] with ("batch", "length", "act_embed")."""
        if self.mesh is None:
            return x
        return jax.device_put(x, logical_sharding(logical_axes, tuple(x.shape), self.rules, self.mesh))

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """The mesh and rules active for the sharding constraints of the steps traced inside."""
        if self.mesh is None:
            yield
            return
        with use_sharding(self.mesh, self.rules):
            yield


# ------------------------------------------------------------------ sampling loop


class TokenSink:
    """Collects the generated columns of a request: a row finishes at a stop id, at its own token limit, or when
    the stream callback says so, and gets the pad id from then on; each column goes to the stream callback as soon
    as it is known."""

    def __init__(self, request: Request):
        self.eos, self.pad, self.stream = request.eos, request.pad, request.stream
        self.limits = request.limits
        self.done = self.limits <= 0
        self.columns: list[np.ndarray] = []

    @property
    def count(self) -> int:
        return len(self.columns)

    def emit(self, tokens: np.ndarray) -> bool:
        """Append a column [B]; True when generation is over (every row finished)."""
        tokens = np.where(self.done, self.pad, tokens).astype(np.int32)
        self.columns.append(tokens)
        finish = self.stream(tokens) if self.stream is not None else None
        self.done |= np.isin(tokens, self.eos) | (self.count >= self.limits)
        if finish is not None:
            self.done |= np.asarray(finish, bool)
        return bool(self.done.all())

    def tokens(self) -> np.ndarray:
        """The new tokens [B, n] int32."""
        if not self.columns:
            return np.zeros((self.done.shape[0], 0), np.int32)
        return np.stack(self.columns, axis=1)


def sample_loop(decode: Callable[[Cache, jax.Array], tuple[jax.Array, Cache]], logits: jax.Array, cache: Cache,
                request: Request) -> np.ndarray:
    """Choose a token per row from `logits` [B, V] (see qwax.inference.sampling.choose), then
    `decode(cache, tokens) -> (logits, cache)`, until every row has hit a stop id or its token limit.
    Finished rows get the pad id. Returns the new tokens [B, n]."""
    sink = TokenSink(request)
    if sink.done.all():
        return sink.tokens()
    state = initial_state(request.keys, request.ids, request.mask, logits.shape[-1], request.penalised)
    settings = RowSettings(*(jnp.asarray(x) for x in request.settings))
    while True:
        tokens_dev, state = choose(logits, state, settings, sampling=request.sampling)
        if sink.count < request.max_new_tokens - 1:
            # Queue the next decode step before waiting for this step's tokens: the host's work below (the copy,
            # the stream callback, the stop test) then overlaps the device's. When every row has stopped, this
            # one step is wasted.
            logits, cache = decode(cache, tokens_dev)
        if sink.emit(np.asarray(tokens_dev)):
            return sink.tokens()


def generate_tokens(model: QwaxForCausalLM, request: Request, placement: MeshPlacement, *,
                    inputs_embeds: jax.Array | None = None, position_ids: Any = None, rope_delta: Any = None
                    ) -> np.ndarray:
    """Prefill the request's prompt (or `inputs_embeds` [B, L, H] with `position_ids` [3, B, L]) into a fresh
    cache, then run the sampling loop (decoding with `rope_delta` [B] when given). Returns the new tokens [B, n].

    The model's parameters and the cache are laid out by `placement`, and the steps traced inside its scope.
    """
    if request.max_new_tokens == 0:
        return np.zeros((request.batch, 0), np.int32)
    with placement.scope():
        graphdef, params = nnx.split(model)
        params = placement.params(params)
        cache = placement.cache(init_cache(model.config, model.options, request.batch, request.max_len))
        logits, cache = prefill(graphdef, params, cache, None if inputs_embeds is not None else request.ids,
                                request.mask, request.chunk, inputs_embeds=inputs_embeds, position_ids=position_ids)
        if rope_delta is None:
            decode = functools.partial(decode_step, graphdef, params)
        else:
            decode = functools.partial(decode_step, graphdef, params, rope_delta=jnp.asarray(rope_delta, jnp.int32))
        return sample_loop(decode, logits, cache, request)
