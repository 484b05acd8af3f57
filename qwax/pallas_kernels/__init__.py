"""Custom ops with a plain-JAX reference next to each fast implementation.

`gated_delta_rule` / `gated_delta_rule_step` (Gated DeltaNet's token mixer, `gated_delta_rule/`) and the MoE ops
`routed_experts`, `grouped_matmul`, `tgmm` (`moe/`) are importable from here.
"""

from qwax.pallas_kernels.gated_delta_rule import gated_delta_rule, gated_delta_rule_step
from qwax.pallas_kernels.moe import grouped_matmul, routed_experts, tgmm

__all__ = ["gated_delta_rule", "gated_delta_rule_step", "grouped_matmul", "routed_experts", "tgmm"]
