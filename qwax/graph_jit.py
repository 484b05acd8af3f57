"""`jit_with_graph`: jit a pure function of (graphdef, params, ...) with the graph definition as a static argument,
without paying for hashing it on every call.

`jax.jit(fn, static_argnums=0)` hashes the static `nnx.GraphDef` on each call, and hashing a whole model's graph
definition walks every node: ~1-3 ms per call on the CPU, as much as a tiny model's whole decode step. Here each
distinct graph definition gets its own jitted closure (found by equality once, then by identity), so a decode loop
that passes the same graphdef object every step dispatches straight to the compiled function.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from flax import nnx


def jit_with_graph(fn: Callable | None = None, **jit_kwargs: Any) -> Callable:
    """Decorator: `fn(graphdef, *args, **kwargs)` jitted per graph definition.

    `jit_kwargs` go to `jax.jit` and count positions and names among the arguments after `graphdef`
    (`donate_argnums=(1,)` donates the argument after the params in `fn(graphdef, params, cache, ...)`).
    The wrapper has `.lower(graphdef, *args, **kwargs)` like a jitted function.
    """
    if fn is None:
        return functools.partial(jit_with_graph, **jit_kwargs)

    @functools.lru_cache(maxsize=16)
    def for_graph(graphdef: nnx.GraphDef) -> Callable:
        return jax.jit(functools.partial(fn, graphdef), **jit_kwargs)

    last: list[Any] = [None, None]  # (graphdef, jitted closure) of the latest call: the identity fast path

    def jitted(graphdef: nnx.GraphDef) -> Callable:
        if last[0] is not graphdef:
            last[:] = [graphdef, for_graph(graphdef)]
        return last[1]

    @functools.wraps(fn)
    def call(graphdef: nnx.GraphDef, *args: Any, **kwargs: Any) -> Any:
        return jitted(graphdef)(*args, **kwargs)

    call.lower = lambda graphdef, *args, **kwargs: jitted(graphdef).lower(*args, **kwargs)
    return call
