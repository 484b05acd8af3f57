"""Build a model directly into its shards.

Kept apart from qwax.sharding.rules because it imports the model, whose layers import the rules (and
expert_parallel); `qwax.sharding` (the package) does not import this module, so import it by name:

    from qwax.sharding.init import init_sharded
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from qwax.config import QwaxConfig
from qwax.model import QwaxForCausalLM
from qwax.options import RunOptions
from qwax.sharding.rules import Rules, get_rules, param_shardings


def init_sharded(cfg: QwaxConfig, mesh: Mesh, rules: Rules | str = "fsdp", seed: int = 0,
                 options: RunOptions | None = None) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Build `QwaxForCausalLM(cfg, options)` straight into its shards: (graphdef, params, param shardings).

    rules: a strategy name of qwax.sharding.rules.STRATEGIES or a rule table; options: the run options
    (None: RunOptions(), as for the model). Initialisation runs under jit with the rules' out_shardings, so no
    device (or process) ever holds a full copy; the values equal those of
    `QwaxForCausalLM(cfg, options, rngs=nnx.Rngs(seed))` on one device. params and shardings are nnx.States of
    the nnx.Param variables, with the shapes of the model's parameters (a leading layer-group dim when scanned).
    """
    if options is not None and not isinstance(options, RunOptions):
        raise TypeError(f"init_sharded: options={options!r}: expected a qwax.RunOptions or None")
    rules = get_rules(rules) if isinstance(rules, str) else rules

    def build() -> tuple[nnx.GraphDef, nnx.State]:
        return nnx.split(QwaxForCausalLM(cfg, options, rngs=nnx.Rngs(seed)), nnx.Param)

    graphdef, abstract = nnx.eval_shape(build)
    shardings = param_shardings(abstract, rules, mesh)
    params = jax.jit(lambda: build()[1], out_shardings=shardings)()
    return graphdef, params, shardings
