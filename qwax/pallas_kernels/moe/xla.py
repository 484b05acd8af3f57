"""XLA (non-Pallas) MoE expert compute, with a fast path for the CPU.

CPU path (``jax.default_backend() == "cpu"``)
--------------------------------------------
``jax.lax.ragged_dot`` is lowered on the CPU as a dense masked matmul, so its cost grows with the number
of experts E; a fixed-capacity batched einsum wastes ``E * capacity - T * k`` rows and must either drop
tokens or size the capacity for the worst case (``T * k`` rows per expert, cost ~E times too big).

Instead we sort the token-slots by expert (see ``routing``) and walk the sorted rows expert by expert
with ``lax.fori_loop``: for each expert, its weights are sliced once, then its rows are processed in
row tiles of a *ladder* of static sizes, e.g. ``(256, 128, 64, 32)``: as many 256-row tiles as fit,
then at most one 128- and one 64-row tile, then 32-row tiles for the rest. Each tile is a dense
``[B, H] @ [H, 2I]`` matmul, the SwiGLU and the ``[B, I] @ [I, H]`` matmul, all on data that stays in
cache, and its weighted result is scatter-added into the output. Only the last tile of an expert can run past the expert's rows; those rows are
masked (zero combine weight) so the overrun is harmless.

Cost: ``T * k`` rows of matmul plus at most ``E * (B_last - 1)`` padding rows (B_last = 32: <= 6% at
T * k = 32768, E = 64), one read of each expert's weights (inherent), and a per-tile loop overhead of
~microseconds. Trade-offs against one big batched matmul: (+) cost ~ T * k, not E * capacity; no
token is ever dropped; no [S, H] permuted copy of x is materialised (rows are gathered per tile);
(-) tiles run one after another, so each tile's matmul must be big enough to use the cores (true
for >= 64-row tiles on this 2-core CPU), groups much smaller than a tile run at lower efficiency,
and the ladder is a static heuristic from T * k / E (``default_row_tiles``).

Measured (bench_moe.py: T = 4096, H = 512, I = 256, k = 8, f32, 2-core shared CPU, process CPU time
to cancel other jobs' load): E = 64 costs ~1.1-1.2x E = 8 forward and ~1.2x forward+backward
(E = 8 with k = 8 is the best case: every token visits every expert, so gathers are sequential);
E = 256 (~128 rows per expert) ~1.5x forward, ~1.9x forward+backward. In the quietest runs the
op reached ~100 GFLOP/s wall at E = 64 forward and forward+backward, vs ~160 for a 2048^3 matmul.

Backward: a ``custom_vjp`` runs the same loop once more. The forward saves the gate/up pre-activations
``h`` (S x 2I, in sorted order) so nothing is recomputed; per tile the backward does 4 matmuls
(dy Wd^T, a^T dy, x^T dh, dh Wgu^T) = 6 units of ``2 * S * H * I`` flops vs 3 units forward, the
minimum for this layer. Weight gradients are accumulated per expert in the loop carry (no
scatter-add of [E, H, 2I]); dx is a per-tile row scatter-add. The weight-gradient matmuls contract
over the tile's rows, so a small tile pays the full [H, 2I] + [I, H] accumulator update for little
work: that is why many small groups (E = 256 here) cost relatively more backward than forward.

Other backends
--------------
On TPU/GPU the "xla" implementation uses ``jax.lax.ragged_dot`` (which XLA lowers to a real grouped
matmul there) through the routing layer in ``grouped_matmul.routed_experts_grouped``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from qwax.pallas_kernels.moe import routing as routing_lib

_F32 = jnp.float32


def default_row_tiles(num_rows: int, num_groups: int) -> tuple[int, ...]:
    """Static row-tile ladder for ``num_rows`` sorted rows spread over ``num_groups`` groups.

    A halving ladder ``(big, big/2, ..., 32)``: each group is covered by whole ``big`` tiles, then at
    most one tile of each smaller size, then 32-row tiles (rounded up). Measured on the 2-core CPU
    (hidden 512, expert width 256): the fused tile runs at ~105-120 GFLOP/s of process CPU time for
    >= 128 rows, ~105 at 64 and ~90 at 32 rows forward; backward the per-tile weight-gradient
    accumulation makes small tiles costlier (~50 GFLOP/s at 32 rows, ~78 at 64, ~107 at >= 128).
    So ``big`` is 256 unless the average group is smaller, and padding is bounded by 31 rows per group.
    """
    avg = max(1, num_rows // max(1, num_groups))
    big = 256
    while big > 64 and big > avg:
        big //= 2
    tiles = [big]
    while tiles[-1] > 32:
        tiles.append(tiles[-1] // 2)
    return tuple(tiles)


def _ladder_loop(
    start: jax.Array,
    size: jax.Array,
    tiles: Sequence[int],
    tile_fn: Callable[[int, jax.Array, bool, Any], Any],
    carry: Any,
) -> Any:
    """Cover rows ``[start, start + size)`` with tiles of the static sizes ``tiles`` (descending).

    All levels but the last use whole tiles only; the last level rounds up, so its final tile may run
    up to ``tiles[-1] - 1`` rows past the end. ``tile_fn(B, r0, needs_mask, carry)`` processes rows
    ``[r0, r0 + B)``; ``needs_mask`` is a static bool (only the last level can overrun).
    """
    done = jnp.zeros((), jnp.int32)
    for level, b in enumerate(tiles):
        last = level == len(tiles) - 1
        remaining = size - done
        n = (remaining + b - 1) // b if last else remaining // b
        base = start + done

        def body(i, c, b=b, base=base, last=last):
            return tile_fn(b, base + i * b, last, c)

        carry = jax.lax.fori_loop(0, n, body, carry)
        done = done + n * b
    return carry


def _pad_rows(tiles: Sequence[int]) -> int:
    """Rows of zero padding after the sorted rows so that no tile slice leaves the array.

    Only the last ladder level overruns (by < ``tiles[-1]`` rows), but every tile size must also fit in
    the padded array even when there are fewer rows than one tile: ``dynamic_slice`` would otherwise
    clamp the start index and silently read the wrong rows.
    """
    return max(tiles)


def _tile_rows(arr: jax.Array, r0: jax.Array, b: int) -> jax.Array:
    """``arr[r0 : r0 + b]`` along axis 0 with a traced start."""
    return jax.lax.dynamic_slice_in_dim(arr, r0, b, axis=0)


def _gather(arr: jax.Array, idx: jax.Array) -> jax.Array:
    """``arr[idx]`` along axis 0 for indices known to be in bounds (skips XLA's clamping)."""
    return arr.at[idx].get(mode="promise_in_bounds")


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int] = (1, 0)) -> jax.Array:
    """2-D matmul contracting ``a``'s dim ``contract[0]`` with ``b``'s ``contract[1]``, f32 accumulate."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=_F32)


# ----------------------------------------------------------------------------------------------------
# Fused CPU routed experts.
# ----------------------------------------------------------------------------------------------------


def _fused_forward(
    x: jax.Array,
    token_p: jax.Array,
    wsort_p: jax.Array,
    offsets: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    tiles: tuple[int, ...],
    save_h: bool,
) -> tuple[jax.Array, jax.Array | None]:
    """Loop over experts and row tiles. Returns y [T, H] f32 and (if ``save_h``) h [S_pad, 2I].

    token_p / wsort_p: [S_pad] token id and combine weight of each sorted slot, padded at the end by
    ``_pad_rows(tiles)`` entries (token 0, weight 0) so every tile stays in bounds.
    """
    t, hdim = x.shape
    e, _, i2 = w_gate_up.shape
    i = i2 // 2
    s_pad = token_p.shape[0]
    h_dtype = jnp.result_type(x.dtype, w_gate_up.dtype)

    def expert_body(ex, carry):
        wgu = w_gate_up[ex]  # [H, 2I]: sliced once per expert, reused by all its tiles.
        wd = w_down[ex]  # [I, H]
        start = offsets[ex]
        end = offsets[ex + 1]

        def tile_fn(b, r0, needs_mask, c):
            y, hbuf = c
            tok = _tile_rows(token_p, r0, b)
            ww = _tile_rows(wsort_p, r0, b).astype(_F32)
            if needs_mask:
                # Rows past this expert's range belong to the next expert (or padding): zero weight.
                valid = (r0 + jnp.arange(b, dtype=jnp.int32)) < end
                ww = jnp.where(valid, ww, 0.0)
            xt = _gather(x, tok)
            h = _dot(xt, wgu)  # [B, 2I]
            act = jax.nn.silu(h[:, :i]) * h[:, i:]
            o = _dot(act.astype(wd.dtype), wd) * ww[:, None]  # [B, H]
            if needs_mask:
                o = jnp.where(valid[:, None], o, 0.0)  # also kills NaN/inf from out-of-range rows
            y = y.at[tok].add(o, mode="promise_in_bounds")
            if hbuf is not None:
                # Ordered overwrite: an overrun row is rewritten later by its own expert's tile.
                hbuf = jax.lax.dynamic_update_slice_in_dim(hbuf, h.astype(h_dtype), r0, axis=0)
            return y, hbuf

        return _ladder_loop(start, end - start, tiles, tile_fn, carry)

    y0 = jnp.zeros((t, hdim), _F32)
    h0 = jnp.zeros((s_pad, i2), h_dtype) if save_h else None
    return jax.lax.fori_loop(0, e, expert_body, (y0, h0))


def _fused_backward(
    dy: jax.Array,
    x: jax.Array,
    token_p: jax.Array,
    wsort_p: jax.Array,
    offsets: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    hbuf: jax.Array,
    tiles: tuple[int, ...],
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Gradients of the fused loop. Returns dx [T,H] f32, dw_sorted [S_pad] f32, dWgu, dWd (f32)."""
    t, hdim = x.shape
    e, _, i2 = w_gate_up.shape
    i = i2 // 2
    s_pad = token_p.shape[0]

    def expert_body(ex, carry):
        wgu = w_gate_up[ex]
        wd = w_down[ex]
        start = offsets[ex]
        end = offsets[ex + 1]

        def tile_fn(b, r0, needs_mask, c):
            dx, dws, acc_gu, acc_d = c
            tok = _tile_rows(token_p, r0, b)
            ww = _tile_rows(wsort_p, r0, b).astype(_F32)
            if needs_mask:
                valid = (r0 + jnp.arange(b, dtype=jnp.int32)) < end
                ww = jnp.where(valid, ww, 0.0)
            xt = _gather(x, tok)
            dyt = _gather(dy, tok).astype(_F32)
            h = _tile_rows(hbuf, r0, b).astype(_F32)
            gate, up = h[:, :i], h[:, i:]
            sg = jax.nn.sigmoid(gate)
            silu = gate * sg
            act = silu * up  # [B, I]
            q = _dot(dyt, wd, (1, 1))  # dy @ Wd^T: [B, I]
            # d y / d weight_s = <o_s, dy_t> = <act_s, dy_t Wd^T>: no need to recompute o.
            dws = jax.lax.dynamic_update_slice_in_dim(dws, jnp.sum(act * q, axis=-1), r0, axis=0)
            do = dyt * ww[:, None]
            if needs_mask:
                do = jnp.where(valid[:, None], do, 0.0)
            acc_d = acc_d + _dot(act.astype(wd.dtype), do.astype(wd.dtype), (0, 0))  # act^T @ do: [I, H]
            da = q * ww[:, None]
            if needs_mask:
                da = jnp.where(valid[:, None], da, 0.0)
            dgate = da * up * sg * (1.0 + gate * (1.0 - sg))  # silu'(g) = sg * (1 + g * (1 - sg))
            dup = da * silu
            dh = jnp.concatenate([dgate, dup], axis=-1).astype(wgu.dtype)  # [B, 2I]
            acc_gu = acc_gu + _dot(xt, dh, (0, 0))  # x^T @ dh: [H, 2I]
            dxt = _dot(dh, wgu, (1, 1))  # dh @ Wgu^T: [B, H]
            dx = dx.at[tok].add(dxt, mode="promise_in_bounds")
            return dx, dws, acc_gu, acc_d

        dx, dws, dwgu, dwd = carry
        acc0 = (jnp.zeros((hdim, i2), _F32), jnp.zeros((i, hdim), _F32))
        dx, dws, acc_gu, acc_d = _ladder_loop(start, end - start, tiles, tile_fn, (dx, dws) + acc0)
        # Each expert is visited once, so its gradient is written, not accumulated.
        dwgu = jax.lax.dynamic_update_index_in_dim(dwgu, acc_gu.astype(dwgu.dtype), ex, axis=0)
        dwd = jax.lax.dynamic_update_index_in_dim(dwd, acc_d.astype(dwd.dtype), ex, axis=0)
        return dx, dws, dwgu, dwd

    init = (
        jnp.zeros((t, hdim), _F32),
        jnp.zeros((s_pad,), _F32),
        jnp.zeros(w_gate_up.shape, _F32),
        jnp.zeros(w_down.shape, _F32),
    )
    return jax.lax.fori_loop(0, e, expert_body, init)


def _prepare(expert_idx, expert_weights, num_experts, pad):
    """Routing plus per-sorted-slot token ids / weights, padded by ``pad`` rows."""
    r = routing_lib.sort_by_expert(expert_idx, num_experts)
    w_sorted = _gather(expert_weights.reshape(-1), r.order)
    token_p = jnp.pad(r.token, (0, pad))
    wsort_p = jnp.pad(w_sorted, (0, pad))
    return r, token_p, wsort_p


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _routed_cpu(x, expert_idx, expert_weights, w_gate_up, w_down, tiles):
    e = w_gate_up.shape[0]
    r, token_p, wsort_p = _prepare(expert_idx, expert_weights, e, _pad_rows(tiles))
    y, _ = _fused_forward(x, token_p, wsort_p, r.group_offsets, w_gate_up, w_down, tiles, save_h=False)
    return y.astype(x.dtype)


def _routed_cpu_fwd(x, expert_idx, expert_weights, w_gate_up, w_down, tiles):
    e = w_gate_up.shape[0]
    r, token_p, wsort_p = _prepare(expert_idx, expert_weights, e, _pad_rows(tiles))
    y, hbuf = _fused_forward(x, token_p, wsort_p, r.group_offsets, w_gate_up, w_down, tiles, save_h=True)
    res = (x, expert_idx, expert_weights, w_gate_up, w_down, r, token_p, wsort_p, hbuf)
    return y.astype(x.dtype), res


def _routed_cpu_bwd(tiles, res, dy):
    x, expert_idx, expert_weights, w_gate_up, w_down, r, token_p, wsort_p, hbuf = res
    t, k = expert_idx.shape
    dx, dws, dwgu, dwd = _fused_backward(dy, x, token_p, wsort_p, r.group_offsets, w_gate_up, w_down, hbuf, tiles)
    # Back from sorted to (token, choice) order; dropped slots (sorted past the groups) get 0.
    dw = _gather(dws, r.inverse)
    dw = jnp.where(r.inverse < r.group_offsets[-1], dw, 0.0).reshape(t, k)
    return (
        dx.astype(x.dtype),
        None,
        dw.astype(expert_weights.dtype),
        dwgu.astype(w_gate_up.dtype),
        dwd.astype(w_down.dtype),
    )


_routed_cpu.defvjp(_routed_cpu_fwd, _routed_cpu_bwd)


# Up to this many bytes of gathered expert weights, few routed rows (decoding) run as one batched matmul over
# each row's own expert: the sorted loop's per-expert and per-tile overhead (~0.4 ms a layer for one token on this
# CPU) would cost more than the copy.
SMALL_GATHER_BYTES = 4 * 2**20


def _routed_gathered(x: jax.Array, idx: jax.Array, expert_weights: jax.Array, w_gate_up: jax.Array,
                     w_down: jax.Array) -> jax.Array:
    """Routed experts for few rows: gather each (token, slot)'s expert weights [T, k, H, 2I] / [T, k, I, H].

    Autodiff gives the gradients (a scatter-add into the gathered experts). Ids outside [0, E) contribute 0.
    """
    e, _, i2 = w_gate_up.shape
    kept = (idx >= 0) & (idx < e)
    safe = jnp.where(kept, idx, 0)
    h = jnp.einsum("th,tkhf->tkf", x.astype(_F32), w_gate_up[safe].astype(_F32))
    act = jax.nn.silu(h[..., : i2 // 2]) * h[..., i2 // 2:]
    y = jnp.einsum("tki,tkih->tkh", act, w_down[safe].astype(_F32))
    return jnp.einsum("tkh,tk->th", y, jnp.where(kept, expert_weights.astype(_F32), 0.0)).astype(x.dtype)


# With few experts per routed slot (E <= DENSE_EXPERTS_PER_SLOT * k) and at least as many slots as experts, every
# expert is (on average) used anyway: two GEMMs over all experts then beat copying T * k experts' weights (tiny
# models decoding batches; see bench_serve.py).
DENSE_EXPERTS_PER_SLOT = 4


def _routed_dense(x: jax.Array, idx: jax.Array, expert_weights: jax.Array, w_gate_up: jax.Array,
                  w_down: jax.Array) -> jax.Array:
    """Routed experts as two GEMMs over all E experts: [T, H] @ [H, E * 2I], SwiGLU, each expert's activations
    scaled by the token's routing weight for it (0 if not routed there), then [T, E * I] @ [E * I, H]."""
    e, hdim, i2 = w_gate_up.shape
    t, i = x.shape[0], i2 // 2
    kept = (idx >= 0) & (idx < e)
    combine = jnp.zeros((t, e), _F32).at[jnp.arange(t)[:, None], jnp.where(kept, idx, 0)].add(
        jnp.where(kept, expert_weights.astype(_F32), 0.0))
    h = (x.astype(_F32) @ jnp.transpose(w_gate_up.astype(_F32), (1, 0, 2)).reshape(hdim, e * i2)).reshape(t, e, i2)
    act = jax.nn.silu(h[..., :i]) * h[..., i:] * combine[..., None]
    return (act.reshape(t, e * i) @ w_down.astype(_F32).reshape(e * i, hdim)).astype(x.dtype)


def routed_experts_cpu(
    x: jax.Array,
    expert_idx: jax.Array,
    expert_weights: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    *,
    row_tiles: tuple[int, ...] | None = None,
) -> jax.Array:
    """Fused sorted-loop routed experts (see module docstring). Shapes as ``routed_experts``.

    Few rows (up to SMALL_GATHER_BYTES of gathered expert weights, e.g. decoding) take a gather-and-batch path,
    or two dense GEMMs over all experts when there are few experts per routed slot and every expert is used.

    Args:
      row_tiles: static descending row-tile ladder; default from :func:`default_row_tiles`. Giving one forces
        the sorted loop.
    """
    e = w_gate_up.shape[0]
    idx = expert_idx.astype(jnp.int32)  # out-of-range ids are dropped by routing.sort_by_expert
    gathered = idx.size * (w_gate_up[0].size + w_down[0].size) * w_gate_up.dtype.itemsize
    if row_tiles is None and gathered <= SMALL_GATHER_BYTES:
        if e <= DENSE_EXPERTS_PER_SLOT * idx.shape[-1] and idx.size >= e:
            return _routed_dense(x, idx, expert_weights, w_gate_up, w_down)
        return _routed_gathered(x, idx, expert_weights, w_gate_up, w_down)
    if row_tiles is None:
        row_tiles = default_row_tiles(idx.size, e)
    tiles = tuple(int(b) for b in row_tiles)
    if not tiles or any(b <= 0 for b in tiles):
        raise ValueError(f"row_tiles must be a non-empty tuple of positive ints, got row_tiles={row_tiles!r}")
    return _routed_cpu(x, idx, expert_weights, w_gate_up, w_down, tiles)


# ----------------------------------------------------------------------------------------------------
# Grouped matmul / tgmm.
# ----------------------------------------------------------------------------------------------------


def _local_offsets(group_sizes: jax.Array, group_offset: jax.Array | int, num_local: int, m: int) -> jax.Array:
    """[G_local + 1] row offsets of groups ``group_offset .. group_offset + G_local``, clipped to ``m`` rows."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32), dtype=jnp.int32), m)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    return jax.lax.dynamic_slice_in_dim(offsets, jnp.asarray(group_offset, jnp.int32), num_local + 1)


def gmm_cpu(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    row_tiles: tuple[int, ...] | None = None,
    transpose_rhs: bool = False,
    group_offset: jax.Array | int = 0,
) -> jax.Array:
    """Grouped matmul by a sorted loop over the local groups and row tiles (cost ~ M, not G * M).

    ``rhs`` is [G_local, K, N], or [G_local, N, K] with ``transpose_rhs`` (contracted on its last dim),
    holding groups ``[group_offset, group_offset + G_local)`` of ``group_sizes`` [G].

    Each tile's result is written with ``dynamic_update_slice`` in group order, so a tile that overruns
    its group is overwritten by the next group's first tile; rows outside the local groups are zeroed
    at the end.
    """
    m, kdim = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiles = tuple(row_tiles) if row_tiles is not None else default_row_tiles(m, g)
    pad = _pad_rows(tiles)
    lhs_p = jnp.pad(lhs, ((0, pad), (0, 0)))
    offsets = _local_offsets(group_sizes, group_offset, g, m)
    contract = (1, 1) if transpose_rhs else (1, 0)

    def group_body(gi, out):
        w = rhs[gi]

        def tile_fn(b, r0, needs_mask, o):
            res = _dot(_tile_rows(lhs_p, r0, b), w, contract).astype(out.dtype)
            return jax.lax.dynamic_update_slice_in_dim(o, res, r0, axis=0)

        return _ladder_loop(offsets[gi], offsets[gi + 1] - offsets[gi], tiles, tile_fn, out)

    out = jax.lax.fori_loop(0, g, group_body, jnp.zeros((m + pad, n), lhs.dtype))[:m]
    rows = jnp.arange(m)
    return jnp.where(((rows >= offsets[0]) & (rows < offsets[-1]))[:, None], out, 0)


def tgmm_cpu(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    row_tiles: tuple[int, ...] | None = None,
    group_offset: jax.Array | int = 0,
    num_groups: int | None = None,
) -> jax.Array:
    """Per-group ``lhs_g^T @ grad_g`` [G_local, K, N] by a sorted loop; empty groups give zeros.

    Groups ``group_offset .. group_offset + G_local - 1`` with G_local = ``num_groups`` (default all).
    """
    m, kdim = lhs.shape
    n = grad.shape[1]
    g = group_sizes.shape[0] if num_groups is None else num_groups
    tiles = tuple(row_tiles) if row_tiles is not None else default_row_tiles(m, g)
    pad = _pad_rows(tiles)
    lhs_p = jnp.pad(lhs, ((0, pad), (0, 0)))
    grad_p = jnp.pad(grad, ((0, pad), (0, 0)))
    offsets = _local_offsets(group_sizes, group_offset, g, m)

    def group_body(gi, out):
        end = offsets[gi + 1]

        def tile_fn(b, r0, needs_mask, acc):
            lt = _tile_rows(lhs_p, r0, b)
            gt = _tile_rows(grad_p, r0, b)
            if needs_mask:
                # Mask both: 0 * (non-finite junk in rows past the groups) would still be NaN.
                valid = ((r0 + jnp.arange(b, dtype=jnp.int32)) < end)[:, None]
                lt = jnp.where(valid, lt, 0)
                gt = jnp.where(valid, gt, 0)
            return acc + _dot(lt, gt, (0, 0))

        acc = _ladder_loop(offsets[gi], end - offsets[gi], tiles, tile_fn, jnp.zeros((kdim, n), _F32))
        return jax.lax.dynamic_update_index_in_dim(out, acc.astype(out.dtype), gi, axis=0)

    return jax.lax.fori_loop(0, g, group_body, jnp.zeros((g, kdim, n), lhs.dtype))


def _shift_rows(x: jax.Array, shift: jax.Array) -> jax.Array:
    """``jnp.roll`` along rows by a traced amount (brings the local groups' first row to row 0 and back)."""
    return jnp.roll(x, shift, axis=0)


def gmm_ragged(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset: jax.Array | int | None = None
) -> jax.Array:
    """Grouped matmul via ``jax.lax.ragged_dot`` (a real grouped matmul on TPU/GPU; dense on CPU).

    ``ragged_dot`` has no group offset: with one, the local groups' rows are rolled to the top (one
    copy of lhs and of the output), multiplied with the local group sizes, and rolled back; ragged_dot
    zeroes the rows past its groups, which are exactly the non-local rows.
    """
    def ragged(a, sizes):
        return jax.lax.ragged_dot(a, rhs, sizes.astype(jnp.int32), preferred_element_type=_F32).astype(lhs.dtype)

    if group_offset is None:
        return ragged(lhs, group_sizes)
    offsets = _local_offsets(group_sizes, group_offset, rhs.shape[0], lhs.shape[0])
    out = ragged(_shift_rows(lhs, -offsets[0]), jnp.diff(offsets))
    return _shift_rows(out, offsets[0])


def tgmm_ragged(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    group_offset: jax.Array | int | None = None,
    num_groups: int | None = None,
) -> jax.Array:
    """tgmm as the rhs-cotangent of ``ragged_dot``: XLA emits its own ragged (transposed) kernel.

    With a group offset, rows are rolled as in :func:`gmm_ragged` (rows past the local groups are ignored).
    """
    g = group_sizes.shape[0] if num_groups is None else num_groups
    if group_offset is not None:
        offsets = _local_offsets(group_sizes, group_offset, g, lhs.shape[0])
        lhs, grad = _shift_rows(lhs, -offsets[0]), _shift_rows(grad, -offsets[0])
        group_sizes = jnp.diff(offsets)
    rhs0 = jnp.zeros((g, lhs.shape[1], grad.shape[1]), lhs.dtype)
    _, vjp = jax.vjp(lambda r: jax.lax.ragged_dot(lhs, r, group_sizes.astype(jnp.int32)), rhs0)
    return vjp(grad.astype(lhs.dtype))[0]
