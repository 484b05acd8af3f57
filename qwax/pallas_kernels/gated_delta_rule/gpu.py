"""Gated delta rule kernels for Hopper GPUs in Pallas Mosaic GPU: chunked forward/backward, single-token decode.

Same contracts as tpu.py (pallas.py calls `forward`, `backward`, `decode`) and the same per-chunk math as
chunk_math.py, rewritten for Mosaic GPU (`plgpu.kernel`, Lane lowering semantics, one warpgroup per program):
Mosaic GPU has no `dot_general` lowering, so every product is a `plgpu.wgmma` whose operands sit in SMEM
(or, for the left operand, in registers), and vectors/scalars use explicit WGMMA-derived register layouts.

Layout. The chunk length is fixed at C = 64 (wgmma's M); dk and dv are zero-padded to multiples of 64 in the
wrappers (padded key dims and value columns stay zero, so nothing changes), dk <= 128 (SMEM budget). The
grid is (B, Hv, dv / 64): the recurrence is independent per value column, so each program owns a [dk, 64]
column block of one (batch, value head) state and walks all chunks with `lax.fori_loop`, the state (in the
backward its cotangent dS) carried in registers (float32, WGMMA layout). Splitting dv doubles the programs
(parallelism) at the price of recomputing the chunk's [C, C] products (K K^T, Q K^T, the triangular
inverse) per value block. Value head h reads key head h // (Hv / Hk) in its TMA slices (keys not repeated).

Precision. One bf16 or tf32 wgmma pass per product misses the tests' tolerances (emulating chunk_math with
rounded operands gave errors of 5e-4 to 3e-2 where the tests allow 1e-4 and 1e-3). Products therefore use a
3-pass bf16 split: x = hi + lo with hi = bf16(x), lo = bf16(x - hi), and A B ~ hi_A hi_B + hi_A lo_B + lo_A
hi_B, float32 accumulation (errors <= 6e-5 in the test cases, in the emulation and in interpret mode alike).
bf16 also lets wgmma read transposed SMEM operands and take the left operand from registers (tf32 allows
neither). q/k (and the backward's do) are split in the wrappers (inputs already bf16 have no lo part and
skip the lo passes); the forward stores the chunk start states as such (hi, lo) pairs for the backward.

Data movement. TMA (`copy_gmem_to_smem`, mbarriers) brings each chunk's q, k, v, gates (and in the backward
the chunk's start state and do) into 128-byte-swizzled SMEM tiles; each input's next-chunk copy is issued as
soon as the current chunk has consumed that buffer, so it overlaps the rest of the chunk's math (k is
double-buffered in the forward; the backward has no SMEM left for that). Outputs leave by TMA stores from
SMEM (o, states, gate gradients) or, where SMEM is full, by direct register -> GMEM stores (dq, dk, dv, final
states). SMEM at dk = 128, float32 v: ~209 KB forward, ~210 KB backward (227 KB available). Per-program dq,
dk, dG, dbeta are partial sums over the program's 64 value columns; the wrapper sums them (and pallas.py
the value heads of each key head).

Decode: grid (B, Hv, dv / 64), one [dk, 64] float32 state block per program through SMEM by TMA, only
broadcasts and reductions (no matmul); the new state is a fresh buffer (plgpu.kernel has no input/output
aliasing), unlike the TPU kernel's in-place update.

Verified here (CPU only, no GPU available): values and gradients of all inputs (initial state included) and
the decode step in Mosaic GPU interpret mode (`plgpu.InterpretGPUParams(detect_races=True)`: no race found)
against the per-token reference (tests/pallas_kernels/test_gated_delta_rule_pallas.py), and the whole
Pallas -> Mosaic GPU lowering (done in Python, for compute capability 9.0, Mosaic GPU's default without a GPU;
it checks lowering rules, register layouts and the SMEM budget) of forward, gradient and decode at
dk = dv = 128, C = 64, float32 and bf16, via `jax.export(..., platforms=["cuda"])`. Not run on a real GPU:
LLVM/ptxas compilation, register pressure (the backward keeps several [64, 128] float32 accumulators live;
spills are likely), the asynchronous-proxy ordering on hardware (the interpreter models TMA completion, not
fences) and speed.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_F32, _BF16 = jnp.float32, jnp.bfloat16
CHUNK = 64  # chunk length C: wgmma's M extent (64 rows per warpgroup instruction)
_VB = 64  # value columns per program
_DK_MAX = 128  # larger key dims do not fit the SMEM budget above
_INVERSE_BLOCK = 16  # as chunk_math.unit_lower_inverse

_WG = plgpu.Layout.WGMMA
_ROWV = _WG.reduce(1)  # a [C] vector indexed by row (position i): chunk_math's [C, 1] columns
_COLV = _WG.reduce(0)  # a [C] vector indexed by column (position j): chunk_math's [1, C] rows
# Lane semantics: explicit register layouts, lowered directly (the default warpgroup semantics' layout inference
# gave up, after 2 minutes, on a prototype of these kernels). Column sums need 1 KB of cross-warp scratch.
_PARAMS = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane, reduction_scratch_bytes=1024)

_Parts = tuple[Any, ...]  # an operand as (hi,) or (hi, lo): SMEM refs (possibly transposed) or bf16 arrays
_G_ROWS = ("G", "beta", "seg", "first", "last")  # rows of the packed per-position gate array


# ----------------------------------------------------------------------------------------------- helpers


def _smem(shape: Sequence[int], dtype) -> Any:
    """An SMEM buffer in the layout TMA, wgmma and register loads share: (8, 128-byte) tiles, 128-byte swizzle."""
    tiling = plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize))
    return plgpu.SMEM(tuple(shape), dtype, transforms=(tiling, plgpu.SwizzleTransform(128)))


def _split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 -> (hi, lo) bf16 with hi + lo = x to ~2^-17 relative."""
    hi = x.astype(_BF16)
    return hi, (x - hi.astype(_F32)).astype(_BF16)


def _parts(buf, n: int, *lead) -> _Parts:
    """The n leading-axis parts of an SMEM pair buffer [.., n, rows, cols] (after indexing `lead`)."""
    return tuple(buf.at[(*lead, p)] for p in range(n))


def _t(parts: _Parts) -> _Parts:
    return tuple(p.T for p in parts)


def _put(buf, x: jax.Array) -> _Parts:
    """Stores x's (hi, lo) split into the pair buffer buf [2, rows, cols]; returns its parts for wgmma."""
    hi, lo = _split(x)
    buf.at[0][...] = hi
    buf.at[1][...] = lo
    plgpu.commit_smem()  # the stores must be visible to wgmma (async proxy) before it reads them
    return _parts(buf, 2)


def _mm(a: _Parts, b: _Parts, shape: tuple[int, int], init: jax.Array | None = None) -> jax.Array:
    """(init +) A @ B, float32 [M, N], as the 3-pass bf16 product (hi hi + hi lo + lo hi; absent lo parts skip
    their passes). a: register arrays or SMEM refs [M, K]; b: SMEM refs [K, N] (transposed refs allowed)."""
    terms = [(a[0], b[0]), *[(a[0], lo) for lo in b[1:]], *[(lo, b[0]) for lo in a[1:]]]

    def issue(acc):
        for x, y in terms:
            plgpu.wgmma(acc, x, y)

    if init is None:
        def scoped(acc):
            issue(acc)
            return acc[...]  # waits for the wgmmas

        return pl.run_scoped(scoped, plgpu.ACC(shape, _F32))

    def stateful(acc):
        issue(acc)
        plgpu.wgmma_wait(0)

    return pl.run_state(stateful)(plgpu.ACC.init(init))


def _bc(vec: jax.Array, n: int) -> jax.Array:
    """_ROWV vector [M] -> [M, n] (value per row)."""
    return lax.broadcast_in_dim(vec, (vec.shape[0], n), (0,))


def _br(vec: jax.Array, m: int) -> jax.Array:
    """_COLV vector [N] -> [m, N] (value per column)."""
    return lax.broadcast_in_dim(vec, (m, vec.shape[0]), (1,))


def _iotas() -> tuple[jax.Array, jax.Array]:
    i = plgpu.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 0, layout=_WG)
    j = plgpu.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 1, layout=_WG)
    return i, j


def _unit_lower_inverse(a, i, j, xbuf, ybuf) -> jax.Array:
    """T = (I + A)^-1 for strictly lower A [C, C] (registers), blocked as chunk_math.unit_lower_inverse:
    16 forward-substitution steps within diagonal blocks of 16, then (I - N)(I + N^2) T_bd with
    N = T_bd A_off. xbuf, ybuf: [2, C, C] bf16 pair buffers for the right operands."""
    bs = _INVERSE_BLOCK
    shift = bs.bit_length() - 1
    same_block = lax.shift_right_logical(i, shift) == lax.shift_right_logical(j, shift)
    pos = i & (bs - 1)
    eye = jnp.where(i == j, 1.0, 0.0)
    a_bd = _split(jnp.where(same_block, a, 0.0))

    def step(s, t):
        return jnp.where(pos == s, eye - _mm(a_bd, _put(xbuf, t), (CHUNK, CHUNK)), t)

    t = lax.fori_loop(0, bs, step, plgpu.layout_cast(jnp.zeros((CHUNK, CHUNK), _F32), _WG))
    n = _mm(_split(t), _put(ybuf, jnp.where(same_block, 0.0, a)), (CHUNK, CHUNK))
    t = t - _mm(_split(n), _put(xbuf, t), (CHUNK, CHUNK))
    power, reach = n, 2
    while reach < CHUNK // bs:  # N^(2^m) is zero once 2^m >= C / 16
        power = _mm(_split(power), _put(ybuf, power), (CHUNK, CHUNK))
        t = t + _mm(_split(power), _put(xbuf, t), (CHUNK, CHUNK))
        reach *= 2
    return t


class _Gates:
    """The chunk's per-position vectors (rows of the [5, C] gate tile) in both vector layouts, and the scalars
    of chunk_math._scalings."""

    def __init__(self, gbuf, scale: float):
        row = lambda r, layout: plgpu.load(gbuf.at[r], layout=layout)  # noqa: E731
        self.g_c, self.g_r = row(0, _ROWV), row(0, _COLV)
        self.b_c = row(1, _ROWV)
        self.seg_c, self.seg_r = row(2, _ROWV), row(2, _COLV)
        self.f_c, self.l_c = row(3, _ROWV), row(4, _ROWV)
        g_last, f_last = gbuf[0, CHUNK - 1], gbuf[3, CHUNK - 1]
        self.e = jnp.exp(self.g_c)  # <= 1: G <= 0
        self.chunk_decay = f_last * jnp.exp(g_last)  # 0 if a segment starts inside the chunk
        self.to_end = self.l_c * jnp.exp(g_last - self.g_c)
        self.q_scale = scale * self.f_c * self.e
        self.w = self.f_c * self.b_c * self.e

    def decay(self, i, j) -> jax.Array:
        """D [C, C]: exp(G_i - G_j) for j <= i in the same segment, else 0 (exponent masked: no overflow)."""
        same = (i >= j) & (_bc(self.seg_c, CHUNK) == _br(self.seg_r, CHUNK))
        return jnp.where(same, jnp.exp(jnp.where(same, _bc(self.g_c, CHUNK) - _br(self.g_r, CHUNK), 0.0)), 0.0)


class _Stream:
    """One kernel input streamed chunk by chunk: TMA copies of chunk n into SMEM, tracked by one barrier."""

    def __init__(self, copies: Callable[[Any], list[tuple[Any, Any]]], barrier):
        self.copies, self.barrier = copies, barrier

    def fetch(self, n) -> None:
        for src, dst in self.copies(n):
            plgpu.copy_gmem_to_smem(src, dst, self.barrier)

    def prefetch(self, n, valid) -> None:
        """Fetch chunk n if `valid`, after every thread is done with the buffer (commit_smem: fence + barrier)."""
        plgpu.commit_smem()
        pl.when(valid)(lambda: self.fetch(n))

    def wait(self) -> None:
        plgpu.barrier_wait(self.barrier)


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad) if size != x.shape[axis] else x


def _round_up(d: int) -> int:
    return -(-d // 64) * 64


def _check_dims(dk: int, dv: int, c: int | None = None) -> tuple[int, int]:
    """Padded (dk, dv); raises for shapes the kernels do not support."""
    if c is not None and c != CHUNK:
        raise ValueError(f"the Mosaic GPU kernels need chunks of C = {CHUNK} positions, found C = {c}")
    if _round_up(dk) > _DK_MAX:
        raise ValueError(f"the Mosaic GPU kernels support key head dims dk <= {_DK_MAX} (SMEM), found dk = {dk}")
    return _round_up(dk), _round_up(dv)


def _pairs(x: jax.Array) -> jax.Array:
    """[...] -> [P, ...] bf16: (x,) if x is bf16 already, else its (hi, lo) split."""
    if x.dtype == _BF16:
        return x[None]
    hi = x.astype(_F32).astype(_BF16)
    return jnp.stack([hi, (x.astype(_F32) - hi.astype(_F32)).astype(_BF16)])


def _gate_tile(g, beta, seg, first, last) -> jax.Array:
    """[B, Hv, N, 5, C] float32: G, beta, seg, first, last per head (one TMA copy per chunk)."""
    per_batch = lambda x: jnp.broadcast_to(x[:, None], g.shape)  # noqa: E731
    return jnp.stack([g, beta, per_batch(seg), per_batch(first), per_batch(last)], axis=3).astype(_F32)


def _kernel(body, out_type, scratch, grid, interpret, name):
    return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=("b", "h", "j"),
                        compiler_params=_PARAMS, interpret=interpret or None, kernel_name=name)


# ------------------------------------------------------------------------------------------------ forward


def _fwd_body(q_g, k_g, v_g, gate_g, s0_g, o_g, sfin_g, *rest, scale: float, n_chunks: int, r: int,
              with_states: bool):
    states_g = rest[0] if with_states else None
    qbuf, kbuf, vbuf, gbuf, sbuf, xbuf, ybuf, rbuf, obuf, q_bar, k_bar, v_bar = rest[1:] if with_states else rest
    bi, h, jb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("j")
    hk = lax.div(h, r)
    cols = pl.ds(jb * _VB, _VB)
    nq, nk = q_g.shape[0], k_g.shape[0]
    dkp = q_g.shape[-1]
    i, j = _iotas()

    q_in = _Stream(lambda n: [(q_g.at[p, bi, hk, n], qbuf.at[p]) for p in range(nq)], q_bar)
    v_in = _Stream(lambda n: [(v_g.at[bi, h, n, :, cols], vbuf), (gate_g.at[bi, h, n], gbuf)], v_bar)
    k_in = lambda slot: _Stream(  # noqa: E731
        lambda n: [(k_g.at[p, bi, hk, n], kbuf.at[slot, p]) for p in range(nk)], k_bar.at[slot])
    q_in.fetch(0)
    v_in.fetch(0)
    k_in(0).fetch(0)
    s = plgpu.load(s0_g.at[bi, h, :, cols], layout=_WG)
    _put(sbuf, s)

    def chunk(n, s):
        has_next = n + 1 < n_chunks
        slot = lax.rem(n, 2)
        sp = _parts(sbuf, 2)
        if with_states:  # this chunk's start state, as the (hi, lo) pair the products use
            for p in range(2):
                plgpu.copy_smem_to_gmem(sp[p], states_g.at[bi, h, n, p, :, cols])
        v_in.wait()
        gates = _Gates(gbuf, scale)
        v = vbuf[...].astype(_F32)
        v_in.prefetch(n + 1, has_next)

        k_in(slot).wait()
        k_in(1 - slot).prefetch(n + 1, has_next)  # into the slot chunk n - 1 is done with
        kp = _parts(kbuf, nk, slot)

        q_in.wait()
        qp = _parts(qbuf, nq)
        kk = _mm(kp, _t(kp), (CHUNK, CHUNK))
        qk = _mm(qp, _t(kp), (CHUNK, CHUNK))
        ks = _mm(kp, sp, (CHUNK, _VB))
        qs = _mm(qp, sp, (CHUNK, _VB))
        q_in.prefetch(n + 1, has_next)

        decay = gates.decay(i, j)
        t = _unit_lower_inverse(jnp.where(i > j, _bc(gates.b_c, CHUNK) * kk * decay, 0.0), i, j, xbuf, ybuf)
        residual = _bc(gates.b_c, _VB) * v - _bc(gates.w, _VB) * ks
        v_new = _mm(_split(t), _put(rbuf, residual), (CHUNK, _VB))
        o = _bc(gates.q_scale, _VB) * qs + _mm(_split(scale * qk * decay), _put(rbuf, v_new), (CHUNK, _VB))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last o and states stores have read their SMEM
        obuf[...] = o.astype(obuf.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(obuf, o_g.at[bi, h, n, :, cols])
        s_next = _mm(_t(kp), _put(rbuf, _bc(gates.to_end, _VB) * v_new), (dkp, _VB), init=gates.chunk_decay * s)
        _put(sbuf, s_next)
        return s_next

    s = lax.fori_loop(0, n_chunks, chunk, s)
    sfin_g.at[bi, h, :, cols][...] = s
    plgpu.wait_smem_to_gmem(0)


def forward(q, k, v, g, beta, seg, first, last, s0, *, scale: float, with_states: bool, interpret: Any = False):
    """Chunked forward.

    Args (pallas.py's kernel layout): q, k [B, Hk, N, C, dk]; v [B, Hv, N, C, dv]; g (cumulative log decay G),
      beta [B, Hv, N, C] float32; seg, first, last [B, N, C] float32; s0 [B, Hv, dk, dv] float32. C must be 64.
    Returns:
      (o [B, Hv, N, C, dv] in v.dtype, final state [B, Hv, dk, dv] float32, and if with_states the chunk start
      states as bf16 (hi, lo) pairs [B, Hv, N, 2, dk', dv'] (dk, dv padded to multiples of 64), for `backward`).
    """
    b, hk, n, c, dk = q.shape
    hv, dv = v.shape[1], v.shape[-1]
    dkp, dvp = _check_dims(dk, dv, c)
    qx, kx = (_pairs(_pad_to(x, 4, dkp)) for x in (q, k))
    vx = _pad_to(v, 4, dvp)
    s0x = _pad_to(_pad_to(s0.astype(_F32), 2, dkp), 3, dvp)
    out_type = [jax.ShapeDtypeStruct((b, hv, n, c, dvp), v.dtype), jax.ShapeDtypeStruct((b, hv, dkp, dvp), _F32)]
    if with_states:
        out_type.append(jax.ShapeDtypeStruct((b, hv, n, 2, dkp, dvp), _BF16))
    nq, nk = qx.shape[0], kx.shape[0]
    scratch = [
        _smem((nq, c, dkp), _BF16),  # q parts
        _smem((2, nk, c, dkp), _BF16),  # k parts, two slots
        _smem((c, _VB), v.dtype),  # v
        plgpu.SMEM((len(_G_ROWS), c), _F32),  # gates
        _smem((2, dkp, _VB), _BF16),  # state (hi, lo)
        _smem((2, c, c), _BF16),  # triangular inverse operands, then T
        _smem((2, c, c), _BF16),
        _smem((2, c, _VB), _BF16),  # residual, V', to_end * V'
        _smem((c, _VB), v.dtype),  # o, for the TMA store
        plgpu.Barrier(num_arrivals=nq),
        plgpu.Barrier(num_arrivals=nk, num_barriers=2),
        plgpu.Barrier(num_arrivals=2),
    ]
    body = functools.partial(_fwd_body, scale=scale, n_chunks=n, r=hv // hk, with_states=with_states)
    outs = _kernel(body, out_type, scratch, (b, hv, dvp // _VB), interpret, "qwax_gdr_fwd_mgpu")(
        qx, kx, vx, _gate_tile(g, beta, seg, first, last), s0x)
    o, s_final = outs[0][..., :dv], outs[1][:, :, :dk, :dv]
    return (o, s_final, outs[2]) if with_states else (o, s_final)


# ----------------------------------------------------------------------------------------------- backward


def _bwd_body(q_g, k_g, v_g, gate_g, st_g, do_g, dsf_g, dq_g, dk_g, dv_g, gg_g, ds0_g,
              qbuf, kbuf, vbuf, gbuf, sbuf, dobuf, dsbuf, xbuf, zbuf, rbuf, ggbuf,
              q_bar, k_bar, v_bar, s_bar, do_bar, *, scale: float, n_chunks: int, r: int):
    bi, h, jb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("j")
    hk = lax.div(h, r)
    cols = pl.ds(jb * _VB, _VB)
    nq, nk, nd = q_g.shape[0], k_g.shape[0], do_g.shape[0]
    dkp = q_g.shape[-1]
    i, j = _iotas()
    lanes = plgpu.broadcasted_iota(jnp.int32, (CHUNK,), 0, layout=_COLV)

    q_in = _Stream(lambda n: [(q_g.at[p, bi, hk, n], qbuf.at[p]) for p in range(nq)], q_bar)
    k_in = _Stream(lambda n: [(k_g.at[p, bi, hk, n], kbuf.at[p]) for p in range(nk)], k_bar)
    v_in = _Stream(lambda n: [(v_g.at[bi, h, n, :, cols], vbuf), (gate_g.at[bi, h, n], gbuf)], v_bar)
    s_in = _Stream(lambda n: [(st_g.at[bi, h, n, p, :, cols], sbuf.at[p]) for p in range(2)], s_bar)
    do_in = _Stream(lambda n: [(do_g.at[p, bi, h, n, :, cols], dobuf.at[p]) for p in range(nd)], do_bar)
    streams = (q_in, k_in, v_in, s_in, do_in)
    for stream in streams:
        stream.fetch(n_chunks - 1)
    ds = plgpu.load(dsf_g.at[bi, h, :, cols], layout=_WG)
    _put(dsbuf, ds)

    def chunk(it, ds_next):
        n = n_chunks - 1 - it  # chunks in reverse
        has_next = n > 0
        v_in.wait()
        gt = _Gates(gbuf, scale)
        v = vbuf[...].astype(_F32)
        v_in.prefetch(n - 1, has_next)
        k_in.wait()
        q_in.wait()
        kp, qp = _parts(kbuf, nk), _parts(qbuf, nq)
        kk = _mm(kp, _t(kp), (CHUNK, CHUNK))
        qk = _mm(qp, _t(kp), (CHUNK, CHUNK))
        s_in.wait()
        sp = _parts(sbuf, 2)
        ks = _mm(kp, sp, (CHUNK, _VB))
        qs = _mm(qp, sp, (CHUNK, _VB))
        s = sbuf.at[0][...].astype(_F32) + sbuf.at[1][...].astype(_F32)
        d_chunk_decay = jnp.sum(jnp.sum(s * ds_next, axis=1))

        # Recompute the chunk's forward intermediates (chunk_math.chunk_backward).
        decay = gt.decay(i, j)
        t = _unit_lower_inverse(jnp.where(i > j, _bc(gt.b_c, CHUNK) * kk * decay, 0.0), i, j, xbuf, zbuf)
        t_parts = _put(xbuf, t)
        v_new = _mm(_split(t), _put(rbuf, _bc(gt.b_c, _VB) * v - _bc(gt.w, _VB) * ks), (CHUNK, _VB))
        vn = _put(rbuf, v_new)
        p_mat = scale * qk * decay

        # S_next = chunk_decay * S + K^T (to_end * V')
        dsp = _parts(dsbuf, 2)
        dv_end = _mm(kp, dsp, (CHUNK, _VB))
        dk = _mm(_split(_bc(gt.to_end, _VB) * v_new), _t(dsp), (CHUNK, dkp))
        dv_new = _bc(gt.to_end, _VB) * dv_end
        d_to_end = jnp.sum(v_new * dv_end, axis=1)

        # O = q_scale * (Q S) + P V'
        do_in.wait()
        dop = _parts(dobuf, nd)
        do_regs = tuple(part[...] for part in dop)
        do = do_regs[0].astype(_F32) + (do_regs[1].astype(_F32) if nd > 1 else 0.0)
        dq = _bc(gt.q_scale, dkp) * _mm(do_regs, _t(sp), (CHUNK, dkp))
        dp = _mm(do_regs, _t(vn), (CHUNK, CHUNK))
        d_q_scale = jnp.sum(qs * do, axis=1)
        dv_new = dv_new + _mm(_t(_put(zbuf, p_mat)), dop, (CHUNK, _VB))
        do_in.prefetch(n - 1, has_next)
        ds = _mm(_t(qp), _put(zbuf, _bc(gt.q_scale, _VB) * do), (dkp, _VB), init=gt.chunk_decay * ds_next)
        dqk = scale * dp * decay
        d_decay = scale * dp * qk
        dq = _mm(_split(dqk), kp, (CHUNK, dkp), init=dq)
        dk = _mm(_t(_put(zbuf, dqk)), qp, (CHUNK, dkp), init=dk)
        q_in.prefetch(n - 1, has_next)

        # V' = T R, T = (I + A)^-1: dR = T^T dV', dA = -dR V'^T (strictly lower part).
        dr = _mm(_t(t_parts), _put(zbuf, dv_new), (CHUNK, _VB))
        da = jnp.where(i > j, -_mm(_split(dr), _t(vn), (CHUNK, CHUNK)), 0.0)
        # A = strict * beta_i * KK * D
        dkk = da * _bc(gt.b_c, CHUNK) * decay
        db_c = jnp.sum(da * kk * decay, axis=1)
        d_decay = d_decay + da * _bc(gt.b_c, CHUNK) * kk
        dk = _mm(_split(dkk), kp, (CHUNK, dkp), init=dk)
        dk = _mm(_t(_put(zbuf, dkk)), kp, (CHUNK, dkp), init=dk)

        # R = beta * V - w * (K S)
        dv = _bc(gt.b_c, _VB) * dr
        db_c = db_c + jnp.sum(v * dr, axis=1)
        dw = -jnp.sum(ks * dr, axis=1)
        dks = -_bc(gt.w, _VB) * dr
        dk = _mm(_split(dks), _t(sp), (CHUNK, dkp), init=dk)
        ds = _mm(_t(kp), _put(zbuf, dks), (dkp, _VB), init=ds)
        k_in.prefetch(n - 1, has_next)
        s_in.prefetch(n - 1, has_next)
        db_c = db_c + gt.f_c * gt.e * dw

        # Cumulative decays: through exp(G) (q_scale, w), D_ij = exp(G_i - G_j), to_end and chunk_decay.
        de = gt.f_c * gt.b_c * dw + scale * gt.f_c * d_q_scale
        e_mat = d_decay * decay
        dg_c = gt.e * de + jnp.sum(e_mat, axis=1) - d_to_end * gt.to_end
        dg_last = jnp.sum(d_to_end * gt.to_end) + d_chunk_decay * gt.chunk_decay
        dg_r = jnp.where(lanes == CHUNK - 1, dg_last, 0.0) - jnp.sum(e_mat, axis=0)

        dq_g.at[bi, h, jb, n][...] = dq
        dk_g.at[bi, h, jb, n][...] = dk
        dv_g.at[bi, h, n, :, cols][...] = dv
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last gate-gradient store has read ggbuf
        ggbuf.at[0][...] = dg_c
        ggbuf.at[1][...] = dg_r
        ggbuf.at[2][...] = db_c
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(ggbuf, gg_g.at[bi, h, jb, n])
        _put(dsbuf, ds)
        return ds

    ds = lax.fori_loop(0, n_chunks, chunk, ds)
    ds0_g.at[bi, h, :, cols][...] = ds
    plgpu.wait_smem_to_gmem(0)


def backward(q, k, v, g, beta, seg, first, last, states, do, ds_final, *, scale: float, interpret: Any = False):
    """Chunked backward from the chunk start states that `forward` wrote.

    Args: forward's inputs (without s0), states [B, Hv, N, 2, dk', dv'] bf16 (from `forward`),
      do [B, Hv, N, C, dv], ds_final [B, Hv, dk, dv].
    Returns (dq, dk [B, Hv, N, C, dk] per value head, dv [B, Hv, N, C, dv], dG, dbeta [B, Hv, N, C],
      ds0 [B, Hv, dk, dv]), all float32.
    """
    b, hk, n, c, dk = q.shape
    hv, dv = v.shape[1], v.shape[-1]
    dkp, dvp = _check_dims(dk, dv, c)
    nj = dvp // _VB
    qx, kx = (_pairs(_pad_to(x, 4, dkp)) for x in (q, k))
    dox = _pairs(_pad_to(do, 4, dvp))
    dsfx = _pad_to(_pad_to(ds_final.astype(_F32), 2, dkp), 3, dvp)
    out_type = [
        jax.ShapeDtypeStruct((b, hv, nj, n, c, dkp), _F32),  # dq, partial over value blocks
        jax.ShapeDtypeStruct((b, hv, nj, n, c, dkp), _F32),  # dk, likewise
        jax.ShapeDtypeStruct((b, hv, n, c, dvp), _F32),
        jax.ShapeDtypeStruct((b, hv, nj, n, 3, c), _F32),  # dG (two parts), dbeta; partial
        jax.ShapeDtypeStruct((b, hv, dkp, dvp), _F32),
    ]
    nq, nk, nd = qx.shape[0], kx.shape[0], dox.shape[0]
    scratch = [
        _smem((nq, c, dkp), _BF16),  # q parts
        _smem((nk, c, dkp), _BF16),  # k parts
        _smem((c, _VB), v.dtype),  # v
        plgpu.SMEM((len(_G_ROWS), c), _F32),  # gates
        _smem((2, dkp, _VB), _BF16),  # chunk start state (hi, lo)
        _smem((nd, c, _VB), _BF16),  # do parts
        _smem((2, dkp, _VB), _BF16),  # dS (hi, lo)
        _smem((2, c, c), _BF16),  # inverse operands, then T
        _smem((2, c, c), _BF16),  # every other right / transposed-left operand, one at a time
        _smem((2, c, _VB), _BF16),  # residual, then V'
        plgpu.SMEM((3, c), _F32),  # gate gradients, for the TMA store
        plgpu.Barrier(num_arrivals=nq),
        plgpu.Barrier(num_arrivals=nk),
        plgpu.Barrier(num_arrivals=2),
        plgpu.Barrier(num_arrivals=2),
        plgpu.Barrier(num_arrivals=nd),
    ]
    body = functools.partial(_bwd_body, scale=scale, n_chunks=n, r=hv // hk)
    dq, dk_, dv_, gg, ds0 = _kernel(body, out_type, scratch, (b, hv, nj), interpret, "qwax_gdr_bwd_mgpu")(
        qx, kx, _pad_to(v, 4, dvp), _gate_tile(g, beta, seg, first, last), states, dox, dsfx)
    gg = gg.sum(axis=2)
    return (dq.sum(axis=2)[..., :dk], dk_.sum(axis=2)[..., :dk], dv_[..., :dv], gg[..., 0, :] + gg[..., 1, :],
            gg[..., 2, :], ds0[:, :, :dk, :dv])


# ------------------------------------------------------------------------------------------------- decode


def _decode_body(q_g, k_g, v_g, gb_g, s_g, o_g, snew_g, sbuf, qbuf, kbuf, vbuf, obuf, bar, *, scale: float, r: int):
    bi, h, jb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("j")
    hk = lax.div(h, r)
    cols = pl.ds(jb * _VB, _VB)
    for src, dst in ((s_g.at[bi, h, :, cols], sbuf), (q_g.at[bi, hk], qbuf), (k_g.at[bi, hk], kbuf),
                     (v_g.at[bi, h, cols], vbuf)):
        plgpu.copy_gmem_to_smem(src, dst, bar)
    g, beta = gb_g[bi, h, 0], gb_g[bi, h, 1]
    plgpu.barrier_wait(bar)
    dk = sbuf.shape[0]
    k_c = _bc(plgpu.load(kbuf, layout=_ROWV), _VB)
    # chunk_math.decode_step: broadcasts and reductions only (a one-row product would waste wgmma).
    s = sbuf[...] * jnp.exp(g)
    u = beta * (plgpu.load(vbuf, layout=_COLV) - jnp.sum(k_c * s, axis=0))
    s = s + k_c * _br(u, dk)
    o = scale * jnp.sum(_bc(plgpu.load(qbuf, layout=_ROWV), _VB) * s, axis=0)
    sbuf[...] = s
    obuf[...] = o
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(sbuf, snew_g.at[bi, h, :, cols])
    plgpu.copy_smem_to_gmem(obuf, o_g.at[bi, h, cols])
    plgpu.wait_smem_to_gmem(0)


def decode(q, k, v, g, beta, state, *, scale: float, interpret: Any = False):
    """Single-token step. q, k [B, Hk, dk, 1]; v [B, Hv, 1, dv]; g, beta [B, Hv, 1, 1] float32; state
    [B, Hv, dk, dv] float32 (as `decode.decode_call`). Returns (o [B, Hv, 1, dv] in v.dtype, new state)."""
    b, hk, dk, _ = q.shape
    hv, dv = v.shape[1], v.shape[-1]
    dkp, dvp = _check_dims(dk, dv)
    qx, kx = (_pad_to(x[..., 0].astype(_F32), 2, dkp) for x in (q, k))
    vx = _pad_to(v[:, :, 0].astype(_F32), 2, dvp)
    sx = _pad_to(_pad_to(state.astype(_F32), 2, dkp), 3, dvp)
    gb = jnp.concatenate([g[..., 0], beta[..., 0]], axis=-1).astype(_F32)  # [B, Hv, 2]
    out_type = [jax.ShapeDtypeStruct((b, hv, dvp), _F32), jax.ShapeDtypeStruct((b, hv, dkp, dvp), _F32)]
    scratch = [_smem((dkp, _VB), _F32), plgpu.SMEM((dkp,), _F32), plgpu.SMEM((dkp,), _F32),
               plgpu.SMEM((_VB,), _F32), plgpu.SMEM((_VB,), _F32), plgpu.Barrier(num_arrivals=4)]
    body = functools.partial(_decode_body, scale=scale, r=hv // hk)
    o, s = _kernel(body, out_type, scratch, (b, hv, dvp // _VB), interpret, "qwax_gdr_decode_mgpu")(
        qx, kx, vx, gb, sx)
    return o[:, :, None, :dv].astype(v.dtype), s[:, :, :dk, :dv]
