"""Self-speculative decoding with the MTP head: the head drafts token t+2, the main model verifies it.

Each iteration runs one MTP step (draft) and one 2-token main forward (verify) over [x, draft]:
  - the main model's choice after x equals the draft: both are committed, plus the main model's next choice
    (2 tokens per main forward);
  - otherwise only the main model's choice after x is committed (1 token per main forward), and the cache is
    rolled back by one token with `Cache.rollback`: attention slots are invalidated, and every Gated DeltaNet
    layer returns to the recurrent and conv state it had after x (the verify forward keeps the state after each
    token, see `keep_step_states`), so no recomputation is needed.
The MTP layer keeps its own KV cache; it only ever receives committed (hidden, next token) pairs, so it never
needs a rollback. Rows of a batch advance together: a draft is accepted only when every row accepts it, which
keeps one cache index and loses nothing but speed. Greedy decoding (temperature 0) only: the tokens are exactly
those of plain greedy decoding, so this path takes no temperature, top_k, top_p or seed.

The prompt goes through the engine's chunked prefill (with its hidden states), then the MTP head's cache is
filled with the same chunks; with a mesh, the parameters, the main cache and the MTP cache are all laid out on it.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qwax.graph_jit import jit_with_graph
from qwax.inference.cache import Cache, init_cache, init_mtp_cache
from qwax.inference.engine import (MeshPlacement, Request, Stream, TokenSink, check_request, prefill,
                                   prompt_chunks)
from qwax.model import QwaxForCausalLM
from qwax.sharding.rules import Rules


@jit_with_graph(donate_argnums=(1,))
def _mtp_step(graphdef: nnx.GraphDef, params: nnx.State, mtp_cache: Cache, hidden: jax.Array, next_ids: jax.Array,
              mask: jax.Array) -> tuple[jax.Array, Cache]:
    """MTP head over hidden [B, L, H] and the tokens after them next_ids [B, L] (mask [B, L]) into `mtp_cache`:
    (last-position draft logits [B, V] float32, mtp_cache)."""
    out = nnx.merge(graphdef, params).mtp_forward(hidden, next_ids, attention_mask=mask, cache=mtp_cache)
    return out.logits[:, -1].astype(jnp.float32), out.cache


@jit_with_graph(static_argnums=(3,), donate_argnums=(1,))
def _verify(graphdef: nnx.GraphDef, params: nnx.State, cache: Cache, tokens: jax.Array, keep_after_reject: int
            ) -> tuple[jax.Array, jax.Array, Cache, Cache]:
    """Run [x, draft] [B, 2] and return (greedy choices [B, 2], hidden [B, 2, H], cache if accepted, cache if
    rejected: the state after the first `keep_after_reject` tokens)."""
    out = nnx.merge(graphdef, params)(tokens, cache=cache, keep_step_states=True)
    choices = jnp.argmax(out.logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
    return choices, out.hidden, out.cache.rollback(2, 2), out.cache.rollback(2, keep_after_reject)


def _draft_tokens(mtp_logits: jax.Array, generated: int) -> np.ndarray:
    """The MTP head's greedy draft [B] (a seam for tests that inject an oracle draft)."""
    del generated
    return np.asarray(jnp.argmax(mtp_logits, axis=-1), np.int32)


def generate_mtp(model: QwaxForCausalLM, input_ids: Any, *, max_new_tokens: int, attention_mask: Any = None,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 stream: Stream | None = None, prefill_chunk_size: int = 512, mesh: Mesh | None = None,
                 rules: str | Rules | None = None, stats: dict | None = None) -> np.ndarray:
    """Greedy generation accelerated by the MTP head; the arguments and result of `qwax.generate` (temperature 0).

    stats: if given, filled with {"drafts": n, "accepted": n, "acceptance_rate": f, "main_forwards": n}
    (main_forwards counts the verify forwards, not the prefill).
    """
    cfg = model.config
    if not cfg.mtp_num_hidden_layers:
        raise ValueError("speculative='mtp' needs a model with an MTP head (config.mtp_num_hidden_layers > 0)")
    request = check_request(cfg, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                            eos_token_id=eos_token_id, pad_token_id=pad_token_id, stream=stream,
                            prefill_chunk_size=prefill_chunk_size)
    placement = MeshPlacement(mesh, rules)
    sink = TokenSink(request)
    drafts = accepted = 0
    if max_new_tokens:
        with placement.scope():
            drafts, accepted = _decode(model, request, placement, sink)
    if stats is not None:
        stats.update(drafts=drafts, accepted=accepted, main_forwards=drafts,
                     acceptance_rate=accepted / drafts if drafts else 0.0)
    return np.concatenate([request.ids, sink.tokens()], axis=1)


def _decode(model: QwaxForCausalLM, request: Request, placement: MeshPlacement, sink: TokenSink) -> tuple[int, int]:
    """Prefill, then draft / verify until `sink` is done; returns (drafts, accepted drafts)."""
    cfg, b = model.config, request.batch
    graphdef, params = nnx.split(model)
    params = placement.params(params)
    cache = placement.cache(init_cache(cfg, model.options, b, request.max_len))
    mtp_cache = placement.cache(init_mtp_cache(cfg, model.options, b, request.max_len))
    logits, cache, hidden = prefill(graphdef, params, cache, request.ids, request.mask, request.chunk,
                                    return_hidden=True)
    x = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
    # MTP prefill: position j sees (hidden_j, token j+1); the last position's next token is the first choice x.
    next_ids = np.concatenate([request.ids[:, 1:], x[:, None]], axis=1)
    for h, ids, mask in prompt_chunks(request.chunk, (hidden, 1), (next_ids, 1), (request.mask, 1)):
        mtp_logits, mtp_cache = _mtp_step(graphdef, params, mtp_cache, h, ids, mask)
    del hidden

    drafts = accepted = 0
    finished = sink.emit(x)
    while not finished:
        draft = _draft_tokens(mtp_logits, sink.count)
        choices, h2, cache_if_accept, cache_if_reject = _verify(graphdef, params, cache,
                                                                jnp.asarray(np.stack([x, draft], 1)), 1)
        choices = np.asarray(choices)
        drafts += 1
        if np.array_equal(choices[:, 0], draft):
            accepted += 1
            cache = cache_if_accept
            mtp_logits, mtp_cache = _mtp_step(graphdef, params, mtp_cache, h2, jnp.asarray(choices),
                                              jnp.ones((b, 2), jnp.int32))
            finished = sink.emit(choices[:, 0]) or sink.emit(choices[:, 1])
            x = choices[:, 1]
        else:
            cache = cache_if_reject
            mtp_logits, mtp_cache = _mtp_step(graphdef, params, mtp_cache, h2[:, :1], jnp.asarray(choices[:, :1]),
                                              jnp.ones((b, 1), jnp.int32))
            finished = sink.emit(choices[:, 0])
            x = choices[:, 0]
    return drafts, accepted
