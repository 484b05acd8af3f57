"""The KV cache layout of the attention op, and the write of new keys and values into it.

Keys are stored transposed, k [*lead, B, Nkv, D, T], and values as v [*lead, B, Nkv, T, D]: a block of slots is
then, as stored, the right-hand operand of both attention matmuls (q @ K_blk and p @ V_blk), which on the CPU
reads a 16k-slot cache ~2.5x faster than slicing keys stored [T, D]. `lead` is () for the cache of one layer,
or (G,) for a stack of G layer groups, where a layer addresses its entry with `group`.
"""

from __future__ import annotations

import jax

# What each dim of the (k, v) cache arrays holds, after the lead dims.
K_DIMS = ("batch", "kv_heads", "head_dim", "slots")
V_DIMS = ("batch", "kv_heads", "slots", "head_dim")


def kv_cache_shapes(batch: int, num_kv_heads: int, head_dim: int, max_len: int, lead: tuple[int, ...] = ()
                    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the (k, v) cache arrays for `batch` rows of `max_len` slots: ([*lead, B, Nkv, D, T],
    [*lead, B, Nkv, T, D])."""
    sizes = {"batch": batch, "kv_heads": num_kv_heads, "head_dim": head_dim, "slots": max_len}
    return (*lead, *(sizes[d] for d in K_DIMS)), (*lead, *(sizes[d] for d in V_DIMS))


def at(group: jax.Array | None, *index) -> tuple:
    """Start indices into a cache array, with the stacked-layer index first when there is one."""
    return index if group is None else (group, *index)


def write_kv(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array,
             group: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Write k, v [B, L, Nkv, D] at slots [index, index + L) of the caches (of entry `group` if stacked)."""
    def write(buf, new, start):
        new = new.astype(buf.dtype)
        return jax.lax.dynamic_update_slice(buf, new if group is None else new[None], at(group, *start))

    return (write(k_cache, k.transpose(0, 2, 3, 1), (0, 0, 0, index)),  # [B, Nkv, D, L]
            write(v_cache, v.transpose(0, 2, 1, 3), (0, 0, index, 0)))  # [B, Nkv, L, D]
