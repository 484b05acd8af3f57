"""The linear map for XLA: x [..., in] as one [tokens, in] matrix times w [in, out].

One tokens axis: the kernel gradient x^T dy then contracts a single axis. Contracting [B, L] jointly made
XLA:CPU transpose the incoming gradient into a fresh buffer first, fused into its producer as a strided loop
(~15 ms per [2048, 1024] matrix).

On the CPU the kernel gradient also wants x^T in a buffer of its own once the output is wide: XLA:CPU runs
x^T dy with both operands contracted on their major axis at half the speed of the same product with x^T
materialised. [2048, 512] x [2048, N] took 190 vs 98 ms at N = 8192 (the bench's LM head), 95 vs 49 at 4096,
33 vs 25 at 2048, 14.4 vs 13.0 at 1024, where the transpose (~4 ms inside a train step) no longer pays; hence
WIDE_OUTPUT. The transposed copy is made in the JVP rule (jax.custom_jvp), whose kernel-tangent term is a dot
against it: reverse mode transposes that term into xt @ dy, the fast form, and forward mode (jax.jvp,
jax.jacfwd) works unchanged. An optimization_barrier keeps XLA from folding the transpose back into the dot.
On TPU and GPU the op is a plain dot.

Merging [B, L] into one tokens axis is only free while the sequence is whole on each device: with L split over a
`context` mesh axis (context parallelism) and more than one local row, the merged axis has no sharding GSPMD can
express, and it would all-gather the sequence. Under such a mesh the dot contracts x's last axis in place instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from qwax.pallas_kernels.platform import current_platform

# Output width from which the CPU kernel gradient reads a materialised x^T.
WIDE_OUTPUT = 2048


def linear_xla(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out] -> [..., out]."""
    if x.ndim > 2 and _sequence_split():
        return jnp.einsum("...i,io->...o", x, w)
    x2 = x.reshape(-1, x.shape[-1])
    y = _matmul_cpu(x2, w) if current_platform() == "cpu" else jnp.dot(x2, w)
    return y.reshape(*x.shape[:-1], w.shape[1])


def _sequence_split() -> bool:
    """Whether jax's current mesh (set by qwax.sharding.use_sharding) has a `context` axis > 1."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and dict(zip(mesh.axis_names, mesh.axis_sizes)).get("context", 1) > 1


@jax.custom_jvp
def _matmul_cpu(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [T, in] @ w [in, out]; the JVP rule below picks the kernel gradient's operand layout."""
    return jnp.dot(x, w)


def _matmul_cpu_jvp(primals: tuple[jax.Array, jax.Array], tangents: tuple) -> tuple[jax.Array, jax.Array]:
    x, w = primals
    dx, dw = tangents
    y = jnp.dot(x, w)
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(jnp.dot(dx, w))
    if not isinstance(dw, SymbolicZero):
        # x as the transpose of a materialised x^T: transposing this term gives xt @ dy.
        xt = jax.lax.optimization_barrier(x.T) if w.shape[1] >= WIDE_OUTPUT else x.T
        terms.append(jnp.dot(xt.T, dw))
    if not terms:
        return y, jnp.zeros_like(y)
    return y, terms[0] if len(terms) == 1 else terms[0] + terms[1]


_matmul_cpu.defjvp(_matmul_cpu_jvp, symbolic_zeros=True)
