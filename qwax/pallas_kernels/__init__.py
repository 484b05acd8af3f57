"""The model's ops, one folder each: public signature and checks in `__init__`, a plain-JAX `reference.py`
oracle, the XLA paths in `xla.py`, Pallas kernels beside them. `dispatch.resolve_impl` picks the implementation
of every op.

  linear/            linear                                    every Linear, the tied LM head
  attention/         attention, attend_cache, write_kv,        gated attention's softmax and its KV cache
                     kv_cache_shapes, kv_block_size
  causal_conv/       causal_depthwise_conv                     Gated DeltaNet's short convolution
  gated_delta_rule/  gated_delta_rule, gated_delta_rule_step   Gated DeltaNet's token mixer
  moe/               routed_experts, grouped_matmul, tgmm      the routed experts (sharded.py: under a mesh)
"""

from qwax.pallas_kernels.attention import attend_cache, attention, kv_block_size, kv_cache_shapes, write_kv
from qwax.pallas_kernels.causal_conv import causal_depthwise_conv
from qwax.pallas_kernels.dispatch import resolve_impl
from qwax.pallas_kernels.gated_delta_rule import gated_delta_rule, gated_delta_rule_step
from qwax.pallas_kernels.linear import linear
from qwax.pallas_kernels.moe import grouped_matmul, routed_experts, tgmm

__all__ = ["attend_cache", "attention", "causal_depthwise_conv", "gated_delta_rule", "gated_delta_rule_step",
           "grouped_matmul", "kv_block_size", "kv_cache_shapes", "linear", "resolve_impl", "routed_experts", "tgmm",
           "write_kv"]
