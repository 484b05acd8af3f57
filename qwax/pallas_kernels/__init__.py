"""Custom ops with a plain-JAX reference next to each fast implementation."""

from qwax.pallas_kernels.gated_delta_rule import gated_delta_rule, gated_delta_rule_step

__all__ = ["gated_delta_rule", "gated_delta_rule_step"]
